"""The chain as faithful as the MTA's own chaining: macros, after_changes, sequential order, dry runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txmilt.chain import FilterSpec
from txmilt.messages import (
    Accept,
    Action,
    AddHeader,
    BodyChunk,
    ChangeHeader,
    Continue,
    EndOfHeaders,
    Header,
    InsertHeader,
    MacroStage,
    ProtocolFlag,
    RcptTo,
    Reject,
)
from txmilt.milter import Changes, Milter, Result
from txmilt.protocol import MilterFactory
from txmilt.testing import POSTFIX, SENDMAIL, FakeMTA, MTAProfile, RecordingMilter

HEADERS = [("From", "alice@example.com"), ("Subject", "hello"), ("X-Old", "1")]
BODY = b"Hi Bob\r\n"


def chain(*filters: Any, order: str = "concurrent", profile: MTAProfile = POSTFIX) -> FakeMTA:
    clock = Clock()
    return FakeMTA(MilterFactory(filters, clock, chain_order=order), profile=profile)


class Seen(Milter):
    """Records the headers, body and recipients it is shown."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body_seen = b""
        self.recipients: list[str] = []
        self.eoh = 0
        self.calls_headers: list[tuple[str, str]] = []
        self.calls_body = b""

    def rcpt_to(self, command: RcptTo) -> Result:
        self.recipients.append(command.address)
        return None

    def header(self, command: Header) -> Result:
        self.headers.append((command.name, command.value))
        return None

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        self.eoh += 1
        return None

    def body(self, command: BodyChunk) -> Result:
        self.body_seen += command.data
        return None

    def reset(self) -> Result:
        #: What the last message showed it, kept when the message ended.
        self.calls_headers, self.calls_body = self.headers, self.body_seen
        self.headers, self.body_seen, self.eoh = [], b"", 0
        return None


class AfterSeen(Seen):
    """Seen, declared after_changes."""

    after_changes = True


def editor(edit: Callable[[Changes], None], actions: Action = Action.ADD_HEADERS | Action.CHANGE_HEADERS) -> Any:
    """A filter class whose end of message makes ``edit``."""

    class Editor(Milter):
        def end_of_message(self, changes: Changes) -> Result:
            edit(changes)
            return None

    Editor.actions = actions
    return Editor


class Keep:
    """A factory that hands out one instance and remembers it."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self.made: list[Any] = []

    def __call__(self) -> Any:
        self.made.append(self.make())
        return self.made[-1]

    @property
    def last(self) -> Any:
        return self.made[-1]


class MacroTests(SynchronousTestCase):
    def test_requests_keep_the_defaults(self) -> None:
        """A filter that asks for nothing still sees the MTA's default macros when another asks for some."""

        class Reads(Milter):
            def connect(self, command: Any) -> Result:
                self.seen = (self.macros.get("j"), self.macros.get("{daemon_name}"))
                return None

        class Asks(Milter):
            macro_requests: ClassVar[Any] = {MacroStage.CONNECT: ("{client_addr}",)}

            def connect(self, command: Any) -> Result:
                self.addr = self.macros.get("{client_addr}")
                return None

        for profile in (POSTFIX, SENDMAIL):
            reads, asks = Keep(Reads), Keep(Asks)
            mta = chain(FilterSpec(reads), FilterSpec(asks), profile=profile)
            mta.connect()
            values = profile.macro_values
            self.assertEqual(reads.last.seen, (values["j"], values["daemon_name"]), profile.name)
            self.assertEqual(asks.last.addr, "192.0.2.10", profile.name)


