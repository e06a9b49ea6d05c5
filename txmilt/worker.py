"""A worker process: serves the sockets the daemon handed it, with the configuration the daemon checked.

The daemon starts it (txmilt.workers), never a user. It logs through the
daemon, stops on SIGTERM like the daemon does (stop accepting, finish open
connections within the drain deadline), ignores SIGHUP (the daemon reloads by
replacing workers), and stops by itself when the daemon is gone.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.python.failure import Failure
from typing_extensions import override

from txmilt.config import ConfigSource, DaemonConfig
from txmilt.daemon import DrainService
from txmilt.errors import ConfigurationError
from txmilt.protocol import MilterFactory
from txmilt.sockets import adopt, close_ports
from txmilt.workers import LOG_FD, STATUS_FD

log = Logger()
#: Seconds between updates of the open-connections gauge (prometheus_client's multiprocess mode has no callbacks).
GAUGE_INTERVAL = 1.0


class _DaemonWatch(FileDescriptor):
    """Stops the worker when its stdin, a pipe the daemon keeps open, reaches its end."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self._reactor: Any = reactor
        os.set_blocking(0, False)

    @override
    def fileno(self) -> int:
        return 0

    @override
    def doRead(self) -> Failure | None:
        try:
            data = os.read(0, 4096)  # nothing should come
        except BlockingIOError:
            return None
        return None if data else Failure(CONNECTION_DONE)

    @override
    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        if self._reactor.running:
            log.warn("the daemon has exited; stopping")
            self._reactor.stop()


def serve(config: DaemonConfig, setup: Mapping[str, Any], reactor: Any) -> MilterFactory:
    """Serve the handed sockets with ``config``; on shutdown, stop accepting and drain."""
    observer = None
    if setup["metrics"]:
        from txmilt.metrics import MetricsObserver

        observer = MetricsObserver()
    factory = MilterFactory(config.filters, reactor, observer=observer, **config.factory_keywords())
    ports: list[IListeningPort] = []
    for fd, family in setup["sockets"]:
        ports.append(adopt(reactor, fd, family, factory))
        os.close(fd)
    drain = DrainService(factory, config.drain_timeout, reactor)

    def stop() -> Deferred[None]:
        closed = close_ports(ports)
        drained = drain.stopService() or succeed(None)
        done: Deferred[None] = gatherResults([closed, drained]).addCallback(lambda _: None)
        return done

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    if observer is not None:
        gauge = observer.open_connections
        LoopingCall(lambda: gauge.set(len(factory.connections))).start(GAUGE_INTERVAL)
    _DaemonWatch(reactor).startReading()  # type: ignore[no-untyped-call]
    return factory


def main(setup: Mapping[str, Any]) -> None:
    """Run a worker from the setup the daemon wrote (see txmilt.workers)."""
    events = open(LOG_FD, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 (open for the process's life)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(events)], redirectStandardIO=True)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from twisted.internet import reactor

    try:
        config = ConfigSource.from_json(setup["source"]).build(check_listen=False)
    except ConfigurationError as e:
        log.critical("cannot serve this configuration: {error}", error=str(e))
        raise SystemExit(2) from None
    serve(config, setup, reactor)
    with open(STATUS_FD, "wb", buffering=0) as status:
        status.write(b"ready\n")
    reactor.run()
