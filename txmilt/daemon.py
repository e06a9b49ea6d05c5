"""The daemon's life: bind, start supervised milters, serve, reload on SIGHUP, stop in order.

``Daemon`` binds the listen sockets once (with privileges), starts the external
milters it supervises and waits until they accept connections, then serves:
in this process (``InProcess``) or in worker processes (``txmilt.workers``).
SIGHUP re-reads the config file; SIGTERM stops accepting, drains, and stops the
supervised milters last.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from typing_extensions import override

from txmilt.config import ConfigSource, DaemonConfig
from txmilt.errors import ConfigurationError
from txmilt.listen import check_socket_directory, group_id, remove_stale_socket
from txmilt.protocol import MilterFactory, MilterProtocol
from txmilt.sockets import BoundSockets
from txmilt.supervise import SupervisedMilters

log = Logger()


class _Connections(Protocol):
    """Something whose open MTA connections can be counted and closed."""

    @property
    def connections(self) -> set[MilterProtocol]:
        """The open connections."""


class DrainService(Service):
    """On stop, waits for open connections to finish, up to a deadline, then closes them."""

    def __init__(self, factory: _Connections, timeout: float, clock: IReactorTime) -> None:
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
        check_socket_directory(self.path)
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
            os.chown(self.path, -1, group_id(self.group), follow_symlinks=False)


class ReloadableFactory(Factory):
    """Hands each new connection to the current MilterFactory; a reload puts another in its place."""

    noisy = False

    def __init__(self, current: MilterFactory) -> None:
        self.current = current

    @property
    def connections(self) -> set[MilterProtocol]:
        """Every open connection, on the current chain or an earlier one."""
        return self.current.connections

    def replace(self, factory: MilterFactory) -> None:
        """New connections go to ``factory``; open ones finish where they are."""
        factory.take_over(self.current)
        self.current = factory

    @override
    def buildProtocol(self, addr: IAddress | None) -> TwistedProtocol | None:
        return self.current.buildProtocol(addr)


class Server(Protocol):
    """Where the daemon's connections are served: in this process, or in worker processes."""

    @property
    def factory(self) -> Factory[Any]:
        """What the bound sockets hand connections to (used only where this process accepts them)."""

    def serve(self, sockets: BoundSockets) -> None:
        """Start serving the bound sockets."""

    def reload(self, source: ConfigSource, config: DaemonConfig) -> Deferred[None]:
        """Serve ``config`` from now on; fires when the change is complete."""

    def stop(self) -> Deferred[None]:
        """Stop serving: finish open connections within the drain deadline."""

    def metrics(self) -> Resource:
        """The resource serving the metrics (only when they are configured)."""


class InProcess:
    """Serves in the daemon's own process; a reload gives new connections the new chain."""

    def __init__(self, config: DaemonConfig, reactor: Any) -> None:
        self._reactor = reactor
        self._observer = None
        if config.metrics:
            from txmilt.metrics import MetricsObserver

            self._observer = MetricsObserver()
        self.factory = ReloadableFactory(self._factory(config))
        if self._observer is not None:
            self._observer.track_connections(lambda: len(self.factory.connections))
        self.drain = DrainService(self.factory, config.drain_timeout, reactor)

    def _factory(self, config: DaemonConfig) -> MilterFactory:
        return MilterFactory(config.filters, self._reactor, observer=self._observer, **config.factory_keywords())

    def serve(self, sockets: BoundSockets) -> None:
        """Accept connections here."""
        sockets.accept()

    def reload(self, source: ConfigSource, config: DaemonConfig) -> Deferred[None]:
        """New connections get ``config``'s chain and limits; open ones finish on the previous ones."""
        self.factory.replace(self._factory(config))
        self.drain.timeout = config.drain_timeout
        log.info(
            "reloaded {path}: new connections get the new configuration, {count} open ones finish on the"
            " previous one", path=source.origin, count=len(self.factory.connections),
        )
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Let open connections finish within the drain deadline."""
        return self.drain.stopService() or succeed(None)

    def metrics(self) -> Resource:
        """The metrics of this process."""
        assert self._observer is not None
        return self._observer.resource()


#: What a reload cannot change (the sockets and supervised programs are the daemon's own):
#: how the log names it, the DaemonConfig field it is in, and the part of that field that matters.
_RESTART_ONLY: tuple[tuple[str, str, Callable[[Any], object]], ...] = (
    ("listen", "listen", lambda listen: listen),
    ("metrics", "metrics", lambda metrics: metrics),
    ("socket_group", "socket_group", lambda group: group),
    ("command", "supervised", lambda supervised: supervised),
    ("workers (one process or several)", "workers", lambda workers: workers > 1),
)


class Daemon(Service):
    """Binds the sockets, starts the supervised milters, serves, reloads on SIGHUP and stops in order."""

    def __init__(self, source: ConfigSource, config: DaemonConfig, server: Server, reactor: Any) -> None:
        self.source = source
        self.config = config
        self.server = server
        self.sockets = BoundSockets(config.listen, reactor)
        self.supervised = SupervisedMilters(config.supervised, reactor)
        self._reactor = reactor
        self._serving = False
        self._reloading: Deferred[None] | None = None
        self._reload_again = False
        self._previous_hangup: Any = None

    @override
    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self.sockets.bind(self.server.factory)

    @override
    def startService(self) -> None:
        Service.startService(self)
        self._previous_hangup = signal.signal(signal.SIGHUP, self._hangup)
        self.supervised.start().addCallback(self._serve)

    def _serve(self, _: object) -> None:
        if self.running:
            self.server.serve(self.sockets)
            self._serving = True

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """Re-read the config file and serve it; a file that does not build is refused with one log line."""
        if not self._serving or not self.running:
            log.warn("SIGHUP ignored: the daemon is not serving yet, or stopping")
            return succeed(None)
        if self._reloading is not None:
            self._reload_again = True
            return self._reloading
        try:
            source = self.source.reread()
            config = source.build()
        except ConfigurationError as e:
            log.error("reload refused, still serving the previous configuration: {error}", error=str(e))
            return succeed(None)
        except Exception:
            log.failure("reload refused, still serving the previous configuration")
            return succeed(None)
        kept = [
            (name, field) for name, field, part in _RESTART_ONLY
            if part(getattr(config, field)) != part(getattr(self.config, field))
        ]
        if kept:
            log.warn(
                "reload: {names} changed; that takes effect when the daemon restarts",
                names=", ".join(name for name, _ in kept),
            )
            config = replace(config, **{field: getattr(self.config, field) for _, field in kept})
        self.source, self.config = source, config
        self._reloading = self.server.reload(source, config)
        self._reloading.addBoth(self._reloaded)
        return self._reloading

    def _reloaded(self, result: object) -> None:
        self._reloading = None
        if isinstance(result, Failure):
            log.failure("reload failed", result)
        if self._reload_again:
            self._reload_again = False
            self.reload()

    @override
    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        done = self.sockets.close()
        done.addCallback(lambda _: self.server.stop() if self._serving else None)
        done.addCallback(lambda _: self.supervised.stop())
        return done
