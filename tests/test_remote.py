"""RemoteMilter against a scripted remote on a StringTransport: forwarding, adaptation, failure."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from txmilt.chain import FilterSpec
from txmilt.client import MilterClient
from txmilt.codec import encode
from txmilt.errors import ConfigurationError, MilterUnavailableError
from txmilt.interfaces import IMilter
from txmilt.messages import (
    ALL_ACTIONS,
    Abort,
    Accept,
    Action,
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Continue,
    DeleteRecipient,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    InsertHeader,
    Macros,
    MacroStage,
    MailFrom,
    Negotiate,
    NegotiateReply,
    Progress,
    ProtocolFlag,
    Quarantine,
    Quit,
    RcptTo,
    Reject,
    ReplaceBody,
    Response,
    Shutdown,
    Skip,
    TempFail,
)
from txmilt.milter import Changes, Result
from txmilt.remote import RemoteMilter, remote_filter
from txmilt.session import MacroView

CONNECT = Connect("mail.example.com", Family.INET, 54321, "192.0.2.10")


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects each protocol to a new StringTransport, or refuses."""

    def __init__(self, refuse: bool = False, hang: bool = False) -> None:
        self.refuse = refuse
        self.hang = hang
        self.cancelled = False
        self.transport = StringTransport()
        self.protocol: Any = None

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if self.refuse:
            d: Deferred[Any] = Deferred()
            d.errback(ConnectionRefusedError("refused"))
            return d
        if self.hang:
            return Deferred(lambda _: setattr(self, "cancelled", True))
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8891))
        assert protocol is not None
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        return succeed(protocol)


def macros(**values: str) -> MacroView:
    return MacroView((values,))


class Remote:
    """A RemoteMilter, its clock, and the remote end scripted by hand."""

    def __init__(self, endpoint: FakeEndpoint | None = None, **options: Any) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = endpoint or FakeEndpoint()
        options.setdefault("timeout", 5.0)
        self.milter = RemoteMilter(self.endpoint, reactor=self.clock, **options)

    def take(self) -> bytes:
        data: bytes = self.endpoint.transport.value()
        self.endpoint.transport.clear()
        return data

    def answer(self, *responses: Response) -> None:
        assert self.endpoint.protocol is not None
        self.endpoint.protocol.dataReceived(b"".join(encode(r) for r in responses))

    def start(self, reply: NegotiateReply, view: MacroView | None = None) -> Result:
        """Call connect; the remote negotiates ``reply``. The connect result (not answered yet)."""
        self.milter.macros = view or macros()
        result = self.milter.connect(CONNECT)
        offer = self.take()
        assert offer == encode(self.milter.remote_offer()), offer
        self.answer(reply)
        return result

    def in_message(self) -> None:
        """MAIL and RCPT, both continued."""
        for command in (MailFrom("<a@example.com>"), RcptTo("<b@example.net>")):
            result = self.milter.mail_from(command) if isinstance(command, MailFrom) else self.milter.rcpt_to(command)
            self.answer(Continue())
            assert isinstance(result, Deferred) and result.called
        self.take()

    def connected(self, reply: NegotiateReply) -> None:
        result = self.start(reply)
        if isinstance(result, Deferred) and not result.called:
            self.take()
            self.answer(Continue())
        assert isinstance(result, Deferred) and result.called

    @property
    def client(self) -> MilterClient:
        assert isinstance(self.endpoint.protocol, MilterClient)
        return self.endpoint.protocol


def reply(protocol: ProtocolFlag = ProtocolFlag.NONE, actions: Action = ALL_ACTIONS, **kw: Any) -> NegotiateReply:
    return NegotiateReply(6, actions, protocol, **kw)