class AfterChangesTests(SynchronousTestCase):
    def test_later_filter_sees_an_added_header(self) -> None:
        """An after_changes filter sees the header an earlier filter added; without it, it does not."""
        adder = editor(lambda c: c.add_header("X-Eq-Added", "yes"))
        for late, expected in ((AfterSeen, True), (Seen, False)):
            seen = Keep(late)
            mta = chain(adder, FilterSpec(seen))
            result = mta.message("<a@example.com>", ["<b@example.net>"], HEADERS, BODY)
            self.assertTrue(result.delivered)
            self.assertEqual(("X-Eq-Added", "yes") in seen.made[-1].calls_headers, expected, late)

    def test_after_two_header_editors_and_a_body_replacer(self) -> None:
        """The replay shows the message exactly as the earlier filters left it; its own changes apply after."""

        def first(changes: Changes) -> None:
            changes.insert_header("X-First", "1", 1)
            changes.change_header("Subject", "changed by first")

        def second(changes: Changes) -> None:
            changes.delete_header("X-Old")
            changes.add_header("X-Second", "2")

        class Signer(AfterSeen):
            actions = Action.ADD_HEADERS | Action.CHANGE_HEADERS

            def end_of_message(self, changes: Changes) -> Result:
                self.final = list(self.headers), self.body_seen
                changes.insert_header("X-Signature", f"{len(self.headers)} headers, {len(self.body_seen)} bytes", 0)
                changes.delete_header("X-First")  # a header only the edited message has
                return None

        replacer = editor(lambda c: c.replace_body(b"New body\r\n"), Action.CHANGE_BODY)
        alone = chain(editor(first), editor(second), replacer).message(
            "<a@example.com>", ["<b@example.net>"], HEADERS, BODY
        )
        signer = Keep(Signer)
        result = chain(editor(first), editor(second), replacer, FilterSpec(signer)).message(
            "<a@example.com>", ["<b@example.net>"], HEADERS, BODY
        )
        shown_headers, shown_body = signer.last.final
        self.assertEqual(shown_headers, alone.headers)
        self.assertEqual(shown_body, alone.body)
        self.assertEqual(shown_body, b"New body\r\n")
        self.assertEqual(result.headers[0], ("X-Signature", "4 headers, 10 bytes"))
        self.assertEqual(result.headers[1:], [h for h in alone.headers if h[0] != "X-First"])
        self.assertEqual(result.body, b"New body\r\n")

    def test_live_until_an_earlier_filter_can_edit(self) -> None:
        """With no earlier filter able to change the content, an after_changes filter sees it live."""
        seen = Keep(AfterSeen)
        mta = chain(RecordingMilter, FilterSpec(seen))
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        mta.header("Subject", "live")
        self.assertEqual(seen.last.headers, [("Subject", "live")])

    def test_replayed_headers_need_no_reply(self) -> None:
        """Headers only a replayed filter reads are not waited for: the MTA gets no-reply for them."""
        mta = chain(editor(lambda c: c.add_header("X-A", "1")), AfterSeen)
        mta.negotiate()
        assert mta.negotiated is not None
        self.assertTrue(mta.negotiated.protocol & ProtocolFlag.NR_HEADER)
        self.assertFalse(mta.negotiated.protocol & ProtocolFlag.NO_HEADERS)

    def test_refusal_while_replayed(self) -> None:
        """A refusal from a replayed header callback answers end of message; no change goes out."""

        class Refuses(AfterSeen):
            def header(self, command: Header) -> Result:
                return Reject("5.7.1 no") if command.name == "X-Eq-Added" else None

        mta = chain(editor(lambda c: c.add_header("X-Eq-Added", "yes")), Refuses)
        result = mta.message("<a@example.com>", ["<b@example.net>"], HEADERS, BODY)
        self.assertEqual(result.verdict, Reject("5.7.1 no"))
        self.assertEqual(result.modifications, [])

    def test_accept_while_replayed(self) -> None:
        """Accept from a replayed callback ends the replay for that filter; earlier changes still go out."""

        class Accepts(AfterSeen):
            def header(self, command: Header) -> Result:
                return Accept()

            def end_of_message(self, changes: Changes) -> Result:
                raise AssertionError("end_of_message after Accept")

        mta = chain(editor(lambda c: c.add_header("X-Eq-Added", "yes")), Accepts)
        result = mta.message("<a@example.com>", ["<b@example.net>"], HEADERS, BODY)
        self.assertTrue(result.delivered)
        self.assertIn(("X-Eq-Added", "yes"), result.headers)


class SequentialTests(SynchronousTestCase):
    def test_refused_recipient_not_seen_later(self) -> None:
        """A recipient the first filter refuses never reaches the second."""
        first = RecordingMilter({"rcpt_to": lambda c: Reject() if "reject@" in c.address else None})
        second = Keep(Seen)
        mta = chain(lambda: first, FilterSpec(second), order="sequential")
        result = mta.message("<a@example.com>", ["<reject@example.net>", "<ok@example.net>"], HEADERS, BODY)
        self.assertTrue(result.delivered)
        self.assertEqual(second.last.recipients, ["<ok@example.net>"])
        concurrent = Keep(Seen)
        chain(lambda: RecordingMilter(first._rules), FilterSpec(concurrent)).message(
            "<a@example.com>", ["<reject@example.net>", "<ok@example.net>"], HEADERS, BODY
        )
        self.assertEqual(concurrent.last.recipients, ["<reject@example.net>", "<ok@example.net>"])

    def test_one_after_another(self) -> None:
        """The second filter is called only once the first has answered; latency is the sum."""
        gate: Deferred[Any] = Deferred()
        first = RecordingMilter({"helo": lambda c: gate})
        second = RecordingMilter()
        mta = chain(lambda: first, lambda: second, order="sequential")
        mta.connect()
        self.assertEqual(mta.helo(), [])
        self.assertEqual(second.names, ["connect"])
        gate.callback(None)
        self.assertEqual(mta.collect(), [Continue()])
        self.assertEqual(second.names, ["connect", "helo"])

    def test_content_replayed_with_changes(self) -> None:
        """The second filter sees the content with the first one's changes; the first saw it live."""
        second = Keep(Seen)
        mta = chain(editor(lambda c: c.add_header("X-One", "1")), FilterSpec(second), order="sequential")
        result = mta.message("<a@example.com>", ["<b@example.net>"], HEADERS, BODY)
        self.assertTrue(result.delivered)
        self.assertEqual(second.last.calls_headers, [*HEADERS, ("X-One", "1")])
        self.assertEqual(second.last.calls_body, BODY)

    def test_quarantine_ends_the_pass_with_postfix(self) -> None:
        """Postfix stops at the first milter that quarantines; Sendmail goes on to the next."""
        quarantiner = editor(lambda c: c.quarantine("held"), Action.QUARANTINE)
        stamper = editor(lambda c: c.add_header("X-Later", "1"))
        for profile, later_runs in ((POSTFIX, False), (SENDMAIL, True)):
            mta = chain(quarantiner, stamper, order="sequential", profile=profile)
            result = mta.message("<a@example.com>", ["<b@example.net>"], HEADERS, BODY)
            self.assertEqual(result.quarantined, "held", profile.name)
            self.assertEqual(("X-Later", "1") in result.headers, later_runs, profile.name)


