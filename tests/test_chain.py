"""Tests for the Chain: negotiation merge, fan-out, verdict merge, failures, end of message, close."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, cast

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from txmilt.chain import Chain, FilterSpec, verify_filters
from txmilt.codec import encode
from txmilt.errors import ConfigurationError, LocalProtocolError, NegotiationError
from txmilt.interfaces import IMilter
from txmilt.messages import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Abort,
    Accept,
    Action,
    AddHeader,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Command,
    Connect,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    Macros,
    MacroStage,
    MailFrom,
    Negotiate,
    ProtocolFlag,
    Quit,
    QuitNoClose,
    RcptTo,
    Reject,
    ReplaceBody,
    Response,
    Skip,
    TempFail,
    Unknown,
)
from txmilt.milter import Changes, Milter, Result
from txmilt.session import NEED_DATA, Disconnected, MilterSession, Notice

CONN = "conn-7"


class BoomError(Exception):
    """What misbehaving test filters raise."""


class Scripted(Milter):
    """Answers every callback from a script (a value, or a function of the argument); records each call."""

    def __init__(self, script: Mapping[str, object] | None = None) -> None:
        self.script: dict[str, object] = dict(script or {})
        self.calls: list[tuple[str, object]] = []
        self.seen_macros: list[dict[str, str]] = []

    def run(self, stage: str, argument: object) -> Result:
        self.calls.append((stage, argument))
        self.seen_macros.append(dict(self.macros))
        answer = self.script.get(stage)
        if callable(answer) and not isinstance(answer, type):
            answer = answer(argument)
        return cast(Result, answer)

    def stages(self) -> list[str]:
        return [stage for stage, _ in self.calls]

    def count(self, stage: str) -> int:
        return self.stages().count(stage)

    def connect(self, command: Connect) -> Result:
        return self.run("connect", command)

    def helo(self, command: Helo) -> Result:
        return self.run("helo", command)

    def mail_from(self, command: MailFrom) -> Result:
        return self.run("mail_from", command)

    def rcpt_to(self, command: RcptTo) -> Result:
        return self.run("rcpt_to", command)

    def data(self, command: Data) -> Result:
        return self.run("data", command)

    def header(self, command: Header) -> Result:
        return self.run("header", command)

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        return self.run("end_of_headers", command)

    def body(self, command: BodyChunk) -> Result:
        return self.run("body", command)

    def end_of_message(self, changes: Changes) -> Result:
        return self.run("end_of_message", changes)

    def unknown(self, command: Unknown) -> Result:
        return self.run("unknown", command)

    def abort(self) -> Result:
        return self.run("abort", None)

    def reset(self) -> Result:
        return None

    def close(self) -> Result:
        return self.run("close", None)


class Editor(Scripted):
    """A scripted filter allowed every change."""

    actions = ALL_ACTIONS


class SpacedEditor(Editor):
    """An editor that sees header values with their leading space."""

    leading_space = True


class RejectedReader(Scripted):
    """A scripted filter that also sees recipients the MTA rejected."""

    rejected_recipients = True


class Observing(Scripted):
    """A scripted filter whose header and recipient callbacks only observe."""

    no_reply = frozenset({"header", "rcpt_to"})


class HeaderReader(Milter):
    """Overrides only header (and close, which is not an event)."""

    no_reply: ClassVar[frozenset[str]] = frozenset()

    def header(self, command: Header) -> Result:
        return None


class SilentHeaderReader(HeaderReader):
    """Reads headers without replying."""

    no_reply = frozenset({"header"})


class RcptReader(Milter):
    """Overrides only rcpt_to."""

    def rcpt_to(self, command: RcptTo) -> Result:
        return None


class BodyReader(Milter):
    """Overrides only body."""

    def body(self, command: BodyChunk) -> Result:
        return None


class HeaderEditor(Milter):
    """Edits headers at end of message but reads no event."""

    actions = Action.ADD_HEADERS | Action.CHANGE_HEADERS


class ScriptedHeaderEditor(HeaderEditor):
    """A header editor that reads no event; ``edit`` records its end-of-message changes.

    Calling an instance makes a fresh copy, so an instance serves as a chain factory.
    """

    def __init__(self, edit: Callable[[Changes], object]) -> None:
        self.edit = edit

    def __call__(self) -> ScriptedHeaderEditor:
        return ScriptedHeaderEditor(self.edit)

    def end_of_message(self, changes: Changes) -> Result:
        self.edit(changes)
        return None


class SenderChanger(Milter):
    """Needs CHANGE_FROM."""

    actions = Action.CHANGE_FROM


class MacroWanter(Milter):
    """Asks for connect macros."""

    macro_requests: ClassVar[Mapping[MacroStage, Sequence[str]]] = {MacroStage.CONNECT: ("j", "{client_addr}")}


class OtherMacroWanter(Milter):
    """Asks for overlapping connect macros and end-of-message ones."""

    macro_requests: ClassVar[Mapping[MacroStage, Sequence[str]]] = {
        MacroStage.CONNECT: ("{client_addr}", "{daemon_name}", "j"), MacroStage.END_OF_MESSAGE: ("i",),
    }


class SpaceWanter(Milter):
    """Needs header leading space."""

    leading_space = True


class RecordingObserver:
    """A ChainObserver that keeps every report."""

    def __init__(self) -> None:
        self.verdicts: list[tuple[str, str, str, bool]] = []
        self.changes: list[tuple[str, str, bool]] = []
        self.latencies: list[tuple[str, str, float]] = []
        self.failures: list[tuple[str, str, str]] = []
        self.skips: list[tuple[str, str]] = []

    def verdict(self, filter_name: str, stage: str, verdict: str, dry_run: bool) -> None:
        self.verdicts.append((filter_name, stage, verdict, dry_run))

    def change(self, filter_name: str, kind: str, dry_run: bool) -> None:
        self.changes.append((filter_name, kind, dry_run))

    def latency(self, filter_name: str, stage: str, seconds: float) -> None:
        self.latencies.append((filter_name, stage, seconds))

    def failure(self, filter_name: str, stage: str, kind: str) -> None:
        self.failures.append((filter_name, stage, kind))

    def skipped(self, filter_name: str, reason: str) -> None:
        self.skips.append((filter_name, reason))


class Pool:
    """Makes chain members and remembers every instance made, by name."""

    def __init__(self) -> None:
        self.made: dict[str, list[IMilter]] = defaultdict(list)

    def spec(self, name: str, make: Callable[[], IMilter], **options: Any) -> FilterSpec:
        def factory() -> IMilter:
            milter = make()
            self.made[name].append(milter)
            return milter

        return FilterSpec(factory, name=name, **options)

    def scripted(self, name: str, script: Mapping[str, object] | None = None, **options: Any) -> FilterSpec:
        return self.spec(name, lambda: Scripted(script), **options)

    def __getitem__(self, name: str) -> Scripted:
        milter = self.made[name][-1]
        assert isinstance(milter, Scripted)
        return milter


def pending(cancelled: list[str] | None = None, name: str = "") -> Deferred[Any]:
    """A Deferred that records its cancellation in ``cancelled``."""
    return Deferred(lambda _: cancelled.append(name) if cancelled is not None else None)


def macros(**values: str) -> dict[str, str]:
    return values


def full_text(event: LogEvent) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


class ChainCase(SynchronousTestCase):
    """Shared set-up: a clock, a filter pool, a recording observer and a log capture."""

    #: The chain order the tests of the class run in.
    order = "concurrent"

    def setUp(self) -> None:
        self.sessions: dict[Chain, MilterSession] = {}
        self.clock = Clock()
        self.pool = Pool()
        self.observer = RecordingObserver()
        self.progress: list[float] = []
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def chain(
        self,
        *filters: FilterSpec | Callable[[], IMilter],
        offer: Negotiate | None = None,
        interval: float = 10.0,
    ) -> Chain:
        chain = Chain(
            filters, self.clock, connection_id=CONN, progress_interval=interval,
            send_progress=lambda: self.progress.append(self.clock.seconds()), observer=self.observer,
            chain_order=self.order,
        )
        session = self.sessions[chain] = MilterSession()
        session.receive_data(encode(offer or Negotiate()))
        event = session.next_event()
        assert isinstance(event, Negotiate)
        session.send(chain.negotiate(event))
        return chain

    def handle(self, chain: Chain, command: Command | Disconnected, values: Mapping[str, str]) -> Any:
        """Pass ``command`` (and its macros) through the chain's session to the chain, as the protocol does.

        The session may turn one command into two events (an implicit abort first); the outcome of the
        last is returned. Replies are sent through the session as they come, so it keeps its stage.
        """
        session = self.sessions[chain]
        if isinstance(command, Disconnected):
            session.receive_data(b"")
        else:
            pairs = tuple(values.items())
            prefix = encode(Macros(command.letter, pairs)) if pairs else b""
            session.receive_data(prefix + encode(command))
        outcome: Any = ()
        while (event := session.next_event()) is not NEED_DATA:
            assert not isinstance(event, Notice | Negotiate)
            outcome = chain.handle(event, session)
            if isinstance(outcome, Deferred):
                outcome.addCallback(self.sent, session)
                break
            self.sent(outcome, session)
        return outcome

    @staticmethod
    def sent(responses: Sequence[Response], session: MilterSession) -> Sequence[Response]:
        if session.reply_due:
            for response in responses:
                session.send(response)
        return responses

    def now(
        self, chain: Chain, command: Command | Disconnected, values: Mapping[str, str] | None = None
    ) -> tuple[Response, ...]:
        """Handle ``command``; it must be answered at once."""
        outcome = self.handle(chain, command, values or {})
        self.assertNotIsInstance(outcome, Deferred)
        assert not isinstance(outcome, Deferred)
        return tuple(outcome)

    def later(
        self, chain: Chain, command: Command | Disconnected, values: Mapping[str, str] | None = None
    ) -> Deferred[Any]:
        """Handle ``command``; the answer must be pending."""
        outcome = self.handle(chain, command, values or {})
        self.assertIsInstance(outcome, Deferred)
        assert isinstance(outcome, Deferred)
        self.assertNoResult(outcome)
        return outcome

    def open_message(self, chain: Chain, *recipients: str) -> None:
        """Connect, greet, and start a message; every filter must continue."""
        commands: list[Command] = [Connect("client.example"), Helo("client.example"), MailFrom("<s@example.com>")]
        commands += [RcptTo(r) for r in recipients or ("<r@example.com>",)]
        for command in commands:
            self.assertEqual(self.now(chain, command), (Continue(),), command)

    def logged(self, level: LogLevel = LogLevel.error) -> list[str]:
        """Text (with traceback) of the chain's log events at ``level`` (error includes critical)."""
        levels = {LogLevel.error, LogLevel.critical} if level is LogLevel.error else {level}
        return [
            full_text(event) for event in self.events
            if event.get("log_namespace") == "txmilt.chain.Chain" and event.get("log_level") in levels
        ]