class ForwardingTests(SynchronousTestCase):
    def result(self, value: Result) -> object:
        if isinstance(value, Deferred):
            return self.successResultOf(value)
        return value

    def test_provides_imilter(self) -> None:
        """A RemoteMilter is a full IMilter with every callback."""
        verifyObject(IMilter, RemoteMilter(FakeEndpoint(), reactor=MemoryReactorClock()))

    def test_connects_lazily(self) -> None:
        """Nothing is dialled before the first callback."""
        remote = Remote()
        self.assertIsNone(remote.endpoint.protocol)
        remote.start(reply())
        self.assertIsNotNone(remote.endpoint.protocol)

    def test_offer(self) -> None:
        """The remote is offered the configured actions plus macro lists and every option served."""
        milter = RemoteMilter(FakeEndpoint(), reactor=MemoryReactorClock(), actions=["add_headers", "quarantine"])
        offer = milter.remote_offer()
        self.assertEqual(offer.actions, Action.ADD_HEADERS | Action.QUARANTINE | Action.SET_MACRO_LIST)
        self.assertTrue(offer.protocol & ProtocolFlag.HEADER_LEADING_SPACE)
        self.assertFalse(offer.protocol & ProtocolFlag.RCPT_REJECTED)
        self.assertEqual(milter.actions, Action.ADD_HEADERS | Action.QUARANTINE)
        milter.negotiated(Negotiate(2, ALL_ACTIONS, ProtocolFlag(0x7F)), reply())
        self.assertEqual(milter.remote_offer().version, 2)

    def test_verdict_and_connect_macros(self) -> None:
        """CONNECT goes out with the macros the remote listed, and its verdict comes back."""
        remote = Remote()
        result = remote.start(
            reply(macros={MacroStage.CONNECT: ("j", "{daemon_name}", "{missing}")}),
            macros(j="mx.example.net", daemon_name="smtpd", other="x"),
        )
        self.assertEqual(remote.take(), encode(Macros("C", (("j", "mx.example.net"), ("{daemon_name}", "smtpd"))))
                         + encode(CONNECT))
        remote.answer(Reject("go away", code=554, status="5.7.1"))
        self.assertEqual(self.result(result), Reject("go away", code=554, status="5.7.1"))

    def test_all_visible_macros_without_a_list(self) -> None:
        """For a stage the remote listed nothing for, every visible macro is sent."""
        remote = Remote()
        remote.connected(reply())
        remote.milter.macros = macros(j="mx", auth_type="PLAIN")
        remote.milter.helo(Helo("client.example"))
        self.assertEqual(remote.take(), encode(Macros("H", (("j", "mx"), ("{auth_type}", "PLAIN"))))
                         + encode(Helo("client.example")))

    def test_switched_off_events(self) -> None:
        """Commands the remote switched off are answered Continue here; body chunks Skip."""
        remote = Remote()
        remote.connected(reply(ProtocolFlag.NO_HELO | ProtocolFlag.NO_BODY))
        self.assertEqual(self.result(remote.milter.helo(Helo("x"))), Continue())
        remote.in_message()
        remote.milter.rcpt_to(RcptTo("<b@example.com>"))
        remote.answer(Continue())
        remote.milter.end_of_headers(EndOfHeaders())
        remote.answer(Continue())
        remote.take()
        self.assertEqual(self.result(remote.milter.body(BodyChunk(b"x"))), Skip())
        self.assertEqual(remote.take(), b"")

    def test_no_reply_events(self) -> None:
        """Commands under the remote's no-reply flags continue as soon as they are written."""
        remote = Remote()
        remote.connected(reply(ProtocolFlag.NR_HELO))
        self.assertEqual(self.result(remote.milter.helo(Helo("x"))), Continue())
        self.assertEqual(remote.take(), encode(Macros("H")) + encode(Helo("x")))

    def test_rejected_recipient_not_asked_for(self) -> None:
        """A recipient the MTA rejected is not passed to a remote that did not ask for those."""
        remote = Remote(rejected_recipients=True)
        self.assertTrue(remote.milter.remote_offer().protocol & ProtocolFlag.RCPT_REJECTED)
        remote.connected(reply())
        remote.in_message()
        remote.milter.macros = macros(rcpt_mailer="error")
        self.assertEqual(self.result(remote.milter.rcpt_to(RcptTo("<nobody@example.com>"))), Continue())
        self.assertEqual(remote.take(), b"")

    def test_shutdown_becomes_421(self) -> None:
        """Postfix's SHUTDOWN becomes the portable 421 tempfail."""
        remote = Remote()
        result = remote.start(reply())
        remote.answer(Shutdown())
        verdict = self.result(result)
        assert isinstance(verdict, TempFail)
        self.assertEqual(verdict.code, 421)

    def test_abort_and_close(self) -> None:
        """abort() forwards ABORT; close() sends QUIT and closes."""
        remote = Remote()
        remote.connected(reply())
        remote.in_message()
        self.assertIsNone(remote.milter.abort())
        self.assertEqual(remote.take(), encode(Abort()))
        self.assertIsNone(remote.milter.close())
        self.assertEqual(remote.take(), encode(Quit()))
        self.assertTrue(remote.endpoint.transport.disconnecting)

    def test_close_drops_a_busy_remote(self) -> None:
        """close() while the remote still owes a reply drops the connection instead of waiting."""
        remote = Remote()
        remote.connected(reply())
        result = remote.milter.helo(Helo("x"))
        assert isinstance(result, Deferred)
        result.cancel()
        self.failureResultOf(result, CancelledError)
        remote.take()
        self.assertIsNone(remote.milter.close())
        self.assertEqual(remote.take(), b"")
        self.assertTrue(remote.endpoint.transport.disconnecting)

    def test_close_before_use(self) -> None:
        """close() without any callback connects nowhere."""
        remote = Remote()
        self.assertIsNone(remote.milter.close())
        self.assertIsNone(remote.endpoint.protocol)

    def test_message_over_after_refusal(self) -> None:
        """After the remote refused the message, later commands of it are answered here."""
        remote = Remote()
        remote.connected(reply())
        remote.in_message()
        result = remote.milter.header(Header("Subject", " spam"))
        remote.answer(Reject())
        self.assertEqual(self.result(result), Reject())
        remote.take()
        self.assertEqual(self.result(remote.milter.end_of_headers(EndOfHeaders())), Continue())
        self.assertEqual(remote.take(), b"")
        remote.milter.mail_from(MailFrom("<c@example.com>"))
        self.assertEqual(remote.take(), encode(Macros("M")) + encode(MailFrom("<c@example.com>")))


