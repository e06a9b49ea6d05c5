"""``twistd milter``: command-line options and the service that runs a filter chain."""

from __future__ import annotations

import grp
import math
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from twisted.application import app, strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site
from typing_extensions import override

from txmilt.config import DEFAULT_LISTEN, SETTINGS, DaemonConfig, Setting, check_config, filter_spec, read_config
from txmilt.errors import ConfigurationError
from txmilt.listen import remove_stale_socket, stale_socket, to_strports, unix_socket_path
from txmilt.protocol import MilterFactory

log = Logger()


def _whole_number(option: str) -> Callable[[str], int]:
    """A coercer for ``option`` whose error names the option."""

    def coerce(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{option} takes a whole number, not {text!r}") from None

    return coerce


def _seconds(option: str) -> Callable[[str], float]:
    """A coercer for ``option`` whose error names the option."""

    def coerce(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isnan(value):
            raise ValueError(f"{option} takes a number of seconds, not {text!r}")
        return value

    return coerce


class _ConfigurationUsageError(usage.UsageError):
    """A value the options or config file give that cannot work (not a mistake in the option syntax)."""


#: Settings checked before the config file is read: its filters are made with them.
_FILTER_DEFAULTS = ("default_timeout", "default_fallback")
_COERCERS: dict[str, Callable[[str], Callable[[str], Any]]] = {"count": _whole_number, "seconds": _seconds}


def _option(setting: Setting) -> list[Any]:
    """The optParameters row of a DaemonConfig setting: no default of its own, so unset means None."""
    coercer = _COERCERS.get(setting.kind)
    return [setting.option, None, None, setting.help, coercer(f"--{setting.option}") if coercer else None]


class Options(usage.Options):
    """Options of ``twistd milter``; the config file's values, overridden by the command line."""

    synopsis = "[--config FILE] [--listen DESCRIPTION ...] [--filter module:Class ...]"
    longdesc = (
        "Run a chain of mail filters (milters) for Postfix or Sendmail. Filters answer in the order given;"
        " the first refusal wins. --listen takes Twisted strports descriptions"
        " (tcp:8891:interface=127.0.0.1, unix:/run/txmilt/txmilt.sock:mode=660, systemd:domain=INET:index=0)"
        " or libmilter/Postfix addresses (inet:8891@127.0.0.1, inet:127.0.0.1:8891, inet6:[::1]:8891,"
        f" inet:8891 for every interface, unix:/path, local:/path); without it: {DEFAULT_LISTEN}."
        " --filter names a filter class as package.module:Class, repeatable, in chain order,"
        " after the config file's filters."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "TOML config file ([daemon] and [[filter]] tables)."],
        *(_option(setting) for setting in SETTINGS),
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []
        self["filter"] = []
        self.config: DaemonConfig | None = None

    def opt_listen(self, description: str) -> None:
        """Listen here (repeatable; the forms and the default are described above)."""
        try:
            self["listen"].append(to_strports(description))
        except ConfigurationError as e:
            raise _ConfigurationUsageError(str(e)) from None

    opt_l = opt_listen

    def opt_filter(self, path: str) -> None:
        """Add a filter class, package.module:Class (repeatable, in chain order)."""
        self["filter"].append(path)

    opt_f = opt_filter

    @override
    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse ``options``; under twistd, a usage error is one line on stderr and exit status 1.

        twistd itself would print the whole help on stdout with the error last;
        for a mistake in a config file that hides the one line that matters.
        A mistake in the options themselves gets a second line pointing at --help.
        """
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if not isinstance(getattr(self, "parent", None), app.ServerOptions):
                raise
            hint = "" if isinstance(e, _ConfigurationUsageError) else "(twistd milter --help lists the options)\n"
            sys.stderr.write(f"twistd milter: {e}\n{hint}")
            raise SystemExit(1) from None

    @override
    def postOptions(self) -> None:
        try:
            self.config = self._build()
        except ConfigurationError as e:
            raise _ConfigurationUsageError(str(e)) from None

    def _build(self) -> DaemonConfig:
        given = [setting for setting in SETTINGS if self[setting.option] is not None]
        overrides = {setting.name: setting.value(self[setting.option]) for setting in given}
        for setting in given:
            if setting.name in _FILTER_DEFAULTS:
                setting.check_value(overrides[setting.name], f"--{setting.option}")
        config = (
            read_config(
                self["config"], default_timeout=overrides.get("default_timeout"),
                default_fallback=overrides.get("default_fallback"),
            )
            if self["config"]
            else DaemonConfig()
        )
        config = replace(config, **overrides)
        extra = tuple(
            filter_spec({"class": path}, f"--filter {path}", config.default_timeout, config.default_fallback)
            for path in self["filter"]
        )
        config = replace(config, filters=config.filters + extra, listen=tuple(self["listen"]) or config.listen)
        config = check_config(config)
        if config.socket_group:
            _group_id(config.socket_group)
        for description in config.listen:
            path = unix_socket_path(description)
            if path is not None:
                _check_socket_directory(path)
                stale_socket(path)
        return config


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigurationError(f"socket group {name!r} does not exist") from None


def _check_socket_directory(path: str) -> None:
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        raise ConfigurationError(f"directory {directory} for socket {path} does not exist")


class DrainService(Service):
    """On stop, waits for open connections to finish, up to a deadline, then closes them."""

    def __init__(self, factory: MilterFactory, timeout: float, clock: IReactorTime) -> None:
        self.factory = factory
        self.timeout = timeout
        self.clock = clock

    @override
    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if not self.factory.connections:
            return None
        log.info(
            "draining {count} open connections for up to {timeout}s",
            count=len(self.factory.connections), timeout=self.timeout,
        )
        done: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + self.timeout

        def check() -> None:
            if not self.factory.connections:
                log.info("all connections finished")
            elif self.clock.seconds() >= deadline:
                log.warn(
                    "drain deadline passed; closing {count} connections", count=len(self.factory.connections)
                )
                for protocol in list(self.factory.connections):
                    if protocol.transport is not None:
                        protocol.transport.loseConnection()
            else:
                return
            loop.stop()
            done.callback(None)

        loop = LoopingCall(check)
        loop.clock = self.clock
        loop.start(min(0.1, self.timeout or 0.1), now=True)
        return done


class UnixSocketService(Service):
    """Removes a stale unix socket before listening and sets its group afterwards.

    Add it after the listener: the group is set in privilegedStartService,
    right after the socket is made and before twistd drops privileges.
    """

    def __init__(self, path: str, group: str | None) -> None:
        self.path = path
        self.group = group

    def prepare(self) -> None:
        """Clear a stale socket left by an earlier run (refusing anything that is not one)."""
        _check_socket_directory(self.path)
        if remove_stale_socket(self.path):
            log.info("removed stale socket {path}", path=self.path)

    @override
    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        try:
            status = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(status.st_mode):
            raise ConfigurationError(f"{self.path} is no longer a socket after listening; refusing to change it")
        if status.st_mode & 0o002:
            # The description's mode is checked before listening; this guards the file itself.
            os.chmod(self.path, stat.S_IMODE(status.st_mode) & ~0o007)
            log.warn("socket {path} was world-writable; removed the access of other users", path=self.path)
        if self.group:
            os.chown(self.path, -1, _group_id(self.group), follow_symlinks=False)


def makeService(options: Options) -> IService:
    """The service tree: listeners, drain on stop, and optional metrics."""
    from twisted.internet import reactor

    config = options.config
    assert config is not None
    observer = None
    if config.metrics:
        from txmilt.metrics import MetricsObserver

        observer = MetricsObserver()
    factory = MilterFactory(config.filters, reactor, observer=observer, **config.factory_keywords())
    top = MultiService()
    top.addService(DrainService(factory, config.drain_timeout, reactor))
    for description in config.listen:
        path = unix_socket_path(description)
        sockets = None
        if path is not None:
            sockets = UnixSocketService(path, config.socket_group)
            try:
                sockets.prepare()
            except ConfigurationError as e:
                raise usage.UsageError(str(e)) from None
        strports.service(description, factory).setServiceParent(top)
        if sockets is not None:
            top.addService(sockets)
        log.info("listening on {description}", description=description)
    if observer is not None and config.metrics:
        observer.track_connections(lambda: len(factory.connections))
        strports.service(config.metrics, Site(observer.resource())).setServiceParent(top)
    return top
