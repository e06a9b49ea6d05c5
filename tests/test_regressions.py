"""Inputs the fuzzers (tools/fuzz.py, tests/test_fuzz_session.py) found, kept as regression tests."""

from __future__ import annotations

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from tests.test_protocol import LogCapture
from txmilt.messages import BodyChunk, Continue, EndOfMessage, Reject
from txmilt.milter import Changes, Milter, Result
from txmilt.testing import FakeMTA, RecordingMilter


class BodyReader(Milter):
    """Collects the body; rejects it if it says so."""

    def __init__(self) -> None:
        self.seen = b""

    def body(self, command: BodyChunk) -> Result:
        self.seen += command.data
        return None

    def end_of_message(self, changes: Changes) -> Result:
        return Reject() if b"reject" in self.seen else None


class EndOfMessageWithDataTests(SynchronousTestCase):
    """An end of message that carries body bytes (PROTOCOL.md §7.1 item 7).

    Found by the protocol target of tools/fuzz.py: the chain tested the body
    chunk's answer with ``isinstance(x, tuple | type)``, a TypeError, so every
    such packet closed the connection as an internal error.
    """

    def test_body_then_end_of_message(self) -> None:
        """The bytes go to body() first, then end_of_message answers, and the connection stays."""
        logs = LogCapture(self)
        reader = BodyReader()
        mta = FakeMTA([lambda: reader, RecordingMilter])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        self.assertEqual(mta.send_raw(mta.session.send(EndOfMessage(b"tail\r\n"))), [Continue()])
        self.assertEqual(reader.seen, b"tail\r\n")
        self.assertTrue(mta.connected)
        self.assertEqual([e for e in logs.events if e["log_level"] >= LogLevel.error], [])

    def test_refusal_in_the_body_part(self) -> None:
        """A body refusal answers once; end_of_message is not called for it."""
        recorder = RecordingMilter({"body": Reject()})
        mta = FakeMTA([lambda: recorder])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        self.assertEqual(mta.send_raw(mta.session.send(EndOfMessage(b"x"))), [Reject()])
        self.assertNotIn("end_of_message", recorder.names)
        self.assertTrue(mta.connected)