# ---------------------------------------------------------------- negotiation


class NegotiationTests(ChainCase):
    def test_version(self) -> None:
        """The chain answers with the lower of the offered version and 6."""
        for offered, answered in ((2, 2), (6, 6), (7, 6)):
            chain = Chain([Milter], self.clock)
            self.assertEqual(chain.negotiate(Negotiate(version=offered)).version, answered)

    def test_version_too_old(self) -> None:
        """An offer below version 2 fails without blaming a filter."""
        chain = Chain([self.pool.spec("blameless", Milter)], self.clock)
        error = self.assertRaises(NegotiationError, chain.negotiate, Negotiate(version=1))
        self.assertNotIn("blameless", str(error))

    def test_actions_union(self) -> None:
        """The chain asks for the union of its filters' actions."""
        reply = Chain([HeaderEditor, SenderChanger, Milter], self.clock).negotiate(Negotiate())
        self.assertEqual(reply.actions, Action.ADD_HEADERS | Action.CHANGE_HEADERS | Action.CHANGE_FROM)

    def test_events_off_unless_overridden(self) -> None:
        """An event is switched off only if no filter overrides its callback."""
        reply = Chain([HeaderReader, RcptReader], self.clock).negotiate(Negotiate())
        for flag in (ProtocolFlag.NO_CONNECT, ProtocolFlag.NO_HELO, ProtocolFlag.NO_DATA, ProtocolFlag.NO_EOH,
                     ProtocolFlag.NO_BODY, ProtocolFlag.NO_UNKNOWN):
            self.assertTrue(reply.protocol & flag, flag)
        self.assertFalse(reply.protocol & ProtocolFlag.NO_HEADERS)
        self.assertFalse(reply.protocol & ProtocolFlag.NO_RCPT)

    def test_mail_never_off(self) -> None:
        """MAIL is never switched off (the chain tracks messages by it), but needs no reply if unread."""
        reply = Chain([Milter, HeaderReader], self.clock).negotiate(Negotiate())
        self.assertFalse(reply.protocol & ProtocolFlag.NO_MAIL)
        self.assertTrue(reply.protocol & ProtocolFlag.NR_MAIL)

    def test_no_reply_needs_every_receiver(self) -> None:
        """NR is asked for only when every filter receiving the event lists it in no_reply."""
        mixed = Chain([SilentHeaderReader, HeaderReader], self.clock).negotiate(Negotiate())
        self.assertFalse(mixed.protocol & ProtocolFlag.NR_HEADER)
        quiet = Chain([SilentHeaderReader, RcptReader], self.clock).negotiate(Negotiate())
        self.assertTrue(quiet.protocol & ProtocolFlag.NR_HEADER)
        self.assertFalse(quiet.protocol & ProtocolFlag.NR_RCPT)

    def test_no_reply_not_offered(self) -> None:
        """NR bits the MTA does not offer are not asked for."""
        offer = Negotiate(version=2, actions=Action(0x0F), protocol=ProtocolFlag(0x7F))
        reply = Chain([SilentHeaderReader], self.clock).negotiate(offer)
        self.assertFalse(reply.protocol & ProtocolFlag.NR_HEADER)
        self.assertFalse(reply.protocol & ~ProtocolFlag(0x7F))

    def test_macros_union(self) -> None:
        """Macro requests are unioned per stage in filter order without duplicates, with the MTAs' defaults."""
        reply = Chain([MacroWanter, OtherMacroWanter], self.clock).negotiate(Negotiate())
        self.assertEqual(dict(reply.macros), {
            # Postfix's and Sendmail's default lists follow: a requested list replaces them.
            MacroStage.CONNECT: (
                "j", "{client_addr}", "{daemon_name}", "{daemon_addr}", "v", "_", "{if_name}", "{if_addr}",
            ),
            MacroStage.END_OF_MESSAGE: ("i", "{msg_id}"),
        })
        self.assertTrue(reply.actions & Action.SET_MACRO_LIST)

    def test_leading_space_asked(self) -> None:
        """LEADSPC is asked for if any filter wants it, and not otherwise."""
        wanted = Chain([SpaceWanter, HeaderReader], self.clock).negotiate(Negotiate())
        self.assertTrue(wanted.protocol & ProtocolFlag.HEADER_LEADING_SPACE)
        unwanted = Chain([HeaderReader], self.clock).negotiate(Negotiate())
        self.assertFalse(unwanted.protocol & ProtocolFlag.HEADER_LEADING_SPACE)

    def test_leading_space_adapted(self) -> None:
        """Filters that did not ask for LEADSPC get one space stripped from values and added to changes."""
        chain = self.chain(self.pool.spec("spaced", SpacedEditor), self.pool.spec("plain", Editor))
        spaced, plain = self.pool["spaced"], self.pool["plain"]

        def edit(value: str) -> Callable[[Changes], None]:
            def record(changes: Changes) -> None:
                changes.add_header("X-Added", value)
                changes.change_header("Subject", value)
                changes.delete_header("X-Old")
            return record

        spaced.script["end_of_message"] = edit(" spaced")
        plain.script["end_of_message"] = edit("plain")
        self.open_message(chain)
        self.assertEqual(self.now(chain, Header("Subject", " hello")), (Continue(),))
        self.assertEqual(self.now(chain, Header("X-Tight", "tight")), (Continue(),))
        self.assertEqual(
            [c for s, c in spaced.calls if s == "header"], [Header("Subject", " hello"), Header("X-Tight", "tight")]
        )
        self.assertEqual(
            [c for s, c in plain.calls if s == "header"], [Header("Subject", "hello"), Header("X-Tight", "tight")]
        )
        self.now(chain, EndOfHeaders())
        responses = self.now(chain, EndOfMessage())
        self.assertEqual(responses, (
            AddHeader("X-Added", " spaced"), ChangeHeader(1, "Subject", " spaced"), ChangeHeader(1, "X-Old", ""),
            AddHeader("X-Added", " plain"), ChangeHeader(1, "Subject", " plain"), ChangeHeader(1, "X-Old", ""),
            Continue(),
        ))

    def test_values_untouched_without_leading_space(self) -> None:
        """Without LEADSPC, header values and change values pass unchanged."""
        chain = self.chain(self.pool.spec("plain", Editor))
        plain = self.pool["plain"]
        plain.script["end_of_message"] = lambda changes: changes.add_header("X-Added", "plain")
        self.open_message(chain)
        self.now(chain, Header("Subject", " hello"))
        self.assertEqual(plain.calls[-1], ("header", Header("Subject", " hello")))
        self.now(chain, EndOfHeaders())
        self.assertEqual(self.now(chain, EndOfMessage()), (AddHeader("X-Added", "plain"), Continue()))

    def test_missing_action_names_filter(self) -> None:
        """A filter needing an action the MTA did not offer fails negotiation, naming filter and action."""
        chain = Chain([Milter, self.pool.spec("sender-changer", SenderChanger)], self.clock)
        offer = Negotiate(actions=Action(0x3F))
        error = self.assertRaises(NegotiationError, chain.negotiate, offer)
        self.assertIn("sender-changer", str(error))
        self.assertIn("CHANGE_FROM", str(error))

    def test_missing_leading_space_names_filter(self) -> None:
        """A filter needing LEADSPC from an MTA that does not offer it fails negotiation, named."""
        chain = Chain([self.pool.spec("spacey", SpaceWanter)], self.clock)
        offer = Negotiate(protocol=ALL_PROTOCOL & ~ProtocolFlag.HEADER_LEADING_SPACE)
        error = self.assertRaises(NegotiationError, chain.negotiate, offer)
        self.assertIn("spacey", str(error))
        self.assertIn("HEADER_LEADING_SPACE", str(error))

    def test_missing_macro_lists_names_filter(self) -> None:
        """A filter asking for macros from an MTA without SETSYMLIST fails negotiation, named."""
        chain = Chain([self.pool.spec("macro-wanter", MacroWanter)], self.clock)
        error = self.assertRaises(NegotiationError, chain.negotiate, Negotiate(actions=Action(0xFF)))
        self.assertIn("macro-wanter", str(error))

    def test_skip_for_body_readers(self) -> None:
        """SKIP is asked for when some filter reads the body, and not otherwise."""
        self.assertTrue(Chain([Milter, BodyReader], self.clock).negotiate(Negotiate()).protocol & ProtocolFlag.SKIP)
        self.assertFalse(Chain([HeaderReader], self.clock).negotiate(Negotiate()).protocol & ProtocolFlag.SKIP)

    def test_headers_kept_for_rebasing(self) -> None:
        """Header events stay on (without reply) when two or more filters may edit headers."""
        two = Chain([HeaderEditor, HeaderEditor], self.clock).negotiate(Negotiate())
        self.assertFalse(two.protocol & ProtocolFlag.NO_HEADERS)
        self.assertTrue(two.protocol & ProtocolFlag.NR_HEADER)
        one = Chain([HeaderEditor, SenderChanger], self.clock).negotiate(Negotiate())
        self.assertTrue(one.protocol & ProtocolFlag.NO_HEADERS)
        evaluated = Chain([HeaderEditor, FilterSpec(HeaderEditor, dry_run=True)], self.clock).negotiate(Negotiate())
        self.assertTrue(evaluated.protocol & ProtocolFlag.NO_HEADERS)

    def test_rejected_recipients(self) -> None:
        """RCPT_REJ is asked for if a filter wants it; only such filters see rejected recipients."""
        chain = self.chain(self.pool.spec("wants", RejectedReader), self.pool.scripted("plain"))
        self.assertTrue(chain.negotiate(Negotiate()).protocol & ProtocolFlag.RCPT_REJECTED)
        self.open_message(chain)
        self.assertEqual(self.now(chain, RcptTo("<gone@example.com>"), macros(rcpt_mailer="error")), (Continue(),))
        self.assertEqual(self.now(chain, RcptTo("<ok@example.com>"), macros(rcpt_mailer="smtp")), (Continue(),))
        self.assertEqual(self.pool["wants"].count("rcpt_to"), 3)
        self.assertEqual(self.pool["plain"].count("rcpt_to"), 2)
        self.assertNotIn(("rcpt_to", RcptTo("<gone@example.com>")), self.pool["plain"].calls)

    def test_macros_set_before_each_call(self) -> None:
        """Each filter sees the macros of the current command on self.macros."""
        chain = self.chain(self.pool.scripted("a"), self.pool.scripted("b"))
        self.now(chain, Connect("client.example"), macros(j="mx.example"))
        self.now(chain, Helo("client.example"), macros(j="mx.example", tls_version="TLSv1.3"))
        for name in ("a", "b"):
            self.assertEqual(
                self.pool[name].seen_macros, [{"j": "mx.example"}, {"j": "mx.example", "tls_version": "TLSv1.3"}]
            )