class DryRunTests(SynchronousTestCase):
    def test_never_waited_for(self) -> None:
        """A slow dry-run filter does not hold the MTA up; its work settles later, in its own order."""
        gate: Deferred[Any] = Deferred()
        slow = RecordingMilter({"helo": lambda c: gate})
        real = RecordingMilter()
        mta = chain(FilterSpec(lambda: slow, name="slow", dry_run=True), lambda: real)
        mta.connect()
        self.assertEqual(mta.helo(), [Continue()])
        self.assertEqual(mta.mail_from("<a@example.com>"), [Continue()])
        self.assertEqual(slow.names, ["connect", "helo"])  # MAIL waits for its own HELO
        gate.callback(Reject())
        self.assertEqual(slow.names, ["connect", "helo", "mail_from"])

    def test_one_callback_at_a_time(self) -> None:
        """Work queued behind a slow callback that is itself slow keeps the next one waiting."""
        helo_gate: Deferred[Any] = Deferred()
        mail_gate: Deferred[Any] = Deferred()
        slow = RecordingMilter({"helo": lambda c: helo_gate, "mail_from": lambda c: mail_gate})
        mta = chain(FilterSpec(lambda: slow, name="slow", dry_run=True), RecordingMilter)
        mta.connect()
        mta.helo()
        mta.mail_from("<a@example.com>")
        self.assertEqual(slow.names, ["connect", "helo"])
        helo_gate.callback(None)
        self.assertEqual(slow.names, ["connect", "helo", "mail_from"])
        mta.rcpt_to("<b@example.net>")
        self.assertEqual(slow.names, ["connect", "helo", "mail_from"])  # RCPT waits for MAIL
        mail_gate.callback(None)
        self.assertEqual(slow.names, ["connect", "helo", "mail_from", "rcpt_to"])

    def test_close_drops_queued_work(self) -> None:
        """Closing the connection cancels the running callback and runs nothing queued behind it."""
        gate: Deferred[Any] = Deferred()
        slow = RecordingMilter({"helo": lambda c: gate})
        mta = chain(FilterSpec(lambda: slow, name="slow", dry_run=True), RecordingMilter)
        mta.connect()
        mta.helo()
        mta.mail_from("<a@example.com>")
        mta.disconnect()
        self.assertEqual(slow.names[:2], ["connect", "helo"])
        self.assertNotIn("mail_from", slow.names)
        self.assertTrue(gate.called)


class EmptyValueTests(SynchronousTestCase):
    def test_empty_header_keeps_its_space(self) -> None:
        """With leading space negotiated for another filter, an empty added value still gets its space.

        Postfix adds one space after the colon for a filter without leading space, so the stored
        header is ``X-Empty: ``; through the chain the value must be " ", while a delete stays "".
        """

        class Spaced(Milter):
            leading_space = True

            def header(self, command: Header) -> Result:
                return None

        def edit(changes: Changes) -> None:
            changes.add_header("X-Empty", "")
            changes.insert_header("X-Empty-Top", "", 0)
            changes.delete_header("X-Old")

        mta = chain(Spaced, editor(edit))
        result = mta.message("<a@example.com>", ["<b@example.net>"], HEADERS, BODY)
        self.assertTrue(mta.leading_space)
        self.assertEqual(result.modifications, [
            AddHeader("X-Empty", " "), InsertHeader(0, "X-Empty-Top", " "), ChangeHeader(1, "X-Old", ""),
        ])
