"""Tests for txmilt.supervise: starting, waiting for, restarting and stopping external milters (no real processes)."""

from __future__ import annotations

import os
import signal

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from tests.fakeprocess import ProcessClock
from tests.test_protocol import LogCapture
from txmilt.children import child_environment, exit_reason
from txmilt.config import SupervisedCommand
from txmilt.supervise import PROBE_INTERVAL, STOP_TIMEOUT, YOUNG, SupervisedMilters

DKIM = SupervisedCommand(
    "opendkim", "inet:8892@127.0.0.1", ("opendkim", "-f", "-x", "/etc/opendkim.conf"), (("TZ", "UTC"),),
    restart_delay=2.0, start_timeout=5.0,
)


class Connects:
    """A probe that is refused ``refusals`` times, then accepted."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.calls: list[tuple[str, float]] = []

    def __call__(self, address: str, timeout: float) -> Deferred[None]:
        self.calls.append((address, timeout))
        if len(self.calls) <= self.refusals:
            return fail(ConnectionRefusedError())
        return succeed(None)


class SuperviseTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = ProcessClock()
        self.logs = LogCapture(self)

    def milters(self, refusals: int = 0) -> SupervisedMilters:
        return SupervisedMilters([DKIM], self.clock, Connects(refusals))


class StartTests(SuperviseTestCase):
    """The milter starts with the daemon's environment, and the daemon waits until it accepts connections."""

    def test_started_with_environment(self) -> None:
        """The command runs with the daemon's environment plus env, without socket activation's variables."""
        self.patch(os, "environ", {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"})
        self.successResultOf(self.milters().start())
        (process,) = self.clock.processes
        self.assertEqual(process.executable, "opendkim")
        self.assertEqual(process.args, ["opendkim", "-f", "-x", "/etc/opendkim.conf"])
        self.assertEqual(process.env, child_environment([("TZ", "UTC")]))
        assert process.env is not None
        self.assertEqual(process.env["TZ"], "UTC")
        self.assertNotIn("LISTEN_FDS", process.env)
        self.assertEqual(len(self.logs.matching("started supervised milter opendkim (pid 1000): opendkim -f -x")), 1)
        self.assertEqual(len(self.logs.matching("opendkim accepts connections at inet:8892@127.0.0.1")), 1)

    def test_waits_until_accepting(self) -> None:
        """Refused connections are tried again every PROBE_INTERVAL until one is accepted."""
        connects = Connects(3)
        started = SupervisedMilters([DKIM], self.clock, connects).start()
        self.clock.pump([PROBE_INTERVAL] * 2)
        self.assertNoResult(started)
        self.clock.pump([PROBE_INTERVAL] * 2)
        self.successResultOf(started)
        self.assertEqual([address for address, _ in connects.calls], [DKIM.address] * 4)

    def test_serves_without_it_after_start_timeout(self) -> None:
        """A milter that never accepts holds the daemon back start_timeout seconds, with one warning."""
        started = self.milters(refusals=1000).start()
        self.clock.pump([PROBE_INTERVAL] * int(DKIM.start_timeout / PROBE_INTERVAL - 2))
        self.assertNoResult(started)
        self.clock.pump([PROBE_INTERVAL] * 3)
        self.successResultOf(started)
        warnings = self.logs.matching("opendkim does not accept connections", "after 5s; serving without it")
        self.assertEqual(len(warnings), 1)


class RestartTests(SuperviseTestCase):
    """A milter that dies is started again, with one log line, after a delay that grows while it dies young."""

    def test_restart_delays(self) -> None:
        """Young deaths wait restart_delay, then twice that...; a milter that lived YOUNG seconds comes back at once."""
        self.milters().start()
        lines = []
        for delay in (2.0, 4.0, 8.0):
            self.clock.running()[0].end(signal=signal.SIGKILL)
            lines.append(self.logs.lines()[-1])
            self.assertEqual(len(self.clock.running()), 0)
            self.clock.advance(delay)
            self.assertEqual(len(self.clock.running()), 1)
        self.assertEqual(
            [line.split(";")[1] for line in lines],
            [" restarting it in 2s (its filter gets its fallback until it accepts connections again)"]
            + [f" restarting it in {d}s (its filter gets its fallback until it accepts connections again)"
               for d in ("4", "8")],
        )
        self.assertTrue(lines[0].startswith("supervised milter opendkim (pid 1000) was killed by SIGKILL"))
        self.clock.advance(YOUNG)
        self.clock.running()[0].end(status=1)
        self.assertIn("(pid 1003) exited with status 1; restarting it in 0s", self.logs.lines()[-1])
        self.clock.advance(0)
        self.assertEqual(len(self.clock.running()), 1)

    def test_output_logged(self) -> None:
        """What the milter writes is logged line by line (and no empty line when it exits)."""
        self.milters().start()
        (process,) = self.clock.processes
        process.protocol.outReceived(b"opendkim: key loaded\n")
        process.protocol.errReceived(b"warning: something\n")
        before = len(self.logs.lines())
        process.end()
        self.assertEqual(
            self.logs.matching("[opendkim] "), ["[opendkim] opendkim: key loaded", "[opendkim] warning: something"]
        )
        self.assertEqual(len(self.logs.lines()), before + 1)


class StopTests(SuperviseTestCase):
    """Stopping sends SIGTERM, SIGKILL after STOP_TIMEOUT, and fires once the milter has exited."""

    def test_stop(self) -> None:
        milters = self.milters()
        milters.start()
        (process,) = self.clock.processes
        stopped = milters.stop()
        self.assertEqual(process.signals, ["TERM"])
        self.clock.advance(STOP_TIMEOUT)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        process.end(signal=signal.SIGKILL)
        self.successResultOf(stopped)
        self.assertEqual(
            self.logs.lines()[-1], "supervised milter opendkim (pid 1000) stopped: it was killed by SIGKILL"
        )
        self.clock.advance(60)
        self.assertEqual(self.clock.running(), [])

    def test_stop_while_waiting_to_restart(self) -> None:
        """A milter that is down when the daemon stops is not started again."""
        milters = self.milters()
        milters.start()
        self.clock.processes[0].end(status=1)
        self.successResultOf(milters.stop())
        self.clock.advance(60)
        self.assertEqual(len(self.clock.processes), 1)


class ExitReasonTests(SynchronousTestCase):
    """exit_reason says how a child ended."""

    def test_reasons(self) -> None:
        from twisted.internet.error import ProcessDone, ProcessTerminated
        from twisted.python.failure import Failure

        self.assertEqual(exit_reason(Failure(ProcessDone(0))), "exited with status 0")
        self.assertEqual(exit_reason(Failure(ProcessTerminated(3))), "exited with status 3")
        self.assertEqual(exit_reason(Failure(ProcessTerminated(None, 15))), "was killed by SIGTERM")
        self.assertEqual(exit_reason(Failure(ProcessTerminated(None, 99))), "was killed by signal 99")
        self.assertEqual(exit_reason(None), "exited")