# -------------------------------------------------------------- fan-out/order


class FanOutTests(ChainCase):
    def test_all_called_at_once(self) -> None:
        """A pending filter 1 does not stop filter 2 from being called for the same command."""
        slow: Deferred[Any] = Deferred()
        chain = self.chain(self.pool.scripted("a", {"helo": slow}), self.pool.scripted("b"))
        self.now(chain, Connect("client.example"))
        outcome = self.later(chain, Helo("client.example"))
        self.assertEqual(self.pool["b"].stages(), ["connect", "helo"])
        slow.callback(None)
        self.assertEqual(self.successResultOf(outcome), (Continue(),))

    def test_later_reject_waits(self) -> None:
        """Filter 2's reject is not sent while filter 1 is pending; it is once filter 1 continues."""
        slow: Deferred[Any] = Deferred()
        chain = self.chain(
            self.pool.scripted("a", {"mail_from": slow}), self.pool.scripted("b", {"mail_from": Reject()})
        )
        self.now(chain, Connect("client.example"))
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        self.clock.advance(1)
        self.assertNoResult(outcome)
        slow.callback(Continue())
        self.assertEqual(self.successResultOf(outcome), (Reject(),))

    def test_later_reject_loses_to_earlier_tempfail(self) -> None:
        """When the pending filter 1 settles with its own refusal, that refusal wins."""
        slow: Deferred[Any] = Deferred()
        chain = self.chain(
            self.pool.scripted("a", {"mail_from": slow}), self.pool.scripted("b", {"mail_from": Reject()})
        )
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        slow.callback(TempFail())
        self.assertEqual(self.successResultOf(outcome), (TempFail(),))

    def test_earlier_reject_cancels_later(self) -> None:
        """Filter 1's reject answers at once and filter 2's pending work is cancelled."""
        cancelled: list[str] = []
        first, second = pending(cancelled, "a"), pending(cancelled, "b")
        chain = self.chain(
            self.pool.scripted("a", {"mail_from": first}), self.pool.scripted("b", {"mail_from": second})
        )
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        first.callback(Reject())
        self.assertEqual(self.successResultOf(outcome), (Reject(),))
        self.assertEqual(cancelled, ["b"])

    def test_sync_reject_cancels_later(self) -> None:
        """A synchronous reject by filter 1 answers at once even though filter 2 is pending."""
        cancelled: list[str] = []
        chain = self.chain(self.pool.scripted("a"), self.pool.scripted("b"))
        self.open_message(chain, "<first@example.com>")
        self.pool["a"].script["rcpt_to"] = Reject()
        self.pool["b"].script["rcpt_to"] = pending(cancelled, "b")
        self.assertEqual(self.now(chain, RcptTo("<x@example.com>")), (Reject(),))
        self.assertEqual(cancelled, ["b"])

    def test_accept_retires_for_message(self) -> None:
        """Accept by one of three filters retires only it, only for the rest of the message."""
        chain = self.chain(
            self.pool.scripted("a"), self.pool.scripted("b", {"rcpt_to": Accept()}), self.pool.scripted("c")
        )
        self.open_message(chain, "<one@example.com>", "<two@example.com>")
        for command in (Data(), Header("Subject", "hi"), EndOfHeaders(), BodyChunk(b"x")):
            self.assertEqual(self.now(chain, command), (Continue(),))
        self.assertEqual(self.now(chain, EndOfMessage()), (Continue(),))
        b = self.pool["b"]
        self.assertEqual(b.stages(), ["connect", "helo", "mail_from", "rcpt_to"])
        for name in ("a", "c"):
            self.assertEqual(self.pool[name].count("rcpt_to"), 2)
            self.assertEqual(self.pool[name].count("end_of_message"), 1)
        b.script.clear()
        self.now(chain, MailFrom("<s@example.com>"))
        self.now(chain, RcptTo("<three@example.com>"))
        self.assertEqual(b.stages()[-2:], ["mail_from", "rcpt_to"])

    def test_accept_at_connect_retires_for_connection(self) -> None:
        """Accept at connect retires a filter for every later message of the connection."""
        chain = self.chain(self.pool.scripted("a", {"connect": Accept()}), self.pool.scripted("b"))
        self.open_message(chain)
        self.now(chain, EndOfMessage())
        for command in (MailFrom("<s@example.com>"), RcptTo("<r@example.com>"), EndOfMessage()):
            self.assertEqual(self.now(chain, command), (Continue(),))
        self.assertEqual(self.pool["a"].stages(), ["connect"])
        self.assertEqual(self.pool["b"].count("end_of_message"), 2)

    def test_accept_at_helo_retires_for_connection(self) -> None:
        """Accept at helo retires a filter for the connection too."""
        chain = self.chain(self.pool.scripted("a", {"helo": Accept()}), self.pool.scripted("b"))
        self.open_message(chain)
        self.now(chain, EndOfMessage())
        self.now(chain, MailFrom("<s@example.com>"))
        self.assertEqual(self.pool["a"].stages(), ["connect", "helo"])

    def test_accept_only_when_all_accept(self) -> None:
        """The MTA sees Accept only once every filter accepted; the message then ends."""
        chain = self.chain(
            self.pool.scripted("a", {"mail_from": Accept()}), self.pool.scripted("b", {"rcpt_to": Accept()})
        )
        self.now(chain, Connect("client.example"))
        self.assertEqual(self.now(chain, MailFrom("<s@example.com>")), (Continue(),))
        self.assertEqual(self.now(chain, RcptTo("<r@example.com>")), (Accept(),))
        self.pool["a"].script.clear()
        self.now(chain, MailFrom("<s@example.com>"))
        self.assertEqual(self.pool["a"].count("mail_from"), 2)

    def test_accept_at_connect_by_all(self) -> None:
        """Accept by every filter at connect is sent as Accept."""
        chain = self.chain(
            self.pool.scripted("a", {"connect": Accept()}), self.pool.scripted("b", {"connect": Accept()})
        )
        self.assertEqual(self.now(chain, Connect("client.example")), (Accept(),))

    def test_accept_ignores_dry_run(self) -> None:
        """A filter in evaluation mode does not hold back the others' Accept, and goes on seeing the message."""
        chain = self.chain(self.pool.scripted("a", {"mail_from": Accept()}), self.pool.scripted("b", dry_run=True))
        self.now(chain, Connect("client.example"))
        # Continue rather than Accept, so that the MTA goes on sending the message for the dry run.
        self.assertEqual(self.now(chain, MailFrom("<s@example.com>")), (Continue(),))
        self.assertEqual(self.now(chain, RcptTo("<r@example.com>")), (Continue(),))
        self.assertEqual(self.pool["a"].stages(), ["connect", "mail_from"])
        self.assertEqual(self.pool["b"].stages(), ["connect", "mail_from", "rcpt_to"])
        self.assertEqual(self.now(chain, EndOfMessage()), (Accept(),))

    def test_skip_by_some(self) -> None:
        """Skip by some body readers continues; the skipper gets no more chunks."""
        chain = self.chain(self.pool.scripted("a", {"body": Skip()}), self.pool.scripted("b"))
        self.open_message(chain)
        self.assertEqual(self.now(chain, BodyChunk(b"one")), (Continue(),))
        self.assertEqual(self.now(chain, BodyChunk(b"two")), (Continue(),))
        self.assertEqual(self.pool["a"].count("body"), 1)
        self.assertEqual(self.pool["b"].count("body"), 2)
        self.assertEqual(self.now(chain, EndOfMessage()), (Continue(),))
        self.assertEqual(self.pool["a"].count("end_of_message"), 1)

    def test_skip_by_all(self) -> None:
        """Skip by every body reader is sent as Skip."""
        chain = self.chain(self.pool.scripted("a", {"body": Skip()}), self.pool.scripted("b"), Milter)
        self.open_message(chain)
        self.assertEqual(self.now(chain, BodyChunk(b"one")), (Continue(),))
        self.pool["b"].script["body"] = Skip()
        self.assertEqual(self.now(chain, BodyChunk(b"two")), (Skip(),))

    def test_skip_not_negotiated(self) -> None:
        """Without SKIP negotiated, Skip by all is sent as Continue and no more chunks go out."""
        chain = self.chain(
            self.pool.scripted("a", {"body": Skip()}), offer=Negotiate(protocol=ALL_PROTOCOL & ~ProtocolFlag.SKIP)
        )
        self.open_message(chain)
        self.assertEqual(self.now(chain, BodyChunk(b"one")), (Continue(),))
        self.assertEqual(self.now(chain, BodyChunk(b"two")), (Continue(),))
        self.assertEqual(self.pool["a"].count("body"), 1)

    def test_skip_reset_next_message(self) -> None:
        """A filter that skipped gets body chunks again in the next message."""
        chain = self.chain(self.pool.scripted("a", {"body": Skip()}), self.pool.scripted("b"))
        self.open_message(chain)
        self.now(chain, BodyChunk(b"one"))
        self.now(chain, EndOfMessage())
        self.now(chain, MailFrom("<s@example.com>"))
        self.now(chain, RcptTo("<r@example.com>"))
        self.now(chain, BodyChunk(b"two"))
        self.assertEqual(self.pool["a"].count("body"), 2)

    def test_rcpt_reject_refuses_one_recipient(self) -> None:
        """A reject at RCPT refuses only that recipient; later RCPTs still reach every filter."""
        chain = self.chain(
            self.pool.scripted("a", {"rcpt_to": lambda c: Reject() if "bad" in c.address else None}),
            self.pool.scripted("b"),
        )
        self.open_message(chain, "<good@example.com>")
        self.assertEqual(self.now(chain, RcptTo("<bad@example.com>")), (Reject(),))
        self.assertEqual(self.now(chain, RcptTo("<also-good@example.com>")), (Continue(),))
        for name in ("a", "b"):
            self.assertEqual(self.pool[name].count("rcpt_to"), 3)
            self.assertEqual(self.pool[name].count("abort"), 0)
        self.assertEqual(self.now(chain, EndOfMessage()), (Continue(),))

    def test_mail_refusal_aborts_others(self) -> None:
        """A refusal at MAIL ends the message: the other filters get abort(), the refuser does not."""
        chain = self.chain(
            self.pool.scripted("a"), self.pool.scripted("b", {"mail_from": TempFail()}), self.pool.scripted("c")
        )
        self.now(chain, Connect("client.example"))
        self.assertEqual(self.now(chain, MailFrom("<s@example.com>")), (TempFail(),))
        self.assertEqual(self.pool["a"].count("abort"), 1)
        self.assertEqual(self.pool["b"].count("abort"), 0)
        self.assertEqual(self.pool["c"].count("abort"), 1)
        self.assertEqual(self.now(chain, Abort()), ())
        self.assertEqual(self.pool["a"].count("abort"), 1)

    def test_content_refusal_aborts_others(self) -> None:
        """A refusal at a header ends the message for the other filters too."""
        chain = self.chain(self.pool.scripted("a", {"header": Discard()}), self.pool.scripted("b"))
        self.open_message(chain)
        self.assertEqual(self.now(chain, Header("Subject", "spam")), (Discard(),))
        self.assertEqual(self.pool["b"].count("abort"), 1)
        self.assertEqual(self.pool["a"].count("abort"), 0)

    def test_abort_revives(self) -> None:
        """ABORT calls abort() on filters in the message (not retired ones) and revives the retired."""
        chain = self.chain(self.pool.scripted("a", {"rcpt_to": Accept()}), self.pool.scripted("b"))
        self.open_message(chain)
        self.assertEqual(self.now(chain, Abort()), ())
        self.assertEqual(self.pool["a"].count("abort"), 0)
        self.assertEqual(self.pool["b"].count("abort"), 1)
        self.now(chain, MailFrom("<s@example.com>"))
        self.assertEqual(self.pool["a"].count("mail_from"), 2)

    def test_abort_twice(self) -> None:
        """A second ABORT does not call abort() again."""
        chain = self.chain(self.pool.scripted("a"))
        self.open_message(chain)
        self.now(chain, Abort())
        self.now(chain, Abort())
        self.assertEqual(self.pool["a"].count("abort"), 1)

    def test_abort_outside_message(self) -> None:
        """ABORT with no message open calls nobody."""
        chain = self.chain(self.pool.scripted("a"))
        self.now(chain, Connect("client.example"))
        self.assertEqual(self.now(chain, Abort()), ())
        self.assertEqual(self.pool["a"].count("abort"), 0)

    def test_pending_abort(self) -> None:
        """An abort() that returns a Deferred holds the chain until it fires."""
        done: Deferred[Any] = Deferred()
        chain = self.chain(self.pool.scripted("a", {"abort": done}))
        self.open_message(chain)
        outcome = self.later(chain, Abort())
        done.callback(None)
        self.assertEqual(self.successResultOf(outcome), ())

    def test_connect_refusal(self) -> None:
        """A refusal at connect is the answer."""
        chain = self.chain(self.pool.scripted("a"), self.pool.scripted("b", {"connect": Reject("go away")}))
        self.assertEqual(self.now(chain, Connect("client.example")), (Reject("go away"),))

    def test_accept_at_unknown_between_messages(self) -> None:
        """Accept at an unknown command outside a message retires nobody: the next HELO still arrives."""
        chain = self.chain(self.pool.scripted("a", {"unknown": Accept()}), self.pool.scripted("b"))
        self.now(chain, Connect("client.example"))
        self.assertEqual(self.now(chain, Unknown("XYZZY")), (Continue(),))
        self.now(chain, Helo("client.example"))
        self.assertEqual(self.pool["a"].stages(), ["connect", "unknown", "helo"])

    def test_accept_at_unknown_in_message(self) -> None:
        """Accept at an unknown command inside a message retires the filter for that message."""
        chain = self.chain(self.pool.scripted("a", {"unknown": Accept()}), self.pool.scripted("b"))
        self.open_message(chain)
        self.assertEqual(self.now(chain, Unknown("XYZZY")), (Continue(),))
        self.now(chain, RcptTo("<r2@example.com>"))
        self.assertEqual(self.pool["a"].count("rcpt_to"), 1)

    def test_unknown(self) -> None:
        """Unknown commands reach the filters and a refusal answers them."""
        chain = self.chain(self.pool.scripted("a", {"unknown": Reject()}))
        self.now(chain, Connect("client.example"))
        self.assertEqual(self.now(chain, Unknown("XYZZY")), (Reject(),))
        self.assertEqual(self.pool["a"].calls[-1], ("unknown", Unknown("XYZZY")))


