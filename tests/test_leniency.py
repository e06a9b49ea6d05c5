"""Where txmilt is as lenient as libmilter, and the frame deadline that stops a trickling client."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_protocol import LogCapture
from txmilt.codec import frame
from txmilt.messages import Continue, MailFrom, RcptTo, Reject
from txmilt.protocol import MilterFactory
from txmilt.testing import SENDMAIL, FakeMTA, RecordingMilter

RCPT = ["<b@example.net>"]


class MacroDamageTests(SynchronousTestCase):
    def test_logged_once_and_ignored(self) -> None:
        """Damaged macro packets keep their whole pairs, are logged once per connection, and do not end it."""
        logs = LogCapture(self)
        recorder = RecordingMilter()
        mta = FakeMTA([lambda: recorder])
        mta.negotiate()
        mta.send_raw(frame("D", b"Cj\0mx.example\0_\0"))  # a name without a value
        self.assertEqual(mta.connect(), [Continue()])
        mta.send_raw(frame("D", b"Hx\0y\0tail-without-nul"))
        self.assertEqual(mta.helo(), [Continue()])
        self.assertTrue(mta.connected)
        self.assertEqual(recorder.calls[0].macros.get("j"), "mx.example.net")  # FakeMTA's own packet replaced it
        lines = logs.matching("damaged MACRO packet")
        self.assertEqual(len(lines), 1, logs.lines())
        self.assertIn(f"[{mta.protocol.connection_id}]", lines[0])
        self.assertIn("'_' has no value", lines[0])


class OrderTests(SynchronousTestCase):
    def test_helo_before_connect(self) -> None:
        """HELO before CONNECT is processed, as libmilter's fallback processes it."""
        recorder = RecordingMilter()
        mta = FakeMTA([lambda: recorder])
        mta.negotiate()
        self.assertEqual(mta.helo("early.example"), [Continue()])
        self.assertEqual(recorder.names, ["helo"])

    def test_data_after_unknown(self) -> None:
        """After MAIL and UNKNOWN libmilter takes DATA (no RCPT between); so does txmilt."""
        recorder = RecordingMilter()
        mta = FakeMTA([lambda: recorder], profile=SENDMAIL)
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.unknown("XFOO")
        self.assertEqual(mta.data(), [Continue()])
        self.assertTrue(mta.connected)
        self.assertEqual(recorder.names[-3:], ["mail_from", "unknown", "data"])

    def test_refused_unknown_keeps_the_message(self) -> None:
        """A filter refusing UNKNOWN mid-message refuses that command only: nobody is aborted or reset."""
        refuser = RecordingMilter({"unknown": Reject()})
        other = RecordingMilter()
        mta = FakeMTA([lambda: refuser, lambda: other])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        self.assertEqual(mta.unknown("XFOO"), [Reject()])
        self.assertEqual(mta.rcpt_to("<c@example.net>"), [Continue()])
        for recorder in (refuser, other):
            self.assertNotIn("abort", recorder.names)
            self.assertNotIn("reset", recorder.names)
            self.assertEqual(recorder.names.count("rcpt_to"), 2)
        self.assertTrue(mta.session.in_transaction)


class FrameDeadlineTests(SynchronousTestCase):
    def trickled(self, frame_timeout: float) -> tuple[FakeMTA, Clock, LogCapture, bytes]:
        logs = LogCapture(self)
        clock = Clock()
        mta = FakeMTA(MilterFactory([RecordingMilter], clock, idle_timeout=60, frame_timeout=frame_timeout))
        mta.connect()
        return mta, clock, logs, mta.session.send(MailFrom("<a@example.com>", ("SIZE=" + "9" * 200,)))

    @staticmethod
    def feed(mta: FakeMTA, data: bytes) -> list[object]:
        """Bytes of a command the MTA session already sent, straight to the milter; what came back."""
        mta.protocol.dataReceived(data)
        return list(mta.collect())

    def test_trickling_cannot_hold_a_connection(self) -> None:
        """One byte before each idle timeout still closes the connection once a frame is frame_timeout old."""
        mta, clock, logs, data = self.trickled(frame_timeout=120)
        for offset in range(len(data) - 1):
            self.feed(mta, data[offset:offset + 1])
            clock.advance(59)
            mta.collect()
            if not mta.connected:
                break
        self.assertFalse(mta.connected)
        self.assertLessEqual(clock.seconds(), 120 + 59)
        self.assertEqual(len(logs.matching("a frame begun 120", "still incomplete")), 1, logs.lines())

    def test_whole_frames_reset_it(self) -> None:
        """A frame that completes in time stops the deadline; the next one gets its own."""
        mta, clock, _, data = self.trickled(frame_timeout=10)
        self.feed(mta, data[:5])
        clock.advance(9)
        self.assertEqual(self.feed(mta, data[5:]), [Continue()])
        rcpt = mta.session.send(RcptTo("<b@example.net>"))
        self.feed(mta, rcpt[:3])
        clock.advance(9)
        self.assertTrue(mta.connected)
        self.assertEqual(self.feed(mta, rcpt[3:]), [Continue()])
        clock.advance(30)
        self.assertTrue(mta.connected)  # no frame in progress: only the idle timeout runs

    def test_zero_switches_it_off(self) -> None:
        """frame_timeout 0: only the idle timeout applies."""
        mta, clock, _, data = self.trickled(frame_timeout=0)
        for offset in range(10):
            self.feed(mta, data[offset:offset + 1])
            clock.advance(59)
        self.assertTrue(mta.connected)


