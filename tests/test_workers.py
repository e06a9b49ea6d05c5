"""Tests for txmilt.workers: spawning, replacing, rolling and stopping worker processes (no real processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import cast

from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, eventAsJSON
from twisted.trial.unittest import SynchronousTestCase

from tests.fakeprocess import FakeProcess, ProcessClock
from tests.test_protocol import LogCapture
from txmilt.config import ConfigSource
from txmilt.workers import FIRST_SOCKET_FD, KILL_GRACE, LOG_FD, READY_TIMEOUT, STATUS_FD, YOUNG, WorkerPool

STAMP = "examples.header_stamp:HeaderStamp"


class HandedSockets:
    """Stands in for BoundSockets: two bound sockets to hand over."""

    def handed(self) -> list[tuple[int, int]]:
        return [(7, socket.AF_INET), (8, socket.AF_UNIX)]


def source(workers: int = 2, generation: str = "") -> ConfigSource:
    options = {"workers": workers, "drain_timeout": 10.0}
    if generation:
        options["idle_timeout"] = float(len(generation))  # something to tell the configurations apart
    return ConfigSource(None, None, options, (STAMP,))


def setup(process: FakeProcess) -> dict[str, object]:
    """The setup line the pool wrote to a worker's stdin."""
    data: dict[str, object] = json.loads(process.written[0])
    return data


def ready(process: FakeProcess) -> None:
    process.protocol.childDataReceived(STATUS_FD, b"re")
    process.protocol.childDataReceived(STATUS_FD, b"ady\n")


class PoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = ProcessClock()
        self.logs = LogCapture(self)
        self.source = source()
        self.pool = WorkerPool(self.source, self.source.build(), self.clock)

    def serve(self) -> list[FakeProcess]:
        self.pool.serve(HandedSockets())  # type: ignore[arg-type]
        for process in self.clock.processes:
            ready(process)
        return list(self.clock.processes)


class StartTests(PoolTestCase):
    """Workers are spawned with the sockets and the configuration the daemon checked."""

    def test_spawned_with_sockets_and_setup(self) -> None:
        """Each worker gets the bound sockets from fd 5 on, pipes below, and its setup as one JSON line."""
        self.patch(os, "environ", {**os.environ, "LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b"})
        first, second = self.serve()
        self.assertEqual(first.executable, sys.executable)
        self.assertEqual(first.args[:2], [sys.executable, "-c"])
        self.assertEqual(
            first.child_fds,
            {0: "w", 1: "r", 2: "r", LOG_FD: "r", STATUS_FD: "r", FIRST_SOCKET_FD: 7, FIRST_SOCKET_FD + 1: 8},
        )
        assert first.env is not None
        self.assertFalse({"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(first.env))
        self.assertEqual(first.env["PATH"], os.environ["PATH"])
        written = setup(first)
        self.assertEqual(first.written[0].count(b"\n"), 1)
        self.assertEqual(
            (written["slot"], written["sockets"], written["metrics"], written["path"]),
            (1, [[5, socket.AF_INET], [6, socket.AF_UNIX]], False, sys.path),
        )
        self.assertEqual(ConfigSource.from_json(str(written["source"])), self.source)
        self.assertEqual(setup(second)["slot"], 2)
        self.assertEqual(self.logs.matching("serving with 2 workers (pids 1000, 1001)"), [self.logs.lines()[-1]])

    def test_not_ready_is_killed(self) -> None:
        """A worker that does not say it is ready within READY_TIMEOUT is killed, and replaced."""
        self.pool.serve(HandedSockets())  # type: ignore[arg-type]
        first, second = self.clock.processes
        ready(second)
        self.clock.advance(READY_TIMEOUT)
        self.assertEqual((first.signals, second.signals), (["KILL"], []))
        self.assertEqual(len(self.logs.matching("worker 1 (pid 1000) does not accept connections 30s after")), 1)
        first.end(signal=signal.SIGKILL)
        self.clock.advance(1)
        self.assertEqual(len(self.clock.running()), 2)


class ReplaceTests(PoolTestCase):
    """A worker that dies is replaced, with one log line, after a delay that grows while it dies young."""

    def test_replaced_with_one_line(self) -> None:
        """A killed worker gets a successor in its slot; the other is left alone."""
        first, second = self.serve()
        self.clock.advance(YOUNG)
        first.end(signal=signal.SIGKILL)
        lines = self.logs.matching("pid 1000")
        self.assertEqual(lines, ["worker 1 (pid 1000) was killed by SIGKILL; starting another in 0s"])
        self.clock.advance(0)
        (new,) = self.clock.running()[1:]
        self.assertEqual((setup(new)["slot"], second.signals), (1, []))

    def test_backoff_while_dying_young(self) -> None:
        """Deaths within YOUNG seconds of starting wait 1, 2, 4 s...; a longer life resets the delay."""
        self.serve()
        delays = []
        for _ in range(4):
            (process,) = [p for p in self.clock.running() if setup(p)["slot"] == 1]
            process.end(status=1)
            delays.append(self.logs.lines()[-1].rsplit(" ", 1)[1])
            self.clock.advance(float(delays[-1].rstrip("s")))
        self.assertEqual(delays, ["1s", "2s", "4s", "8s"])
        (process,) = [p for p in self.clock.running() if setup(p)["slot"] == 1]
        self.clock.advance(YOUNG)
        process.end(status=1)
        self.assertTrue(self.logs.lines()[-1].endswith("exited with status 1; starting another in 0s"))


class ReloadTests(PoolTestCase):
    """A reload replaces the workers one at a time; each old one is asked to finish its connections."""

    def test_one_at_a_time(self) -> None:
        """The next old worker is stopped only once its successor accepts connections."""
        first, second = self.serve()
        new_source = source(generation="two")
        done = self.pool.reload(new_source, new_source.build())
        (new_first,) = self.clock.processes[2:]
        self.assertEqual((setup(new_first)["slot"], ConfigSource.from_json(str(setup(new_first)["source"]))),
                         (1, new_source))
        self.assertEqual((first.signals, second.signals), ([], []))
        ready(new_first)
        self.assertEqual((first.signals, second.signals), (["TERM"], []))
        (new_second,) = self.clock.processes[3:]
        self.assertNoResult(done)
        ready(new_second)
        self.assertEqual(second.signals, ["TERM"])
        self.successResultOf(done)
        self.assertEqual(len(self.logs.matching("reloaded", "2 workers (pids 1002, 1003)")), 1)
        first.end()
        second.end()
        self.clock.advance(60)
        self.assertEqual(self.clock.running(), [new_first, new_second])  # the old ones are not replaced

    def test_failed_worker_stops_the_reload(self) -> None:
        """A new worker that exits before accepting stops the reload; the old workers serve on, as before."""
        first, second = self.serve()
        new_source = source(generation="two")
        done = self.pool.reload(new_source, new_source.build())
        (new_first,) = self.clock.processes[2:]
        new_first.end(status=2)
        self.successResultOf(done)
        self.assertEqual((first.signals, second.signals), ([], []))
        (line,) = self.logs.matching("reload stopped")
        self.assertIn("worker 1 (pid 1002) exited with status 2", line)
        self.assertIn("0 of 2 workers serve it", line)
        self.assertEqual(self.logs.matching("pid 1002) exited with status 2; starting another"), [])
        self.clock.advance(YOUNG)
        first.end(signal=signal.SIGKILL)
        self.clock.advance(0)
        self.assertEqual(ConfigSource.from_json(str(setup(self.clock.processes[-1])["source"])), self.source)

    def test_more_workers(self) -> None:
        """A reload to three workers replaces two and adds one."""
        first, second = self.serve()
        new_source = source(workers=3)
        done = self.pool.reload(new_source, new_source.build())
        for _ in range(3):
            ready(self.clock.processes[-1])
        self.successResultOf(done)
        self.assertEqual([setup(p)["slot"] for p in self.clock.processes[2:]], [1, 2, 3])
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))

    def test_fewer_workers(self) -> None:
        """A reload to one worker replaces the first and stops the second."""
        first, second = self.serve()
        new_source = source(workers=1)
        done = self.pool.reload(new_source, new_source.build())
        ready(self.clock.processes[-1])
        self.successResultOf(done)
        self.assertEqual(len(self.clock.processes), 3)
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))