# ------------------------------------------------------------------- failures


def boom(_: object) -> None:
    raise BoomError("filter exploded")


class FailureTests(ChainCase):
    def test_raise_tempfails(self) -> None:
        """A filter that raises gets TempFail, logged once with the connection id and traceback."""
        chain = self.chain(self.pool.scripted("a", {"helo": boom}), self.pool.scripted("b"))
        self.assertEqual(self.now(chain, Helo("client.example")), (TempFail(),))
        errors = self.logged()
        self.assertEqual(len(errors), 1)
        self.assertIn(CONN, errors[0])
        self.assertIn("Traceback", errors[0])
        self.assertIn("filter exploded", errors[0])
        self.assertIn("a", errors[0])
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 1)
        self.assertEqual(self.observer.failures, [("a", "helo", "error")])

    def test_configured_fallbacks(self) -> None:
        """The fallback can be Accept, Continue or Reject instead of TempFail."""
        for fallback, answer in ((Accept(), Accept()), (Continue(), Continue()), (Reject(), Reject())):
            chain = self.chain(self.pool.scripted("a", {"helo": boom}, fallback=fallback))
            self.assertEqual(self.now(chain, Helo("client.example")), (answer,))
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 3)

    def test_bad_fallback(self) -> None:
        """A fallback other than TempFail, Accept, Continue or Reject is a configuration error."""
        self.assertRaises(ConfigurationError, FilterSpec, Milter, fallback=Discard())
        self.assertRaises(ConfigurationError, FilterSpec, Milter, timeout=0)

    def test_deferred_failure(self) -> None:
        """A Deferred that fails later gives the fallback, logged with its traceback."""
        slow: Deferred[Any] = Deferred()
        chain = self.chain(self.pool.scripted("a", {"mail_from": slow}, fallback=Reject()))
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        slow.errback(BoomError("late"))
        self.assertEqual(self.successResultOf(outcome), (Reject(),))
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 1)
        self.assertIn("late", self.logged()[0])

    def test_failed_deferred_now(self) -> None:
        """A Deferred that has already failed gives the fallback at once."""
        failed: Deferred[Any] = Deferred()
        failed.errback(BoomError("already"))
        chain = self.chain(self.pool.scripted("a", {"mail_from": failed}))
        self.assertEqual(self.now(chain, MailFrom("<s@example.com>")), (TempFail(),))
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 1)

    def test_own_cancellation_fails(self) -> None:
        """A filter whose own Deferred is cancelled (not by the chain) gets its fallback."""
        own: Deferred[Any] = Deferred()
        chain = self.chain(self.pool.scripted("a", {"mail_from": own}))
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        own.cancel()
        self.assertEqual(self.successResultOf(outcome), (TempFail(),))
        self.assertEqual(len(self.logged()), 1)
        self.assertEqual(len(self.flushLoggedErrors(CancelledError)), 1)

    def test_timeout(self) -> None:
        """A filter still pending at its timeout gets its fallback; its work is cancelled and logged."""
        cancelled: list[str] = []
        chain = self.chain(self.pool.scripted("a", {"rcpt_to": pending(cancelled, "a")}, timeout=5))
        self.now(chain, MailFrom("<s@example.com>"))
        outcome = self.later(chain, RcptTo("<r@example.com>"))
        self.clock.advance(4.9)
        self.assertNoResult(outcome)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(outcome), (TempFail(),))
        self.assertEqual(cancelled, ["a"])
        errors = self.logged()
        self.assertEqual(len(errors), 1)
        self.assertIn(CONN, errors[0])
        self.assertIn("timed out", errors[0])
        self.assertEqual(self.observer.failures, [("a", "rcpt_to", "timeout")])

    def test_garbage(self) -> None:
        """A filter returning something that is not a verdict gets its fallback, with a log line."""
        for garbage in ("ok", 42, Reject, succeed("later")):
            self.events.clear()
            chain = self.chain(self.pool.scripted("a", {"mail_from": garbage}))
            self.assertEqual(self.now(chain, MailFrom("<s@example.com>")), (TempFail(),), garbage)
            errors = self.logged()
            self.assertEqual(len(errors), 1, garbage)
            self.assertIn(CONN, errors[0])
        self.assertEqual({f[2] for f in self.observer.failures}, {"bad-verdict"})

    def test_garbage_later(self) -> None:
        """A Deferred that fires with garbage gives the fallback."""
        slow: Deferred[Any] = Deferred()
        chain = self.chain(self.pool.scripted("a", {"mail_from": slow}))
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        slow.callback(["not", "a", "verdict"])
        self.assertEqual(self.successResultOf(outcome), (TempFail(),))
        self.assertEqual(len(self.logged()), 1)

    def test_illegal_verdicts(self) -> None:
        """Skip outside the body and Discard at connect or helo give the fallback."""
        cases: list[tuple[str, Command, object]] = [
            ("helo", Helo("client.example"), Skip()),
            ("connect", Connect("client.example"), Discard()),
            ("helo", Helo("client.example"), Discard()),
            ("rcpt_to", RcptTo("<r@example.com>"), Skip()),
        ]
        for stage, command, verdict in cases:
            chain = self.chain(self.pool.scripted("a", {stage: verdict}))
            self.now(chain, MailFrom("<s@example.com>")) if stage == "rcpt_to" else None
            self.assertEqual(self.now(chain, command), (TempFail(),), (stage, verdict))
        self.assertEqual(len(self.logged()), 4)

    def test_illegal_skip_at_end_of_message(self) -> None:
        """Skip at end of message gives the fallback."""
        chain = self.chain(self.pool.scripted("a", {"end_of_message": Skip()}, fallback=Continue()))
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (Continue(),))
        self.assertEqual(len(self.logged()), 1)

    def test_discard_in_message(self) -> None:
        """Discard during a message is a legal answer."""
        chain = self.chain(self.pool.scripted("a", {"rcpt_to": Discard()}))
        self.now(chain, MailFrom("<s@example.com>"))
        self.assertEqual(self.now(chain, RcptTo("<r@example.com>")), (Discard(),))
        self.assertEqual(self.logged(), [])

    def test_no_reply_reject_ignored(self) -> None:
        """A no_reply callback returning Reject is ignored, with an error logged."""
        chain = self.chain(self.pool.spec("obs", lambda: Observing({"header": Reject()})), self.pool.scripted("b"))
        self.open_message(chain)
        self.assertEqual(self.now(chain, Header("Subject", "hi")), (Continue(),))
        errors = self.logged()
        self.assertEqual(len(errors), 1)
        self.assertIn("no_reply", errors[0])
        self.assertEqual(self.pool["b"].count("abort"), 0)

    def test_no_reply_failure_ignored(self) -> None:
        """A no_reply callback that raises continues (the MTA reads no reply) and is logged."""
        chain = self.chain(self.pool.spec("obs", lambda: Observing({"header": boom})), self.pool.scripted("b"))
        self.open_message(chain)
        self.assertEqual(self.now(chain, Header("Subject", "hi")), (Continue(),))
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 1)
        self.assertEqual(self.pool["b"].count("abort"), 0)
        self.assertEqual(self.now(chain, EndOfHeaders()), (Continue(),))
        self.assertEqual(self.pool["obs"].count("end_of_headers"), 1)

    def test_no_reply_timeout_ignored(self) -> None:
        """A no_reply callback that times out continues."""
        chain = self.chain(self.pool.spec("obs", lambda: Observing({"rcpt_to": Deferred()}), timeout=3))
        self.now(chain, MailFrom("<s@example.com>"))
        outcome = self.later(chain, RcptTo("<r@example.com>"))
        self.clock.advance(3)
        self.assertEqual(self.successResultOf(outcome), (Continue(),))

    def test_abort_and_close_failures_logged(self) -> None:
        """Exceptions from abort() and close() are logged and do not stop the other filters."""
        chain = self.chain(self.pool.scripted("a", {"abort": boom, "close": boom}), self.pool.scripted("b"))
        self.open_message(chain)
        self.assertEqual(self.now(chain, Abort()), ())
        self.assertEqual(self.now(chain, Quit()), ())
        self.assertEqual(self.pool["b"].stages()[-2:], ["abort", "close"])
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 2)

    def test_verify_no_reply_names(self) -> None:
        """verify_filters refuses no_reply names that are not callbacks, or given as one string."""

        class Typo(Milter):
            no_reply = frozenset({"headers"})

        class Eom(Milter):
            no_reply = frozenset({"end_of_message"})

        class Text(Milter):
            no_reply = "header"  # type: ignore[assignment]

        for milter in (Typo, Eom, Text):
            error = self.assertRaises(ConfigurationError, verify_filters, [milter])
            self.assertIn("no_reply", str(error))
        verify_filters([SilentHeaderReader, Observing])

    def test_verify_filters(self) -> None:
        """verify_filters makes each filter once and reports factories that fail or do not provide IMilter."""
        self.assertEqual([s.name for s in verify_filters([Milter, FilterSpec(Milter, name="x")])], ["Milter", "x"])
        self.assertRaises(ConfigurationError, verify_filters, [lambda: boom(None)])
        self.assertRaises(ConfigurationError, verify_filters, [object])


