"""reset(): called exactly once whenever a message ends for a filter, however it ends."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from tests.test_protocol import LogCapture
from txmilt.messages import Accept, Reject, TempFail
from txmilt.milter import Milter, Result
from txmilt.testing import POSTFIX, SENDMAIL, FakeMTA, RecordingMilter

MESSAGE = ("<a@example.com>", ["<b@example.net>"], [("Subject", "s")], b"body\r\n")


def lifecycle(recorder: RecordingMilter) -> list[str]:
    """The calls that mark where messages begin and end."""
    return [name for name in recorder.names if name in ("mail_from", "end_of_message", "abort", "reset", "close")]


class ResetTests(SynchronousTestCase):
    def test_after_end_of_message_once(self) -> None:
        """After end of message: one reset, not a second for Postfix's ABORT that follows."""
        for profile in (POSTFIX, SENDMAIL):
            recorder = RecordingMilter()
            mta = FakeMTA([recorder], profile=profile)
            self.assertTrue(mta.message(*MESSAGE).delivered)
            mta.message(*MESSAGE)
            mta.quit()
            self.assertEqual(lifecycle(recorder), [
                "mail_from", "end_of_message", "reset", "mail_from", "end_of_message", "reset", "close",
            ], profile.name)

    def test_after_abort(self) -> None:
        """An ABORT mid-message: abort(), then reset(); a second ABORT changes nothing."""
        recorder = RecordingMilter()
        mta = FakeMTA([recorder])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        mta.abort()
        mta.abort()
        self.assertEqual(lifecycle(recorder), ["mail_from", "abort", "reset"])

    def test_refusal_by_the_filter(self) -> None:
        """A filter refusing the message gets reset() and no abort(); the others get both."""
        refuser = RecordingMilter({"header": Reject()})
        other = RecordingMilter()
        mta = FakeMTA([lambda: other, lambda: refuser])
        result = mta.message(*MESSAGE)
        self.assertEqual(result.verdict, Reject())
        self.assertEqual(lifecycle(refuser), ["mail_from", "reset"])
        self.assertEqual(lifecycle(other), ["mail_from", "abort", "reset"])

    def test_refused_recipient_does_not_end_message(self) -> None:
        """A refused recipient leaves the message open: no reset until it ends."""
        recorder = RecordingMilter({"rcpt_to": lambda c: TempFail() if "x@" in c.address else None})
        mta = FakeMTA([recorder])
        result = mta.message("<a@example.com>", ["<x@example.net>", "<y@example.net>"], [("Subject", "s")])
        self.assertTrue(result.delivered)
        self.assertEqual(lifecycle(recorder), ["mail_from", "end_of_message", "reset"])

    def test_when_the_filter_accepts(self) -> None:
        """A filter that accepts the message is reset at once and sees nothing more of it."""
        accepter = RecordingMilter({"rcpt_to": Accept()})
        other = RecordingMilter()
        mta = FakeMTA([lambda: accepter, lambda: other])
        self.assertTrue(mta.message(*MESSAGE).delivered)
        self.assertTrue(mta.message(*MESSAGE).delivered)
        self.assertEqual(lifecycle(accepter), ["mail_from", "reset", "mail_from", "reset"])
        self.assertEqual(lifecycle(other).count("reset"), 2)

    def test_accepted_at_connect(self) -> None:
        """A filter that accepted the whole connection has no messages, so no reset."""
        recorder = RecordingMilter({"connect": Accept()})
        mta = FakeMTA([lambda: recorder, RecordingMilter])
        mta.message(*MESSAGE)
        mta.quit()
        self.assertEqual(recorder.names, ["connect", "close"])

    def test_connection_lost_mid_message(self) -> None:
        """The MTA vanishing mid-message: abort(), reset(), close(), each once."""
        recorder = RecordingMilter()
        mta = FakeMTA([recorder])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.disconnect()
        self.assertEqual(lifecycle(recorder), ["mail_from", "abort", "reset", "close"])

    def test_end_of_message_refused(self) -> None:
        """A refusal at end of message ends it for every filter."""
        refuser = RecordingMilter({"end_of_message": TempFail()})
        other = RecordingMilter()
        mta = FakeMTA([lambda: other, lambda: refuser])
        self.assertEqual(mta.message(*MESSAGE).verdict, TempFail())
        for recorder in (other, refuser):
            self.assertEqual(lifecycle(recorder).count("reset"), 1)

    def test_reset_failure_logged(self) -> None:
        """A reset() that raises is logged with the filter's name; the chain carries on."""

        class Broken(Milter):
            def reset(self) -> Result:
                raise RuntimeError("boom in reset")

        logs = LogCapture(self)
        mta = FakeMTA([Broken])
        self.assertTrue(mta.message(*MESSAGE).delivered)
        self.assertTrue(mta.message(*MESSAGE).delivered)
        errors = [e for e in logs.events if e.get("log_level") is LogLevel.error]
        self.assertEqual(len(errors), 2)
        self.assertEqual(len(logs.matching("failed in reset", "carrying on")), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_slow_reset_holds_the_next_command(self) -> None:
        """A reset() returning a Deferred is waited for before the next command reaches the filters."""
        pending: list[Deferred[None]] = []

        class Slow(RecordingMilter):
            def reset(self) -> Result:
                super().reset()
                pending.append(Deferred())
                return pending[-1]  # type: ignore[return-value]

        recorder = Slow()
        mta = FakeMTA([recorder], profile=SENDMAIL)
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.abort()
        self.assertEqual(mta.mail_from("<c@example.com>"), [])
        self.assertEqual(lifecycle(recorder), ["mail_from", "abort", "reset"])
        pending[0].callback(None)
        mta.collect()
        self.assertEqual(lifecycle(recorder), ["mail_from", "abort", "reset", "mail_from"])
