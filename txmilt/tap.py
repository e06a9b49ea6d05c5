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

from txmilt.config import DaemonConfig, check_config, fallback_verdict, filter_spec, read_config
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


class Options(usage.Options):
    """Options of ``twistd milter``; the config file's values, overridden by the command line."""

    synopsis = "[--config FILE] [--listen DESCRIPTION ...] [--filter module:Class ...]"
    longdesc = (
        "Run a chain of mail filters (milters) for Postfix or Sendmail. Filters answer in the order given;"
        " the first refusal wins. --listen takes Twisted strports descriptions"
        " (tcp:8891:interface=127.0.0.1, unix:/run/txmilt/txmilt.sock:mode=660, systemd:domain=INET:index=0)"
        " or libmilter specs (inet:8891@127.0.0.1, inet:127.0.0.1:8891, inet6:8891@[::1], unix:/path,"
        " local:/path). --filter names a filter class as package.module:Class, repeatable, in chain order,"
        " after the config file's filters."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "TOML config file ([daemon] and [[filter]] tables)."],
        ["metrics", None, None, "Serve Prometheus metrics here (e.g. tcp:9108:interface=127.0.0.1)."],
        ["frame-limit", None, None,
         "Largest packet payload accepted, in bytes; a larger packet closes its connection (default 1048576).",
         _whole_number("--frame-limit")],
        ["idle-timeout", None, None, "Close a connection silent this many seconds (default 3600; 0: never).",
         _seconds("--idle-timeout")],
        ["negotiation-timeout", None, None,
         "Close a connection that has not negotiated this many seconds after connecting (default 10; 0: the"
         " idle timeout applies instead).", _seconds("--negotiation-timeout")],
        ["max-connections", None, None, "Refuse (close at once) connections beyond this many (default 2000).",
         _whole_number("--max-connections")],
        ["max-headers", None, None,
         "Most headers per message; the message beyond it is answered 452 4.3.1 (default 1000; 0: no limit).",
         _whole_number("--max-headers")],
        ["max-header-bytes", None, None,
         "Most header bytes per message; the message beyond it is answered 452 4.3.1 (default 1048576;"
         " 0: no limit).", _whole_number("--max-header-bytes")],
        ["max-body-size", None, None,
         "Largest body a whole_body filter may buffer; beyond it the filter gets its fallback (default"
         " 67108864; 0: no limit).", _whole_number("--max-body-size")],
        ["body-spool-threshold", None, None,
         "Bytes of a buffered body kept in memory before spooling to a temporary file in $TMPDIR (default"
         " 1048576; 0: always spool).",
         _whole_number("--body-spool-threshold")],
        ["drain-timeout", None, None, "On SIGTERM, wait this long for open connections (default 30).",
         _seconds("--drain-timeout")],
        ["progress-interval", None, None, "Seconds between keep-alives at a slow end of message (default 10).",
         _seconds("--progress-interval")],
        ["timeout", None, None,
         "Default per-filter deadline for each callback, in seconds; past it the filter gets its fallback"
         " (default 25).", _seconds("--timeout")],
        ["fallback", None, None, "Default verdict for a failing filter: tempfail, accept, continue, reject."],
        ["socket-group", None, None,
         "Group owning unix sockets (their mode comes from the description: default 660; world-writable"
         " modes are refused)."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []
        self["filter"] = []
        self.config: DaemonConfig | None = None

    def opt_listen(self, description: str) -> None:
        """Listen here (repeatable); default tcp:8891:interface=127.0.0.1."""
        try:
            self["listen"].append(to_strports(description))
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None

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
        """
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if not isinstance(getattr(self, "parent", None), app.ServerOptions):
                raise
            sys.stderr.write(f"twistd milter: {e}\n(twistd milter --help lists the options)\n")
            raise SystemExit(1) from None

    @override
    def postOptions(self) -> None:
        try:
            self.config = self._build()
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None

    def _build(self) -> DaemonConfig:
        if self["timeout"] is not None and not self["timeout"] > 0:
            raise ConfigurationError(f"--timeout must be positive, not {self['timeout']!r}")
        if self["fallback"] is not None:
            fallback_verdict(self["fallback"], "--fallback")
        config = (
            read_config(self["config"], default_timeout=self["timeout"], default_fallback=self["fallback"])
            if self["config"]
            else DaemonConfig()
        )
        timeout = self["timeout"] if self["timeout"] is not None else config.default_timeout
        fallback = self["fallback"] or config.default_fallback
        extra = tuple(
            filter_spec({"class": path}, f"--filter {path}", timeout, fallback) for path in self["filter"]
        )
        overrides: dict[str, Any] = {
            "filters": config.filters + extra,
            "default_timeout": timeout,
            "default_fallback": fallback,
        }
        if self["listen"]:
            overrides["listen"] = tuple(self["listen"])
        for option, field_name in (
            ("frame-limit", "frame_limit"), ("idle-timeout", "idle_timeout"),
            ("negotiation-timeout", "negotiation_timeout"), ("max-connections", "max_connections"),
            ("max-headers", "max_headers"), ("max-header-bytes", "max_header_bytes"),
            ("max-body-size", "max_body_size"), ("body-spool-threshold", "body_spool_threshold"),
            ("drain-timeout", "drain_timeout"),
            ("progress-interval", "progress_interval"), ("socket-group", "socket_group"),
        ):
            if self[option] is not None:
                overrides[field_name] = self[option]
        if self["metrics"]:
            overrides["metrics"] = to_strports(self["metrics"])
        config = check_config(replace(config, **overrides))
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
    factory = MilterFactory(
        config.filters,
        reactor,
        frame_limit=config.frame_limit,
        idle_timeout=config.idle_timeout,
        negotiation_timeout=config.negotiation_timeout,
        max_connections=config.max_connections,
        progress_interval=config.progress_interval,
        observer=observer,
        max_headers=config.max_headers,
        max_header_bytes=config.max_header_bytes,
        max_body_size=config.max_body_size,
        body_spool_threshold=config.body_spool_threshold,
    )
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