# ----------------------------------------------------------------- coroutines


class CoroutineTests(ChainCase):
    def test_awaiting_coroutine(self) -> None:
        """An async def callback that awaits a Deferred answers when it finishes."""
        gate: Deferred[str] = Deferred()

        class Awaiting(Milter):
            async def mail_from(self, command: MailFrom) -> Reject | None:
                reason = await gate
                return Reject(reason)

        chain = self.chain(Awaiting, self.pool.scripted("b"))
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        gate.callback("no entry")
        self.assertEqual(self.successResultOf(outcome), (Reject("no entry"),))

    def test_synchronous_coroutine(self) -> None:
        """An async def callback that never waits answers without a Deferred."""

        class Quick(Milter):
            async def helo(self, command: Helo) -> TempFail:
                return TempFail()

        chain = self.chain(Quick)
        self.assertEqual(self.now(chain, Helo("client.example")), (TempFail(),))

    def test_coroutine_raises(self) -> None:
        """An async def callback that raises gives the fallback."""

        class Raising(Milter):
            async def helo(self, command: Helo) -> None:
                raise BoomError("async")

        chain = self.chain(Raising)
        self.assertEqual(self.now(chain, Helo("client.example")), (TempFail(),))
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 1)

    def test_synchronous_answers_are_tuples(self) -> None:
        """When every filter answers synchronously (verdicts, None, fired Deferreds) handle returns a tuple."""
        chain = self.chain(
            self.pool.scripted("none"),
            self.pool.scripted("verdicts", {"connect": Continue(), "helo": Continue()}),
            self.pool.scripted("fired", {"connect": succeed(None), "helo": succeed(Continue())}),
        )
        self.assertEqual(self.now(chain, Connect("client.example")), (Continue(),))
        self.assertEqual(self.now(chain, Helo("client.example")), (Continue(),))
        self.assertEqual(self.now(chain, MailFrom("<s@example.com>")), (Continue(),))

    def test_async_end_of_message(self) -> None:
        """An async end_of_message may record changes after awaiting."""
        gate: Deferred[None] = Deferred()

        class Stamper(Milter):
            actions = Action.ADD_HEADERS

            async def end_of_message(self, changes: Changes) -> None:
                await gate
                changes.add_header("X-Stamp", "yes")

        chain = self.chain(Stamper)
        self.now(chain, MailFrom("<s@example.com>"))
        outcome = self.later(chain, EndOfMessage())
        gate.callback(None)
        self.assertEqual(self.successResultOf(outcome), (AddHeader("X-Stamp", "yes"), Continue()))


