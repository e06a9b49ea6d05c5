"""Worker processes: N processes serving the daemon's bound sockets, replaced when they die, rolled on reload.

The daemon spawns each worker with ``spawnProcess(childFDs=...)``, handing it
the bound listening sockets as file descriptors 5 and up; the worker adopts
them (``txmilt.sockets.adopt``), so every worker accepts from the same kernel
queue and nothing is refused while one of them is replaced. A worker reads its
setup (the configuration source the daemon checked, its sockets) as one JSON
line on stdin and keeps stdin open: when the daemon is gone it stops. It sends
its log events as JSON on fd 3, which the daemon logs as its own, and "ready"
on fd 4 once it accepts connections.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from typing_extensions import override

from txmilt.children import child_environment, exit_reason
from txmilt.config import ConfigSource, DaemonConfig
from txmilt.errors import MilterError
from txmilt.sockets import BoundSockets

log = Logger()

#: A worker's file descriptors besides stdin, stdout and stderr: log events, status lines, then the sockets.
LOG_FD = 3
STATUS_FD = 4
FIRST_SOCKET_FD = 5
#: Seconds a new worker has to accept connections before it is killed.
READY_TIMEOUT = 30.0
#: A worker that dies younger than this (seconds) is replaced after a delay that doubles each time.
YOUNG = 10.0
MAX_RESPAWN_DELAY = 30.0
#: Seconds past its drain deadline after which a stopping worker is killed.
KILL_GRACE = 5.0
#: Run in ``python -c``: the worker gets the daemon's module path before importing anything of txmilt.
_BOOTSTRAP = (
    "import json, sys; setup = json.loads(sys.stdin.readline()); sys.path[:] = setup['path'];"
    " from txmilt.worker import main; main(setup)"
)


class WorkerStartError(MilterError):
    """A worker exited before it accepted connections."""


class _Worker(ProcessProtocol):
    """One worker process: its setup, its log events and output, whether it serves, when it ends."""

    def __init__(self, pool: WorkerPool, slot: int, setup: bytes) -> None:
        self.pool = pool
        self.slot = slot
        self.setup = setup
        self.pid: int | None = None
        self.started = pool.clock.seconds()
        #: Replace this worker if it dies (not while it is a reload's candidate, nor once it is asked to stop).
        self.replace_on_exit = True
        self.retiring = False
        #: Whether it reported that it accepts connections.
        self.ready = False
        #: Why it ended, once it has.
        self.end: Failure | None = None
        self._ready_waiters: list[Deferred[None]] = []
        self._end_waiters: list[Deferred[None]] = []
        self._kill: IDelayedCall | None = None
        self._pending: dict[int, bytes] = {}

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.writeToChild(0, self.setup)
        self._kill = self.pool.clock.callLater(READY_TIMEOUT, self._not_ready)

    def _not_ready(self) -> None:
        self._kill = None
        log.error(
            "worker {slot} (pid {pid}) does not accept connections {timeout:g}s after starting; killing it",
            slot=self.slot, pid=self.pid, timeout=READY_TIMEOUT,
        )
        self.signal("KILL")

    def signal(self, name: str) -> None:
        """Send the signal ``name`` ("TERM", "KILL") unless the process has exited."""
        if self.transport is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess(name)

    def retire(self, grace: float) -> None:
        """Ask the worker to stop (SIGTERM: it finishes open connections); kill it ``grace`` seconds on."""
        self.replace_on_exit = False
        if self.retiring:
            return
        self.retiring = True
        self.signal("TERM")
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._kill = self.pool.clock.callLater(grace, self._overdue)

    def _overdue(self) -> None:
        self._kill = None
        log.warn("worker {slot} (pid {pid}) is still running past its drain deadline; killing it",
                 slot=self.slot, pid=self.pid)
        self.signal("KILL")

    @override
    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._pending.get(childFD, b"") + data).split(b"\n")
        self._pending[childFD] = lines.pop()
        for line in lines:
            self._line(childFD, line)

    def _line(self, fd: int, line: bytes) -> None:
        if fd == LOG_FD:
            record = line.strip(b"\x1e").decode("utf-8", "replace")
            if record:
                self._relay(record)
        elif fd == STATUS_FD:
            if line == b"ready" and not self.ready:
                self.ready = True
                if self._kill is not None and self._kill.active():
                    self._kill.cancel()
                waiters, self._ready_waiters = self._ready_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
        elif line:
            text = line.decode("utf-8", "replace")
            log.warn("worker {slot} (pid {pid}) wrote: {text}", slot=self.slot, pid=self.pid, text=text)

    def _relay(self, record: str) -> None:
        """Log an event the worker logged, naming the worker."""
        try:
            event = eventFromJSON(record)
        except ValueError:
            log.warn("worker {slot} (pid {pid}) sent a damaged log event: {record!r}",
                     slot=self.slot, pid=self.pid, record=record)
            return
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        event["log_system"] = f"worker {self.slot} pid {self.pid}: {system}"
        globalLogPublisher(event)

    @override
    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._pending.items():
            if rest:
                self._line(fd, rest)
        self._pending.clear()
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self.end = reason
        self.pool.ended(self, reason)
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.errback(self._start_error())
        waiters, self._end_waiters = self._end_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _start_error(self) -> WorkerStartError:
        return WorkerStartError(f"worker {self.slot} (pid {self.pid}) {exit_reason(self.end)}")

    def when_ready(self) -> Deferred[None]:
        """Fires once the worker accepts connections; fails with WorkerStartError if it exits first."""
        if self.ready:
            return succeed(None)
        if self.end is not None:
            return fail(self._start_error())
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    def when_ended(self) -> Deferred[None]:
        """Fires once the worker has exited."""
        if self.end is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._end_waiters.append(waiter)
        return waiter


class WorkerPool:
    """N worker processes serving the daemon's bound sockets (the daemon itself accepts nothing)."""

    #: The bound sockets' factory in the daemon, which never accepts on them.
    factory: Factory[Any] = Factory()
    factory.noisy = False

    def __init__(self, source: ConfigSource, config: DaemonConfig, reactor: Any) -> None:
        self.clock = reactor
        self._reactor = reactor
        self._source = source
        self._count = config.workers
        self._drain_timeout = config.drain_timeout
        self._metrics = Resource() if config.metrics else None
        self._metrics_directory: str | None = None
        self._handed: list[tuple[int, int]] = []
        self._running = False
        self._respawns: dict[int, IDelayedCall] = {}
        self._backoff: dict[int, float] = {}
        self.workers: list[_Worker] = []

    def serve(self, sockets: BoundSockets) -> None:
        """Start the workers, handing each the bound sockets."""
        self._handed = sockets.handed()
        self._running = True
        if self._metrics is not None:
            from txmilt.metrics import serve_registry, workers_registry

            self._metrics_directory = tempfile.mkdtemp(prefix="txmilt-metrics-")
            serve_registry(self._metrics, workers_registry(self._metrics_directory))
        started = [self._start(slot) for slot in range(1, self._count + 1)]
        gatherResults([worker.when_ready() for worker in started], consumeErrors=True).addCallbacks(
            lambda _: log.info(
                "serving with {count} workers (pids {pids})", count=len(started),
                pids=", ".join(str(worker.pid) for worker in started),
            ),
            lambda _: None,  # each failure was logged as that worker ended
        )

    def _start(self, slot: int) -> _Worker:
        setup = {
            "path": sys.path, "slot": slot, "source": self._source.to_json(),
            "sockets": [[FIRST_SOCKET_FD + index, family] for index, (_, family) in enumerate(self._handed)],
            "metrics": self._metrics is not None,
        }
        worker = _Worker(self, slot, json.dumps(setup).encode() + b"\n")
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r", LOG_FD: "r", STATUS_FD: "r"}
        for index, (fd, _) in enumerate(self._handed):
            child_fds[FIRST_SOCKET_FD + index] = fd
        extra = [("PROMETHEUS_MULTIPROC_DIR", self._metrics_directory)] if self._metrics_directory else []
        self.workers.append(worker)
        self._reactor.spawnProcess(
            worker, sys.executable, [sys.executable, "-c", _BOOTSTRAP], env=child_environment(extra),
            childFDs=child_fds,
        )
        return worker

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: forget it, and start another in its place unless it was asked to stop."""
        self.workers.remove(worker)
        if self._metrics_directory is not None and worker.pid is not None:
            from txmilt.metrics import forget_worker

            forget_worker(worker.pid, self._metrics_directory)
        if not (self._running and worker.replace_on_exit):
            return
        slot = worker.slot
        if self.clock.seconds() - worker.started < YOUNG:
            delay = self._backoff.get(slot, 1.0)
            self._backoff[slot] = min(delay * 2, MAX_RESPAWN_DELAY)
        else:
            delay = 0.0
            self._backoff.pop(slot, None)
        log.warn(
            "worker {slot} (pid {pid}) {how}; starting another in {delay:g}s",
            slot=slot, pid=worker.pid, how=exit_reason(reason), delay=delay,
        )
        self._respawns[slot] = self.clock.callLater(delay, self._respawn, slot)

    def _respawn(self, slot: int) -> None:
        del self._respawns[slot]
        if self._running:
            self._start(slot)

    def reload(self, source: ConfigSource, config: DaemonConfig) -> Deferred[None]:
        """Replace the workers one at a time with workers of ``config``; each old one finishes its connections."""
        return Deferred.fromCoroutine(self._roll(source, config))

    async def _roll(self, source: ConfigSource, config: DaemonConfig) -> None:
        previous = self._source
        self._source, self._drain_timeout = source, config.drain_timeout
        count = config.workers
        slots = max(count, self._count)
        self._count = count
        for slot, call in list(self._respawns.items()):
            if slot > count:
                call.cancel()
                del self._respawns[slot]
        fresh: list[_Worker] = []
        for slot in range(1, slots + 1):
            if not self.serving():
                return
            new = None
            if slot <= count:
                new = self._start(slot)
                new.replace_on_exit = False
                try:
                    await new.when_ready()
                except WorkerStartError as e:
                    if not self.serving():
                        return  # stopped meanwhile
                    if not fresh:
                        self._source = previous
                    log.error(
                        "reload stopped: {error} before accepting connections with the new configuration;"
                        " {done} of {count} workers serve it, the others the previous one",
                        error=str(e), done=len(fresh), count=count,
                    )
                    return
                new.replace_on_exit = True
                fresh.append(new)
            for old in [worker for worker in self.workers if worker.slot == slot and worker is not new]:
                old.retire(self._drain_timeout + KILL_GRACE)
        log.info(
            "reloaded {path}: {count} workers (pids {pids}) serve the new configuration; the previous ones"
            " finish their open connections", path=source.origin, count=len(fresh),
            pids=", ".join(str(worker.pid) for worker in fresh),
        )

    def stop(self) -> Deferred[None]:
        """Stop every worker: each stops accepting and finishes its connections within the drain deadline."""
        self._running = False
        for call in self._respawns.values():
            call.cancel()
        self._respawns.clear()
        workers = list(self.workers)
        for worker in workers:
            worker.retire(self._drain_timeout + KILL_GRACE)
        done: Deferred[None] = gatherResults([worker.when_ended() for worker in workers]).addCallback(
            self._remove_metrics
        )
        return done

    def _remove_metrics(self, _: object = None) -> None:
        if self._metrics_directory is not None:
            shutil.rmtree(self._metrics_directory, ignore_errors=True)
            self._metrics_directory = None

    def metrics(self) -> Resource:
        """The workers' metrics, summed (served once the workers run)."""
        assert self._metrics is not None
        return self._metrics

    def serving(self) -> bool:
        """Whether the workers serve (they were started and not stopped).

        A method, not the attribute, so that type checkers read it afresh after an ``await``.
        """
        return self._running


