"""``twistd milter``: command-line options and the service that runs a filter chain."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from twisted.application import app, strports
from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site
from typing_extensions import override

from txmilt.config import DEFAULT_LISTEN, SETTINGS, ConfigSource, DaemonConfig, Setting
from txmilt.daemon import Daemon, InProcess, Server, UnixSocketService
from txmilt.errors import ConfigurationError
from txmilt.listen import check_socket_directory, group_id, stale_socket, to_strports, unix_socket_path

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


def _workers(option: str) -> Callable[[str], int | str]:
    """A coercer for ``option`` (a whole number or "auto") whose error names the option."""

    def coerce(text: str) -> int | str:
        if text.strip().lower() == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{option} takes a whole number or auto, not {text!r}") from None

    return coerce


class _ConfigurationUsageError(usage.UsageError):
    """A value the options or config file give that cannot work (not a mistake in the option syntax)."""


_COERCERS: dict[str, Callable[[str], Callable[[str], Any]]] = {
    "count": _whole_number, "seconds": _seconds, "workers": _workers,
}


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
        #: Where the config came from; a reload builds it again from here.
        self.source = ConfigSource()

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
        self.source = ConfigSource(
            os.path.abspath(self["config"]) if self["config"] else None, None,
            {setting.name: self[setting.option] for setting in SETTINGS if self[setting.option] is not None},
            tuple(self["filter"]), tuple(self["listen"]),
        ).reread()
        config = self.source.build()
        if config.socket_group:
            group_id(config.socket_group)
        for description in config.listen:
            path = unix_socket_path(description)
            if path is not None:
                check_socket_directory(path)
                stale_socket(path)
        return config


def makeService(options: Options) -> IService:
    """The service tree: the daemon (sockets, supervised milters, serving), unix socket groups, metrics."""
    from twisted.internet import reactor

    config = options.config
    assert config is not None
    server: Server
    if config.workers > 1:
        from txmilt.workers import WorkerPool

        server = WorkerPool(options.source, config, reactor)
    else:
        server = InProcess(config, reactor)
    top = MultiService()
    top.addService(Daemon(options.source, config, server, reactor))
    for description in config.listen:
        path = unix_socket_path(description)
        if path is not None:
            sockets = UnixSocketService(path, config.socket_group)
            try:
                sockets.prepare()
            except ConfigurationError as e:
                raise usage.UsageError(str(e)) from None
            top.addService(sockets)
        log.info("listening on {description}", description=description)
    if config.metrics:
        strports.service(config.metrics, Site(server.metrics())).setServiceParent(top)
    return top