# ------------------------------------------------------------- end of message


def adds(name: str, value: str) -> Callable[[Changes], None]:
    return lambda changes: changes.add_header(name, value)


class EndOfMessageTests(ChainCase):
    def editors(self, *scripts: Mapping[str, object], **options: Any) -> Chain:
        def maker(script: Mapping[str, object]) -> Callable[[], IMilter]:
            return lambda: Editor(script)

        return self.chain(*(self.pool.spec(f"e{n}", maker(script), **options) for n, script in enumerate(scripts)))

    def test_changes_in_filter_order(self) -> None:
        """Changes are applied in filter order, then the final verdict."""

        def second(changes: Changes) -> None:
            changes.add_header("X-Two", "2")
            changes.change_from("<new@example.com>")

        chain = self.editors({"end_of_message": adds("X-One", "1")}, {"end_of_message": second})
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (
            AddHeader("X-One", "1"), AddHeader("X-Two", "2"), ChangeFrom("<new@example.com>"), Continue(),
        ))

    def test_pending_filter_keeps_order(self) -> None:
        """A slow filter 1's changes still come before filter 2's."""
        gate: Deferred[Any] = Deferred()

        def slow(changes: Changes) -> Deferred[Any]:
            def stamp(_: object) -> None:
                changes.add_header("X-One", "1")
            return gate.addCallback(stamp)

        chain = self.editors({"end_of_message": slow}, {"end_of_message": adds("X-Two", "2")})
        self.open_message(chain)
        outcome = self.later(chain, EndOfMessage())
        gate.callback(None)
        self.assertEqual(
            self.successResultOf(outcome), (AddHeader("X-One", "1"), AddHeader("X-Two", "2"), Continue())
        )

    def send_headers(self, chain: Chain, *headers: tuple[str, str]) -> None:
        for name, value in headers:
            self.now(chain, Header(name, value))
        self.now(chain, EndOfHeaders())

    def test_insert_above_rebases_change(self) -> None:
        """Filter 1 inserts X-A at 0; filter 2's change of the original X-A #1 goes out as #2."""

        def second(changes: Changes) -> None:
            changes.change_header("X-A", "changed", index=1)

        chain = self.chain(
            ScriptedHeaderEditor(lambda changes: changes.insert_header("X-A", "new", index=0)),
            ScriptedHeaderEditor(second),
        )
        self.now(chain, MailFrom("<s@example.com>"))
        self.send_headers(chain, ("Subject", "hi"), ("X-A", "old"))
        self.assertEqual(self.now(chain, EndOfMessage()), (
            InsertHeader(0, "X-A", "new"), ChangeHeader(2, "X-A", "changed"), Continue(),
        ))

    def test_two_deletes_rebased(self) -> None:
        """Filter 1 deletes Received #1, filter 2 deletes Received #2: the second goes out as #1."""
        chain = self.editors(
            {"end_of_message": lambda c: c.delete_header("Received", index=1)},
            {"end_of_message": lambda c: c.delete_header("Received", index=2)},
        )
        self.open_message(chain)
        self.send_headers(chain, ("Received", "from a"), ("Received", "from b"))
        self.assertEqual(self.now(chain, EndOfMessage()), (
            ChangeHeader(1, "Received", ""), ChangeHeader(1, "Received", ""), Continue(),
        ))

    def test_insert_after_deleted_header(self) -> None:
        """Filter 2's insert right after a header filter 1 deleted lands where that header was."""
        chain = self.editors(
            {"end_of_message": lambda c: c.delete_header("X-Gone")},
            {"end_of_message": lambda c: c.insert_header("X-New", "v", index=3)},
        )
        self.open_message(chain)
        self.send_headers(chain, ("Subject", "hi"), ("X-Gone", "bye"), ("To", "r@example.com"))
        self.assertEqual(self.now(chain, EndOfMessage()), (
            ChangeHeader(1, "X-Gone", ""), InsertHeader(2, "X-New", "v"), Continue(),
        ))

    def test_headers_forgotten_between_messages(self) -> None:
        """Rebasing uses only the current message's headers."""
        chain = self.editors(
            {"end_of_message": lambda c: c.delete_header("Received", index=1)},
            {"end_of_message": lambda c: c.delete_header("Received", index=2)},
        )
        self.open_message(chain)
        self.send_headers(chain, ("Received", "from a"), ("Received", "from b"))
        self.now(chain, EndOfMessage())
        self.now(chain, MailFrom("<s@example.com>"))
        self.now(chain, RcptTo("<r@example.com>"))
        self.send_headers(chain, ("Received", "from c"))
        self.assertEqual(self.now(chain, EndOfMessage()), (
            ChangeHeader(1, "Received", ""), ChangeHeader(1, "Received", ""), Continue(),
        ))

    def test_two_bodies(self) -> None:
        """Two body replacements: the later filter's wins and a warning names both."""
        chain = self.editors(
            {"end_of_message": lambda c: c.replace_body(b"one\r\n")},
            {"end_of_message": lambda c: c.replace_body(b"two\r\n")},
        )
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (ReplaceBody(b"two\r\n"), Continue()))
        warnings = self.logged(LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("e0", warnings[0])
        self.assertIn("e1", warnings[0])
        self.assertIn(CONN, warnings[0])

    def test_two_senders(self) -> None:
        """Two sender changes: the later filter's wins and a warning names both."""
        chain = self.editors(
            {"end_of_message": lambda c: c.change_from("<one@example.com>")},
            {"end_of_message": lambda c: c.change_from("<two@example.com>")},
        )
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (ChangeFrom("<two@example.com>"), Continue()))
        warnings = self.logged(LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("e0", warnings[0])
        self.assertIn("e1", warnings[0])

    def test_refusal_sends_no_changes(self) -> None:
        """A reject, tempfail or discard at end of message sends no changes at all."""
        for refusal in (Reject(), TempFail(), Discard()):
            def refuse(changes: Changes, verdict: object = refusal) -> object:
                changes.add_header("X-Two", "2")
                return verdict

            chain = self.editors({"end_of_message": adds("X-One", "1")}, {"end_of_message": refuse})
            self.open_message(chain)
            self.assertEqual(self.now(chain, EndOfMessage()), (refusal,))

    def test_accept_by_all_at_end(self) -> None:
        """Accept from every filter at end of message is sent after the changes."""
        def accept(changes: Changes) -> Accept:
            changes.add_header("X-One", "1")
            return Accept()

        chain = self.editors({"end_of_message": accept}, {"end_of_message": Accept()})
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (AddHeader("X-One", "1"), Accept()))

    def test_accept_by_some_at_end(self) -> None:
        """Accept from only some filters at end of message is sent as Continue."""
        chain = self.editors({"end_of_message": Accept()}, {})
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (Continue(),))

    def test_retired_filter_not_called(self) -> None:
        """A filter retired earlier in the message gets no end_of_message call, and its changes none."""
        chain = self.editors({"rcpt_to": Accept(), "end_of_message": adds("X-One", "1")}, {})
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (Continue(),))
        self.assertEqual(self.pool["e0"].count("end_of_message"), 0)
        self.assertEqual(self.pool["e1"].count("end_of_message"), 1)

    def test_undeclared_action(self) -> None:
        """A change the filter did not declare raises LocalProtocolError at the call: the fallback answers."""
        errors: list[Exception] = []

        def sneaky(changes: Changes) -> None:
            try:
                changes.change_from("<evil@example.com>")
            except LocalProtocolError as e:
                errors.append(e)
                raise

        chain = self.chain(self.pool.scripted("plain", {"end_of_message": sneaky}))
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (TempFail(),))
        self.assertEqual(len(errors), 1)
        self.assertEqual(len(self.flushLoggedErrors(LocalProtocolError)), 1)

    def test_failed_filter_changes_dropped(self) -> None:
        """A filter that fails at end of message gets its fallback, and its half-made changes are dropped."""

        def half(changes: Changes) -> None:
            changes.delete_header("X-Old")
            raise BoomError("before adding the new header")

        chain = self.editors({"end_of_message": half}, {"end_of_message": adds("X-Two", "2")}, fallback=Continue())
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (AddHeader("X-Two", "2"), Continue()))
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 1)
        self.assertNotIn(("e0", "ChangeHeader", False), self.observer.changes)

    def test_timed_out_filter_changes_dropped(self) -> None:
        """A filter timing out at end of message has its changes dropped; the next message is clean."""
        gate: Deferred[Any] = Deferred()

        def slow(changes: Changes) -> Deferred[Any]:
            changes.add_header("X-Partial", "1")
            return gate

        chain = self.editors({"end_of_message": slow}, {"end_of_message": adds("X-Two", "2")}, fallback=Accept())
        self.open_message(chain)
        outcome = self.later(chain, EndOfMessage())
        self.clock.advance(25)
        self.assertEqual(self.successResultOf(outcome), (AddHeader("X-Two", "2"), Continue()))
        self.pool["e0"].script["end_of_message"] = adds("X-One", "1")
        self.now(chain, MailFrom("<s@example.com>"))
        self.now(chain, RcptTo("<r@example.com>"))
        self.assertEqual(
            self.now(chain, EndOfMessage()), (AddHeader("X-One", "1"), AddHeader("X-Two", "2"), Continue())
        )

    def test_progress_keepalives(self) -> None:
        """While end_of_message is pending, send_progress is called every interval until it settles."""
        gate: Deferred[Any] = Deferred()
        chain = self.chain(self.pool.scripted("a", {"end_of_message": gate}), interval=10)
        self.open_message(chain)
        outcome = self.later(chain, EndOfMessage())
        self.clock.advance(9)
        self.assertEqual(self.progress, [])
        self.clock.advance(1)
        self.assertEqual(self.progress, [10])
        self.clock.advance(10)
        self.assertEqual(self.progress, [10, 20])
        gate.callback(None)
        self.assertEqual(self.successResultOf(outcome), (Continue(),))
        self.clock.advance(100)
        self.assertEqual(self.progress, [10, 20])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_progress_call(self) -> None:
        """changes.progress() calls send_progress at once."""
        gate: Deferred[Any] = Deferred()

        def working(changes: Changes) -> Deferred[Any]:
            changes.progress()
            return gate

        chain = self.chain(self.pool.scripted("a", {"end_of_message": working}))
        self.open_message(chain)
        outcome = self.later(chain, EndOfMessage())
        self.assertEqual(self.progress, [0])
        gate.callback(None)
        self.successResultOf(outcome)

    def test_no_progress_when_synchronous(self) -> None:
        """A synchronous end of message schedules no keep-alive."""
        chain = self.chain(self.pool.scripted("a"))
        self.open_message(chain)
        self.now(chain, EndOfMessage())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusal_aborts_unfinished(self) -> None:
        """A refusal at end of message cancels later filters' work and tells them with abort()."""
        cancelled: list[str] = []
        gate = pending(cancelled, "b")
        chain = self.chain(
            self.pool.scripted("a", {"end_of_message": Reject()}), self.pool.scripted("b", {"end_of_message": gate})
        )
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (Reject(),))
        self.assertEqual(cancelled, ["b"])
        self.assertEqual(self.pool["b"].count("abort"), 1)
        self.assertEqual(self.pool["a"].count("abort"), 0)

    def test_message_ends(self) -> None:
        """After end of message a new message starts fresh; ABORT then calls nobody."""
        chain = self.chain(self.pool.scripted("a"))
        self.open_message(chain)
        self.now(chain, EndOfMessage())
        self.now(chain, Abort())
        self.assertEqual(self.pool["a"].count("abort"), 0)