class StopTests(PoolTestCase):
    """Stopping asks every worker to drain, kills the ones past their deadline, and replaces none."""

    def test_stop(self) -> None:
        """SIGTERM to all; SIGKILL drain_timeout + KILL_GRACE later to those still running."""
        first, second = self.serve()
        done = self.pool.stop()
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))
        first.end()
        self.clock.advance(10 + KILL_GRACE)
        self.assertEqual(second.signals, ["TERM", "KILL"])
        self.assertEqual(len(self.logs.matching("worker 2 (pid 1001) is still running past its drain deadline")), 1)
        self.assertNoResult(done)
        second.end(signal=signal.SIGKILL)
        self.successResultOf(done)
        self.clock.advance(60)
        self.assertEqual(self.clock.running(), [])

    def test_stop_without_workers(self) -> None:
        """Stopping before serving fires at once."""
        self.successResultOf(self.pool.stop())


class RelayTests(PoolTestCase):
    """A worker's log events and output reach the daemon's log, naming the worker."""

    def test_events(self) -> None:
        """JSON events, however they are split, are logged with their level, prefixed by the worker."""
        (first, _) = self.serve()
        events: list[LogEvent] = []
        Logger(namespace="txmilt.protocol", observer=cast(ILogObserver, events.append)).warn("[c1] {what}", what="idle")
        record = ("\x1e" + eventAsJSON(events[0]) + "\n").encode()
        first.protocol.childDataReceived(LOG_FD, record[:10])
        first.protocol.childDataReceived(LOG_FD, record[10:] + b"\x1e{broken\n")
        relayed = [event for event in self.logs.events if event.get("log_system", "").startswith("worker 1")]
        self.assertEqual(len(relayed), 1)
        self.assertEqual(relayed[0]["log_system"], "worker 1 pid 1000: txmilt.protocol#warn")
        self.assertEqual(relayed[0]["log_level"], LogLevel.warn)
        self.assertEqual(self.logs.matching("[c1] idle"), ["[c1] idle"])
        self.assertEqual(len(self.logs.matching("worker 1 (pid 1000) sent a damaged log event")), 1)

    def test_output(self) -> None:
        """What a worker writes to stdout or stderr is logged line by line, the last line when it exits."""
        (first, _) = self.serve()
        first.protocol.childDataReceived(2, b"Fatal Python error\nsecond")
        first.end(status=1)
        self.assertEqual(len(self.logs.matching("worker 1 (pid 1000) wrote: Fatal Python error")), 1)
        self.assertEqual(len(self.logs.matching("worker 1 (pid 1000) wrote: second")), 1)