class LeadingSpaceTests(SynchronousTestCase):
    def header_sent(self, remote_space: bool, ours: bool, value: str) -> bytes:
        remote = Remote(leading_space=ours)
        remote.connected(reply(ProtocolFlag.HEADER_LEADING_SPACE if remote_space else ProtocolFlag.NONE))
        remote.in_message()
        remote.milter.header(Header("Subject", value))
        return remote.take()

    def test_exact_to_stripping_remote(self) -> None:
        """Exact values lose one space for a remote that did not ask for leading space."""
        self.assertEqual(self.header_sent(False, True, "  two"), encode(Header("Subject", " two")))

    def test_exact_to_exact_remote(self) -> None:
        """A remote that asked for leading space gets the exact value."""
        self.assertEqual(self.header_sent(True, True, "  two"), encode(Header("Subject", "  two")))

    def test_stripped_to_exact_remote(self) -> None:
        """Without exact values, a remote asking for them gets the space the MTA stripped back."""
        self.assertEqual(self.header_sent(True, False, "one"), encode(Header("Subject", " one")))

    def test_changes_adapted(self) -> None:
        """Header values from a remote without leading space get the space an MTA would add."""
        remote = Remote()
        remote.connected(reply())
        remote.in_message()
        changes = Changes(ALL_ACTIONS)
        remote.milter.end_of_message(changes)
        remote.answer(AddHeader("X-A", "a"), ChangeHeader(1, "X-B", ""), Continue())
        self.assertEqual(changes.edits, [AddHeader("X-A", " a"), ChangeHeader(1, "X-B", "")])


class EndOfMessageTests(SynchronousTestCase):
    def test_changes_recorded(self) -> None:
        """Every kind of change lands on the Changes recorder; body chunks are joined; progress passes."""
        remote = Remote()
        remote.connected(reply(ProtocolFlag.HEADER_LEADING_SPACE))
        remote.in_message()
        progressed: list[None] = []
        changes = Changes(ALL_ACTIONS, on_progress=lambda: progressed.append(None))
        result = remote.milter.end_of_message(changes)
        self.assertEqual(remote.take(), encode(Macros("E")) + encode(EndOfMessage()))
        remote.answer(Progress())
        self.assertEqual(len(progressed), 1)
        remote.answer(
            AddHeader("X-A", " a"), InsertHeader(0, "X-I", " i"), ChangeHeader(0, "X-C", " c"),
            AddRecipient("<c@example.org>"), AddRecipient("<d@example.org>", ("NOTIFY=NEVER",)),
            DeleteRecipient("<b@example.net>"), ChangeFrom("<new@example.com>"),
            ReplaceBody(b"new "), ReplaceBody(b"body\r\n"), Quarantine("held"), Accept(),
        )
        assert isinstance(result, Deferred)
        self.assertEqual(self.successResultOf(result), Accept())
        self.assertEqual(changes.edits, [
            AddHeader("X-A", " a"), InsertHeader(0, "X-I", " i"), ChangeHeader(1, "X-C", " c"),
            AddRecipient("<c@example.org>"), AddRecipient("<d@example.org>", ("NOTIFY=NEVER",)),
            DeleteRecipient("<b@example.net>"),
        ])
        self.assertEqual(changes.sender, ChangeFrom("<new@example.com>"))
        self.assertEqual(changes.body, b"new body\r\n")
        self.assertEqual(changes.quarantine_reason, "held")

    def test_refusal_drops_changes(self) -> None:
        """Changes before a reject are not recorded."""
        remote = Remote()
        remote.connected(reply())
        remote.in_message()
        changes = Changes(ALL_ACTIONS)
        result = remote.milter.end_of_message(changes)
        remote.answer(AddHeader("X-A", "a"), Reject())
        assert isinstance(result, Deferred)
        self.assertEqual(self.successResultOf(result), Reject())
        self.assertTrue(changes.empty)

    def test_refused_change_records_nothing(self) -> None:
        """A change the recorder refuses fails the callback with nothing half-recorded."""
        remote = Remote()
        remote.connected(reply())
        remote.in_message()
        changes = Changes(ALL_ACTIONS)
        result = remote.milter.end_of_message(changes)
        remote.answer(AddHeader("X-A", "a"), AddHeader("X-Bad", "one\ntwo"), Continue())
        assert isinstance(result, Deferred)
        self.failureResultOf(result)
        self.assertTrue(changes.empty)