# ------------------------------------------------------------ evaluation mode


class EvaluationTests(ChainCase):
    def test_dry_run_reject_not_sent(self) -> None:
        """A dry-run Reject is logged and counted but does not refuse."""
        chain = self.chain(self.pool.scripted("eval", {"rcpt_to": Reject()}, dry_run=True), self.pool.scripted("b"))
        self.open_message(chain)
        self.assertEqual(self.now(chain, RcptTo("<r2@example.com>")), (Continue(),))
        self.assertIn(("eval", "rcpt_to", "Reject", True), self.observer.verdicts)
        infos = self.logged(LogLevel.info)
        self.assertTrue(any("eval" in line and "Reject" in line and CONN in line for line in infos), infos)
        self.assertEqual(self.pool["b"].count("abort"), 0)

    def test_dry_run_mail_reject_keeps_message(self) -> None:
        """A dry-run refusal at MAIL does not end the message."""
        chain = self.chain(self.pool.scripted("eval", {"mail_from": TempFail()}, dry_run=True), self.pool.scripted("b"))
        self.assertEqual(self.now(chain, MailFrom("<s@example.com>")), (Continue(),))
        self.assertEqual(self.pool["b"].count("abort"), 0)
        self.assertEqual(self.now(chain, RcptTo("<r@example.com>")), (Continue(),))
        self.assertEqual(self.pool["eval"].count("rcpt_to"), 1)

    def test_dry_run_before_real_refusal(self) -> None:
        """A dry-run refusal before a real one does not hide the real one."""
        chain = self.chain(
            self.pool.scripted("eval", {"mail_from": Discard()}, dry_run=True),
            self.pool.scripted("real", {"mail_from": Reject()}),
        )
        self.assertEqual(self.now(chain, MailFrom("<s@example.com>")), (Reject(),))

    def test_dry_run_changes_not_sent(self) -> None:
        """A dry-run filter's changes and end-of-message verdict are logged and counted, never sent."""

        def evaluate(changes: Changes) -> Reject:
            changes.add_header("X-Eval", "1")
            changes.replace_body(b"eval\r\n")
            return Reject()

        chain = self.chain(
            self.pool.spec("eval", lambda: Editor({"end_of_message": evaluate}), dry_run=True),
            self.pool.spec("real", lambda: Editor({"end_of_message": adds("X-Real", "1")})),
        )
        self.open_message(chain)
        self.assertEqual(self.now(chain, EndOfMessage()), (AddHeader("X-Real", "1"), Continue()))
        self.assertIn(("eval", "AddHeader", True), self.observer.changes)
        self.assertIn(("eval", "ReplaceBody", True), self.observer.changes)
        self.assertIn(("real", "AddHeader", False), self.observer.changes)
        self.assertIn(("eval", "end_of_message", "Reject", True), self.observer.verdicts)
        infos = self.logged(LogLevel.info)
        self.assertTrue(any("eval" in line and "AddHeader" in line for line in infos), infos)

    def test_dry_run_failure_not_sent(self) -> None:
        """A dry-run filter that raises does not refuse: its fallback is only logged."""
        chain = self.chain(self.pool.scripted("eval", {"helo": boom}, dry_run=True))
        self.assertEqual(self.now(chain, Helo("client.example")), (Continue(),))
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 1)


