"""``twistd milter``: command-line options and the service that runs a filter chain."""

from __future__ import annotations

import grp
import os
from dataclasses import replace
from typing import Any, ClassVar

from twisted.application import strports
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
from txmilt.listen import remove_stale_socket, to_strports, unix_socket_path
from txmilt.protocol import MilterFactory

log = Logger()


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
        ["frame-limit", None, None, "Largest packet payload accepted, in bytes (default 1048576).", int],
        ["idle-timeout", None, None, "Close a connection silent this many seconds (default 3600).", float],
        ["max-connections", None, None, "Refuse connections beyond this many (default 2000).", int],
        ["drain-timeout", None, None, "On SIGTERM, wait this long for open connections (default 30).", float],
        ["progress-interval", None, None, "Seconds between keep-alives at a slow end of message (default 10).",
         float],
        ["timeout", None, None, "Default per-filter timeout in seconds (default 25).", float],
        ["fallback", None, None, "Default verdict for a failing filter: tempfail, accept, continue, reject."],
        ["socket-group", None, None, "Group owning unix sockets (their mode comes from the description)."],
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
    def postOptions(self) -> None:
        try:
            self.config = self._build()
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None

    def _build(self) -> DaemonConfig:
        config = read_config(self["config"]) if self["config"] else DaemonConfig()
        timeout = self["timeout"] if self["timeout"] is not None else config.default_timeout
        fallback = self["fallback"] or config.default_fallback
        fallback_verdict(fallback, "--fallback")
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
            ("max-connections", "max_connections"), ("drain-timeout", "drain_timeout"),
            ("progress-interval", "progress_interval"), ("socket-group", "socket_group"),
        ):
            if self[option] is not None:
                overrides[field_name] = self[option]
        metrics = self["metrics"] or config.metrics
        if metrics:
            overrides["metrics"] = to_strports(metrics)
        group = self["socket-group"] or config.socket_group
        if group:
            _group_id(group)
        return check_config(replace(config, **overrides))


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigurationError(f"socket group {name!r} does not exist") from None


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
    """Removes a stale unix socket before listening and sets its group afterwards."""

    def __init__(self, path: str, group: str | None) -> None:
        self.path = path
        self.group = group

    def prepare(self) -> None:
        """Clear a stale socket left by an earlier run (refusing anything that is not one)."""
        if remove_stale_socket(self.path):
            log.info("removed stale socket {path}", path=self.path)
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            raise ConfigurationError(f"directory {directory} for socket {self.path} does not exist")

    @override
    def startService(self) -> None:
        Service.startService(self)
        if self.group and os.path.exists(self.path):
            os.chown(self.path, -1, _group_id(self.group))


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
        max_connections=config.max_connections,
        progress_interval=config.progress_interval,
        observer=observer,
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