class FailureTests(SynchronousTestCase):
    def test_refused_then_fallback(self) -> None:
        """A refused connection fails the first callback; later ones get the fallback at once."""
        remote = Remote(FakeEndpoint(refuse=True), fallback=Continue())
        first = remote.milter.connect(CONNECT)
        assert isinstance(first, Deferred)
        self.failureResultOf(first)
        self.assertEqual(remote.milter.helo(Helo("x")), Continue())
        self.assertIsNone(remote.milter.abort())
        self.assertIsNone(remote.milter.close())

    def test_connect_timeout(self) -> None:
        """A connection that does not complete within the timeout fails; the attempt is cancelled."""
        remote = Remote(FakeEndpoint(hang=True), fallback=Continue(), timeout=5.0)
        result = remote.milter.connect(CONNECT)
        assert isinstance(result, Deferred)
        remote.clock.advance(5)
        self.failureResultOf(result, MilterUnavailableError)
        self.assertTrue(remote.endpoint.cancelled)
        self.assertEqual(remote.milter.helo(Helo("x")), Continue())

    def test_timeout_drops_remote(self) -> None:
        """A remote silent past the timeout: TimeoutError, connection aborted, fallback afterwards."""
        remote = Remote(fallback=Accept(), timeout=5.0)
        remote.connected(reply())
        result = remote.milter.helo(Helo("x"))
        assert isinstance(result, Deferred)
        remote.clock.advance(5)
        self.failureResultOf(result, TimeoutError)
        self.assertTrue(remote.endpoint.transport.disconnecting)
        self.assertEqual(remote.milter.mail_from(MailFrom("<a@example.com>")), Accept())

    def test_cancel_keeps_session_in_step(self) -> None:
        """A result cancelled by the chain still has its reply read; the next command follows it."""
        remote = Remote()
        remote.connected(reply())
        result = remote.milter.helo(Helo("x"))
        assert isinstance(result, Deferred)
        result.cancel()
        self.failureResultOf(result)
        remote.take()
        mail = remote.milter.mail_from(MailFrom("<a@example.com>"))
        self.assertEqual(remote.take(), b"")
        remote.answer(Reject())
        self.assertEqual(remote.take(), encode(Macros("M")) + encode(MailFrom("<a@example.com>")))
        remote.answer(Continue())
        assert isinstance(mail, Deferred)
        self.assertEqual(self.successResultOf(mail), Continue())

    def test_remote_hangs_up(self) -> None:
        """The remote closing the connection fails the waiting callback; then the fallback answers."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        remote = Remote(fallback=TempFail())
        remote.connected(reply())
        result = remote.milter.helo(Helo("x"))
        remote.client.connectionLost(Failure(ConnectionDone()))
        assert isinstance(result, Deferred)
        self.failureResultOf(result)
        self.assertEqual(remote.milter.mail_from(MailFrom("<a@example.com>")), TempFail())


class SpecTests(SynchronousTestCase):
    def test_spec(self) -> None:
        """spec() makes a FilterSpec whose factory makes fresh RemoteMilters."""
        spec = RemoteMilter.spec("inet:8891@127.0.0.1", timeout=3, fallback=Accept(), reactor=MemoryReactorClock(),
                                 actions=["add_headers"], macros={"connect": "j {daemon_name}"})
        self.assertIsInstance(spec, FilterSpec)
        self.assertEqual((spec.name, spec.timeout, spec.fallback), ("inet:8891@127.0.0.1", 3, Accept()))
        first, second = spec.factory(), spec.factory()
        self.assertIsNot(first, second)
        assert isinstance(first, RemoteMilter)
        self.assertEqual(first.actions, Action.ADD_HEADERS)
        self.assertEqual(first.macro_requests, {MacroStage.CONNECT: ("j", "{daemon_name}")})

    def test_remote_filter(self) -> None:
        """remote_filter() is the config file's way to spec() with a name."""
        spec = remote_filter("unix:/run/m.sock", name="spamd", reactor=MemoryReactorClock())
        self.assertEqual(spec.name, "spamd")

    def test_bad_configuration(self) -> None:
        """Bad addresses, options, actions and stages are configuration errors at once."""
        for kwargs in ({"bogus": 1}, {"actions": ["fly"]}, {"macros": {"nowhere": "j"}}):
            self.assertRaises(ConfigurationError, RemoteMilter.spec, "inet:8891@127.0.0.1", **kwargs)
        self.assertRaises(ConfigurationError, RemoteMilter.spec, "inet:8891")