# ------------------------------------------------------------------- observer


class ObserverTests(ChainCase):
    def test_verdict_counts(self) -> None:
        """Each filter's verdict is reported per stage."""
        chain = self.chain(self.pool.scripted("a", {"helo": Continue()}), self.pool.scripted("b", {"helo": Reject()}))
        self.now(chain, Helo("client.example"))
        self.assertEqual(self.observer.verdicts, [
            ("a", "helo", "Continue", False), ("b", "helo", "Reject", False),
        ])

    def test_change_counts(self) -> None:
        """Each change is reported with its kind and filter."""

        def edit(changes: Changes) -> None:
            changes.add_header("X-A", "1")
            changes.add_header("X-B", "2")
            changes.change_from("<s@example.com>")

        chain = self.chain(self.pool.spec("a", lambda: Editor({"end_of_message": edit})))
        self.open_message(chain)
        self.now(chain, EndOfMessage())
        self.assertEqual(self.observer.changes, [
            ("a", "AddHeader", False), ("a", "AddHeader", False), ("a", "ChangeFrom", False),
        ])

    def test_latency(self) -> None:
        """The time each filter took is reported, for slow and synchronous answers alike."""
        slow: Deferred[Any] = Deferred()
        chain = self.chain(self.pool.scripted("slow", {"mail_from": slow}), self.pool.scripted("quick"))
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        self.clock.advance(3)
        slow.callback(None)
        self.successResultOf(outcome)
        self.assertEqual(sorted(self.observer.latencies), [("quick", "mail_from", 0.0), ("slow", "mail_from", 3.0)])

    def test_failures(self) -> None:
        """Errors, timeouts and bad verdicts are reported per filter and stage."""
        chain = self.chain(
            self.pool.scripted("slow", {"mail_from": Deferred()}, timeout=1, fallback=Continue()),
            self.pool.scripted("garbage", {"mail_from": "yes"}),
            self.pool.scripted("raises", {"mail_from": boom}),
            self.pool.scripted("fine"),
        )
        outcome = self.later(chain, MailFrom("<s@example.com>"))
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(outcome), (TempFail(),))
        self.assertEqual(sorted(self.observer.failures), [
            ("garbage", "mail_from", "bad-verdict"), ("raises", "mail_from", "error"),
            ("slow", "mail_from", "timeout"),
        ])
        self.flushLoggedErrors(BoomError)


# ---------------------------------------------------------------------- close


class CloseTests(ChainCase):
    def test_connection_lost(self) -> None:
        """connection_lost cancels pending work, aborts filters in a message, closes each filter once."""
        cancelled: list[str] = []
        chain = self.chain(self.pool.scripted("a"), self.pool.scripted("b"))
        self.open_message(chain)
        self.pool["a"].script["rcpt_to"] = pending(cancelled, "a")
        outcome = self.later(chain, RcptTo("<r2@example.com>"))
        chain.connection_lost(True)
        self.assertEqual(cancelled, ["a"])
        self.assertEqual(self.successResultOf(outcome), ())
        for name in ("a", "b"):
            self.assertEqual(self.pool[name].stages()[-2:], ["abort", "close"])
            self.assertEqual(self.pool[name].count("close"), 1)
        chain.connection_lost(False)
        self.assertEqual(self.pool["a"].count("close"), 1)
        self.assertEqual([v for v in self.observer.verdicts if v[1] == "rcpt_to"], [
            ("a", "rcpt_to", "Continue", False), ("b", "rcpt_to", "Continue", False),
        ])
        self.assertEqual(self.logged(), [])

    def test_connection_lost_during_end_of_message(self) -> None:
        """A connection lost while end_of_message is pending aborts the filters in the message."""
        chain = self.chain(self.pool.scripted("a", {"end_of_message": Deferred()}), self.pool.scripted("b"))
        self.open_message(chain)
        outcome = self.later(chain, EndOfMessage())
        chain.connection_lost(self.sessions[chain].in_transaction)  # the message is open until answered
        self.assertEqual(self.successResultOf(outcome), ())
        for name in ("a", "b"):
            self.assertEqual(self.pool[name].stages()[-2:], ["abort", "close"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_outside_message(self) -> None:
        """Outside a message connection_lost closes without abort."""
        chain = self.chain(self.pool.scripted("a"))
        self.now(chain, Connect("client.example"))
        chain.connection_lost(False)
        self.assertEqual(self.pool["a"].stages(), ["connect", "close"])

    def test_pending_abort_cancelled(self) -> None:
        """Pending abort work is cancelled by connection_lost without an error logged."""
        cancelled: list[str] = []
        chain = self.chain(self.pool.scripted("a", {"abort": pending(cancelled, "a")}))
        self.open_message(chain)
        outcome = self.later(chain, Abort())
        chain.connection_lost(False)
        self.assertEqual(cancelled, ["a"])
        self.assertEqual(self.successResultOf(outcome), ())
        self.assertEqual(self.logged(), [])

    def test_quit(self) -> None:
        """Quit closes every filter once; a later connection_lost does not close again."""
        chain = self.chain(self.pool.scripted("a"), self.pool.scripted("b"))
        self.now(chain, Connect("client.example"))
        self.assertEqual(self.now(chain, Quit()), ())
        chain.connection_lost(False)
        self.assertEqual(self.now(chain, Disconnected()), ())
        for name in ("a", "b"):
            self.assertEqual(self.pool[name].count("close"), 1)

    def test_disconnected(self) -> None:
        """The end of the stream closes every filter."""
        chain = self.chain(self.pool.scripted("a"))
        self.assertEqual(self.now(chain, Disconnected()), ())
        self.assertEqual(self.pool["a"].stages(), ["close"])

    def test_pending_close(self) -> None:
        """A close() that returns a Deferred holds the Quit answer until it fires, or its timeout."""
        chain = self.chain(self.pool.scripted("a", {"close": Deferred()}, timeout=2))
        outcome = self.later(chain, Quit())
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(outcome), ())
        self.assertEqual(len(self.logged()), 1)

    def test_quit_no_close(self) -> None:
        """QuitNoClose closes the filters and makes fresh instances for the next session."""
        chain = self.chain(self.pool.spec("a", SpacedEditor), self.pool.scripted("b", {"connect": Accept()}))
        self.now(chain, Connect("client.example"))
        old_a, old_b = self.pool["a"], self.pool["b"]
        self.assertEqual(self.now(chain, QuitNoClose()), ())
        self.assertEqual(old_a.stages(), ["connect", "close"])
        self.assertEqual(old_b.stages(), ["connect", "close"])
        self.assertEqual(len(self.pool.made["a"]), 2)
        self.assertEqual(len(self.pool.made["b"]), 2)
        self.now(chain, Connect("again.example"))
        self.now(chain, MailFrom("<s@example.com>"))
        self.now(chain, RcptTo("<r@example.com>"))
        self.now(chain, Header("Subject", " hi"))
        self.assertEqual(self.pool["a"].stages(), ["connect", "mail_from", "rcpt_to", "header"])
        self.assertEqual(self.pool["b"].stages(), ["connect"])
        self.assertEqual(self.pool["a"].calls[-1], ("header", Header("Subject", " hi")))
        self.now(chain, Quit())
        self.assertEqual(self.pool["a"].count("close"), 1)
        self.assertEqual(old_a.count("close"), 1)


class TestFilterTests(SynchronousTestCase):
    def test_filters_provide_imilter(self) -> None:
        """Every test filter provides IMilter."""
        for milter in (Scripted(), Editor(), SpacedEditor(), RejectedReader(), Observing(), HeaderReader(),
                       SilentHeaderReader(), RcptReader(), BodyReader(), HeaderEditor(), SenderChanger(),
                       MacroWanter(), OtherMacroWanter(), SpaceWanter()):
            self.assertTrue(verifyObject(IMilter, milter))

