"""External milters the daemon runs itself: started before it serves, restarted when they die, stopped last.

A ``remote`` filter with ``command = [...]`` names the program that serves its
address. Each runs under its own ``twisted.runner.procmon.ProcessMonitor``,
which restarts it when it dies and doubles the delay while it keeps dying
young. While it is down its filter fails to connect and gets its fallback, as
for any unreachable remote milter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor
from typing_extensions import override

from txmilt.children import child_environment, exit_reason
from txmilt.client import milter_endpoint
from txmilt.config import SupervisedCommand

log = Logger()

#: A milter that dies younger than this (seconds) is restarted after a delay that doubles each time.
YOUNG = 10.0
#: The longest delay between restarts, in seconds (or restart_delay, if longer).
MAX_RESTART_DELAY = 60.0
#: Seconds from SIGTERM to SIGKILL when stopping (libmilter looks at its signals every 5 s).
STOP_TIMEOUT = 10.0
#: Seconds between attempts to connect to a milter that is starting.
PROBE_INTERVAL = 0.1


class _Output(Logger):
    """Logs a supervised milter's output lines, but not the empty one procmon adds when it exits."""

    @override
    def info(self, format: str | None = None, **kwargs: object) -> None:
        if kwargs.get("line") != "":
            super().info(format, **kwargs)


class _Monitor(ProcessMonitor):
    """A ProcessMonitor for one milter: one log line per exit, and a Deferred for the exit when stopping."""

    log = _Output()

    def __init__(self, supervised: SupervisedCommand, reactor: Any) -> None:
        super().__init__(reactor)
        self.supervised = supervised
        self.threshold = YOUNG  # type: ignore[assignment]
        self.killTime = STOP_TIMEOUT  # type: ignore[assignment]
        self.minRestartDelay = supervised.restart_delay  # type: ignore[assignment]
        self.maxRestartDelay = max(MAX_RESTART_DELAY, supervised.restart_delay)  # type: ignore[assignment]
        self.pid: int | None = None
        self._started_once = False
        self._exits: list[Deferred[None]] = []
        self.addProcess(supervised.name, list(supervised.command), env=child_environment(supervised.env))

    @override
    def startProcess(self, name: str) -> None:
        super().startProcess(name)
        protocol = self.protocols.get(name)
        self.pid = getattr(protocol.transport, "pid", None) if protocol is not None else None
        if self.pid is None:
            return
        if self._started_once:
            self.log.debug("restarted supervised milter {name} (pid {pid})", name=name, pid=self.pid)
        else:
            self._started_once = True
            self.log.info(
                "started supervised milter {name} (pid {pid}): {command}",
                name=name, pid=self.pid, command=" ".join(self.supervised.command),
            )

    @override
    def _monitoredProcessExited(self, name: str, reason: Failure | None = None) -> None:
        pid, self.pid = self.pid, None
        super()._monitoredProcessExited(name, reason)
        how = exit_reason(reason)
        if self.running:
            restart = self.restart.get(name)
            delay = max(0.0, restart.getTime() - self._clock.seconds()) if restart and restart.active() else 0.0
            self.log.warn(
                "supervised milter {name} (pid {pid}) {how}; restarting it in {delay:.2g}s (its filter gets its"
                " fallback until it accepts connections again)",
                name=name, pid=pid, how=how, delay=delay,
            )
        else:
            self.log.info("supervised milter {name} (pid {pid}) stopped: it {how}", name=name, pid=pid, how=how)
        exits, self._exits = self._exits, []
        for exited in exits:
            exited.callback(None)

    def stop(self) -> Deferred[None]:
        """Stop the milter (SIGTERM, SIGKILL after STOP_TIMEOUT) and stop restarting it; fires once it exited."""
        running = self.supervised.name in self.protocols
        self.stopService()
        if not running:
            return succeed(None)
        exited: Deferred[None] = Deferred()
        self._exits.append(exited)
        return exited


def probe(reactor: Any, address: str, timeout: float) -> Deferred[None]:
    """Fires once a connection to ``address`` is accepted (and closed again); fails if it is not."""
    def close(protocol: Any) -> None:
        protocol.transport.loseConnection()

    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    connected: Deferred[Any] = milter_endpoint(address, reactor, timeout).connect(factory)
    closed: Deferred[None] = connected.addCallback(close)
    return closed


class SupervisedMilters:
    """The configuration's external milters, each under its own monitor."""

    def __init__(
        self,
        commands: Sequence[SupervisedCommand],
        reactor: Any,
        connect: Callable[[str, float], Deferred[None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._connect = connect or (lambda address, timeout: probe(reactor, address, timeout))
        self.monitors = [_Monitor(command, reactor) for command in commands]

    def start(self) -> Deferred[None]:
        """Start every milter; fires once each accepts connections at its address or its start_timeout passed."""
        waits = []
        for monitor in self.monitors:
            monitor.startService()
            waits.append(Deferred.fromCoroutine(self._accepting(monitor.supervised)))
        done: Deferred[None] = gatherResults(waits).addCallback(lambda _: None)
        return done

    async def _accepting(self, supervised: SupervisedCommand) -> None:
        clock = self._reactor
        deadline = clock.seconds() + supervised.start_timeout
        while True:
            left = deadline - clock.seconds()
            try:
                await self._connect(supervised.address, max(min(left, 2.0), 0.1))
            except Exception:
                if clock.seconds() + PROBE_INTERVAL > deadline:
                    log.warn(
                        "supervised milter {name} does not accept connections at {address} after {timeout:g}s;"
                        " serving without it (its filter gets its fallback until it does)",
                        name=supervised.name, address=supervised.address, timeout=supervised.start_timeout,
                    )
                    return
                await deferLater(clock, PROBE_INTERVAL)
            else:
                log.info(
                    "supervised milter {name} accepts connections at {address}",
                    name=supervised.name, address=supervised.address,
                )
                return

    def stop(self) -> Deferred[None]:
        """Stop every milter; fires once all have exited."""
        done: Deferred[None] = gatherResults([monitor.stop() for monitor in self.monitors]).addCallback(
            lambda _: None
        )
        return done
