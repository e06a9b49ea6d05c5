"""Tests for txmilt.protocol: MilterProtocol and MilterFactory over a StringTransport and a Clock."""

from __future__ import annotations

import socket
from typing import Any
from unittest import SkipTest

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txmilt.chain import FilterSpec
from txmilt.codec import encode
from txmilt.interfaces import IMilter
from txmilt.messages import (
    Accept,
    Action,
    AddHeader,
    ChangeHeader,
    Continue,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Macros,
    MailFrom,
    Negotiate,
    Progress,
    ProtocolFlag,
    RcptTo,
    Reject,
    TempFail,
)
from txmilt.milter import Changes, FilterVerdict, Milter, Result
from txmilt.protocol import MilterFactory, MilterProtocol
from txmilt.testing import SENDMAIL, FakeMTA, RecordingMilter


class CountingTransport(StringTransportWithDisconnection):
    """Remembers every write separately."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


@implementer(ITCPTransport)
class TCPTransport(CountingTransport):
    """A transport that claims to be TCP and records socket options."""

    def __init__(self) -> None:
        super().__init__()
        self.no_delay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 - Twisted's name
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:  # noqa: N802 - Twisted's name
        return bool(self.no_delay)

    def setTcpKeepAlive(self, enabled: bool) -> None:  # noqa: N802 - Twisted's name
        pass

    def getTcpKeepAlive(self) -> bool:  # noqa: N802 - Twisted's name
        return False

    def loseWriteConnection(self) -> None:  # noqa: N802 - Twisted's name
        self.loseConnection()


@implementer(ILogObserver)
class LogCapture:
    """Collects log events published while a test runs."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def matching(self, *words: str) -> list[str]:
        """Log lines that contain every word."""
        return [line for line in self.lines() if all(word in line for word in words)]


class Editor(Milter):
    """Adds and changes headers at end of message."""

    actions = Action.ADD_HEADERS | Action.CHANGE_HEADERS

    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header("X-One", "1")
        changes.add_header("X-Two", "2")
        changes.change_header("Subject", "edited")
        return None


class Failing(Milter):
    """Fails in mail_from (as the subclass says) and answers helo normally."""

    def helo(self, command: Helo) -> Result:
        return None


class Raises(Failing):
    """Fails in mail_from."""

    def mail_from(self, command: MailFrom) -> Result:
        raise ZeroDivisionError("boom")


class Hangs(Failing):
    """Never answers mail_from."""

    def mail_from(self, command: MailFrom) -> Result:
        return Deferred()


class Garbage(Failing):
    """Answers mail_from with something that is not a verdict."""

    def mail_from(self, command: MailFrom) -> Result:
        return 42  # type: ignore[return-value]


def fake(filters: list[Any], clock: Clock | None = None, **options: Any) -> tuple[MilterFactory, Clock]:
    clock = Clock() if clock is None else clock
    return MilterFactory(filters, clock, **options), clock


class FakeSocket:
    """A connected socket that takes at most ``room`` bytes per send() and records socket options."""

    def __init__(self, room: int | None = None, error: OSError | None = None) -> None:
        self.room = room
        self.error = error
        self.sent: list[bytes] = []
        self.options: list[tuple[int, int, int]] = []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = bytes(data if self.room is None else data[: self.room])
        self.sent.append(taken)
        return len(taken)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class FakeConnection(tcp.Connection):
    """A Twisted TCP connection over a FakeSocket: what MilterProtocol sends straight to the socket, and what
    it leaves to the transport's own write path (``written``)."""

    def __init__(self, sock: FakeSocket, queued: bytes = b"", tls: bool = False) -> None:
        self.socket = sock  # type: ignore[assignment]
        self.dataBuffer = queued
        self._tempDataBuffer: list[bytes] = []
        self.TLS = tls
        self.written: list[bytes] = []
        self.disconnecting = False
        self.connected = True

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 - Twisted's name
        pass

    def loseConnection(self, reason: object = None) -> None:  # noqa: N802
        self.disconnecting = True

    def getPeer(self) -> IPv4Address:  # noqa: N802 - Twisted's name
        return IPv4Address("TCP", "127.0.0.1", 40000)


class DirectSendTests(SynchronousTestCase):
    """Replies go straight to an idle TCP socket; what the kernel does not take goes to the transport once."""

    def connect(self, transport: FakeConnection) -> tuple[MilterProtocol, bytes]:
        """A protocol on ``transport``, negotiated and connected; the CONTINUE packet it owes next."""
        factory, _ = fake([Editor])
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(protocol, MilterProtocol)
        protocol.makeConnection(transport)
        protocol.dataReceived(encode(Negotiate(6, Action(0x1FF), ProtocolFlag(0x1FFFFF))))
        return protocol, encode(Continue())

    def test_idle_socket_gets_the_reply_in_one_send(self) -> None:
        """With nothing queued, the reply is one send() and the transport writes nothing."""
        sock = FakeSocket()
        protocol, _ = self.connect(FakeConnection(sock))
        sent_before = len(sock.sent)
        protocol.dataReceived(encode(Helo("client.example.com")))
        self.assertEqual(sock.sent[sent_before:], [encode(Continue())])
        self.assertEqual(protocol.transport.written, [])  # type: ignore[union-attr]

    def test_partial_send_leaves_the_rest_to_the_transport_once(self) -> None:
        """When send() takes part of a reply, exactly the rest goes to transport.write, once."""
        sock = FakeSocket()
        transport = FakeConnection(sock)
        protocol, _ = self.connect(transport)
        for command in (Helo("h"), MailFrom("<a@example.com>"), RcptTo("<b@example.net>"), Header("Subject", "s")):
            protocol.dataReceived(encode(command))
        sock.room = 7
        sent_before = len(sock.sent)
        protocol.dataReceived(encode(EndOfMessage()))
        reply = b"".join(encode(r) for r in (
            AddHeader("X-One", "1"), AddHeader("X-Two", "2"), ChangeHeader(1, "Subject", "edited"), Continue()))
        self.assertEqual(sock.sent[sent_before:], [reply[:7]])
        self.assertEqual(transport.written, [reply[7:]])
        self.assertEqual(b"".join(sock.sent[sent_before:] + transport.written), reply)

    def test_send_error_leaves_everything_to_the_transport(self) -> None:
        """EAGAIN (or any socket error) on send(): the whole reply goes to transport.write."""
        sock = FakeSocket()
        transport = FakeConnection(sock)
        protocol, continue_packet = self.connect(transport)
        sock.error = BlockingIOError(11, "EAGAIN")
        protocol.dataReceived(encode(Helo("h")))
        self.assertEqual(transport.written, [continue_packet])

    def test_queued_data_keeps_its_place(self) -> None:
        """While the transport holds unsent bytes, replies queue behind them instead of overtaking them."""
        sock = FakeSocket()
        transport = FakeConnection(sock)
        protocol, continue_packet = self.connect(transport)
        sent_before = len(sock.sent)
        transport.dataBuffer = b"earlier"
        protocol.dataReceived(encode(Helo("h")))
        self.assertEqual(sock.sent[sent_before:], [])
        self.assertEqual(transport.written, [continue_packet])

    def test_tls_goes_through_the_transport(self) -> None:
        """On a TLS connection the socket is never written to directly."""
        sock = FakeSocket()
        protocol, continue_packet = self.connect(FakeConnection(sock, tls=True))
        protocol.dataReceived(encode(Helo("h")))
        self.assertEqual(sock.sent, [])
        self.assertEqual(protocol.transport.written[-1], continue_packet)  # type: ignore[union-attr]

    def test_other_transports_go_through_write(self) -> None:
        """A transport that is not a TCP connection (unix socket, test transport) gets every reply by write()."""
        transport = CountingTransport()
        mta = FakeMTA([Editor], transport=transport)
        mta.connect()
        self.assertEqual(b"".join(transport.writes), transport.value())
        self.assertEqual(len(transport.writes), len(mta.replies))


class QuickAckTests(SynchronousTestCase):
    """A read that nothing answers is acknowledged at once (TCP_QUICKACK), so a Nagle-bound MTA goes on."""

    def setUp(self) -> None:
        if not hasattr(socket, "TCP_QUICKACK"):
            raise SkipTest("no TCP_QUICKACK on this platform")
        self.quickack = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def test_unanswered_read_is_acknowledged(self) -> None:
        """The macros of a command switched off come alone (Postfix at DATA): they are ACKed at once."""
        sock = FakeSocket()
        protocol, _ = DirectSendTests().connect(FakeConnection(sock))
        sock.options.clear()
        protocol.dataReceived(encode(Macros("T", (("i", "4BvZ7Q2x9Kz1"),))))
        self.assertEqual(sock.options, [self.quickack])

    def test_answered_read_is_not(self) -> None:
        """A read that is answered needs no separate ACK: the reply carries it."""
        sock = FakeSocket()
        protocol, _ = DirectSendTests().connect(FakeConnection(sock))
        sock.options.clear()
        protocol.dataReceived(encode(Macros("H")) + encode(Helo("h")))
        self.assertEqual(sock.options, [])

    def test_read_waiting_for_a_filter_is_not(self) -> None:
        """While a filter works on the command, its reply will carry the ACK."""
        sock = FakeSocket()
        factory, _ = fake([Hangs])
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(protocol, MilterProtocol)
        protocol.makeConnection(FakeConnection(sock))
        protocol.dataReceived(encode(Negotiate(6, Action(0x1FF), ProtocolFlag(0x1FFFFF))))
        protocol.dataReceived(encode(Helo("h")))
        sock.options.clear()
        protocol.dataReceived(encode(MailFrom("<a@example.com>")))
        self.assertEqual(sock.options, [])


class WriteBatchingTests(SynchronousTestCase):
    """Each reply batch goes out in one write."""

    def test_end_of_message_is_one_write(self) -> None:
        """Changes and the final verdict at end of message are written by a single write call."""
        transport = CountingTransport()
        mta = FakeMTA([Editor], transport=transport)
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        mta.header("Subject", "s")
        before = len(transport.writes)
        responses = mta.end_of_message()
        self.assertEqual(
            responses, [AddHeader("X-One", "1"), AddHeader("X-Two", "2"), ChangeHeader(1, "Subject", "edited"),
                        Continue()],
        )
        self.assertEqual(transport.writes[before:], [b"".join(encode(r) for r in responses)])

    def test_every_reply_is_one_write(self) -> None:
        """Each command's reply is one write, also when it comes late from a Deferred."""
        ready: Deferred[FilterVerdict | None] = Deferred()
        editor = Editor()
        transport = CountingTransport()
        mta = FakeMTA([RecordingMilter({"end_of_message": lambda c: ready}), lambda: editor], transport=transport)
        for step in (mta.negotiate, mta.connect, mta.helo):
            step()
            self.assertEqual(len(transport.writes), len(mta.replies))
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        before = len(transport.writes)
        self.assertEqual(mta.end_of_message(), [])
        self.assertEqual(len(transport.writes), before)
        ready.callback(None)
        self.assertEqual(len(mta.collect()), 4)
        self.assertEqual(len(transport.writes), before + 1)


class TCPTests(SynchronousTestCase):
    """TCP transports get TCP_NODELAY."""

    def test_no_delay(self) -> None:
        """TCP_NODELAY is switched on for a TCP transport."""
        transport = TCPTransport()
        FakeMTA([RecordingMilter], transport=transport)
        self.assertIs(transport.no_delay, True)

    def test_other_transports(self) -> None:
        """A transport without TCP options is served all the same."""
        transport = CountingTransport()
        self.assertFalse(ITCPTransport.providedBy(transport))
        self.assertTrue(FakeMTA([RecordingMilter], transport=transport).message("<a@x>", ["<b@y>"]).delivered)


class IdleTimeoutTests(SynchronousTestCase):
    """Silent connections are closed after the idle timeout."""

    def test_idle_connection_closed(self) -> None:
        """A connection silent for the idle timeout is closed, with a log line naming it."""
        logs = LogCapture(self)
        factory, clock = fake([RecordingMilter], idle_timeout=30)
        mta = FakeMTA(factory)
        mta.connect()
        clock.advance(29)
        mta.collect()
        self.assertTrue(mta.connected)
        clock.advance(1)
        mta.collect()
        self.assertFalse(mta.connected)
        self.assertEqual(len(logs.matching(f"[{mta.protocol.connection_id}]", "idle for 30")), 1)
        self.assertEqual(factory.connections, set())

    def test_activity_restarts_timer(self) -> None:
        """Every command restarts the idle timer."""
        factory, clock = fake([RecordingMilter], idle_timeout=30)
        mta = FakeMTA(factory)
        mta.connect()
        for _ in range(5):
            clock.advance(20)
            mta.helo()
        self.assertTrue(mta.connected)

    def test_pending_filter_is_not_idle(self) -> None:
        """Waiting for a filter is not idleness: the filter's own timeout applies."""
        factory, clock = fake([FilterSpec(Hangs, timeout=100)], idle_timeout=30)
        mta = FakeMTA(factory)
        mta.connect()
        mta.mail_from("<a@example.com>")
        clock.advance(99)
        self.assertEqual(mta.collect(), [])
        self.assertTrue(mta.connected)
        clock.advance(1)
        self.assertEqual(mta.collect(), [TempFail()])


class DeadlineHeapTests(SynchronousTestCase):
    """The factory's one deadline heap replaces a timer per connection."""

    def test_closed_connections_leave_no_timer(self) -> None:
        """Once every connection has closed, no deadline entry or timer remains."""
        factory, clock = fake([RecordingMilter], idle_timeout=30)
        mtas = [FakeMTA(factory, clock=clock) for _ in range(10)]
        for mta in mtas:
            mta.connect()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        for mta in mtas:
            mta.quit()
        self.assertEqual(len(factory.deadlines), 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_each_connection_keeps_its_own_deadline(self) -> None:
        """Connections active at different times close at their own deadlines."""
        factory, clock = fake([RecordingMilter], idle_timeout=30)
        early, late = FakeMTA(factory, clock=clock), FakeMTA(factory, clock=clock)
        early.connect()
        late.connect()
        clock.advance(20)
        late.helo()
        clock.advance(10)
        early.collect()
        late.collect()
        self.assertEqual((early.connected, late.connected), (False, True))
        clock.advance(19)
        late.collect()
        self.assertTrue(late.connected)
        clock.advance(1)
        late.collect()
        self.assertFalse(late.connected)


class ConnectionLimitTests(SynchronousTestCase):
    """The factory serves at most max_connections at once."""

    def test_limit(self) -> None:
        """The connection after the limit is refused and logged; a freed slot is reused."""
        logs = LogCapture(self)
        factory, _ = fake([RecordingMilter], max_connections=2)
        first, second = FakeMTA(factory), FakeMTA(factory)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertEqual(len(logs.matching("refusing connection", "limit 2")), 1)
        first.quit()
        third = FakeMTA(factory)
        self.assertTrue(third.message("<a@example.com>", ["<b@example.net>"]).delivered)
        self.assertTrue(second.message("<a@example.com>", ["<b@example.net>"]).delivered)


class BadInputTests(SynchronousTestCase):
    """Broken input closes the one connection it arrived on."""

    def test_oversized_frame(self) -> None:
        """A frame above the frame limit closes the connection with a log line giving size and limit."""
        logs = LogCapture(self)
        factory, _ = fake([RecordingMilter], frame_limit=150)
        mta = FakeMTA(factory)
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        self.assertEqual(mta.header("X-Fits", "v" * 142), [Continue()])  # 150 bytes: name, value, two NULs
        self.assertEqual(mta.header("X-Long", "v" * 200), [])
        self.assertFalse(mta.connected)
        lines = logs.matching(f"[{mta.protocol.connection_id}]", "208 payload bytes", "limit of 150")
        self.assertEqual(len(lines), 1, logs.lines())

    def test_unknown_command_closes_only_that_connection(self) -> None:
        """An unknown command letter closes its connection; another connection goes on."""
        logs = LogCapture(self)
        factory, _ = fake([RecordingMilter])
        bad, good = FakeMTA(factory), FakeMTA(factory)
        bad.connect()
        good.connect()
        self.assertEqual(bad.send_raw(b"\x00\x00\x00\x01Z"), [])
        self.assertFalse(bad.connected)
        self.assertEqual(len(logs.matching(f"[{bad.protocol.connection_id}]", "'Z'")), 1, logs.lines())
        self.assertTrue(good.message("<a@example.com>", ["<b@example.net>"]).delivered)
        self.assertEqual(factory.connections, {good.protocol})

    def test_malformed_packets(self) -> None:
        """A packet with a bad layout closes the connection and runs close on the filters."""
        packets = [
            b"\x00\x00\x00\x13Cmail.example.com\x00X",  # unknown address family
            b"\x00\x00\x00\x01M",  # MAIL without payload
            b"\x00\x00\x00\x05Habcd",  # HELO without its NUL
            b"\x00\x00\x00\x03L\x00\x00",  # header with an empty name
        ]
        for packet in packets:
            recorder = RecordingMilter()
            mta = FakeMTA([recorder])
            mta.negotiate()
            if packet[4:5] != b"C":
                mta.connect()
            self.assertEqual(mta.send_raw(packet), [], packet)
            self.assertFalse(mta.connected, packet)
            self.assertEqual(recorder.names[-1], "close", packet)

    def test_out_of_order(self) -> None:
        """A command that cannot come now closes the connection."""
        mta = FakeMTA([RecordingMilter])
        mta.negotiate()
        self.assertEqual(mta.send_raw(encode(EndOfHeaders())), [])
        self.assertFalse(mta.connected)


class NegotiationTests(SynchronousTestCase):
    """Negotiation failures close the connection without a reply."""

    def test_missing_action(self) -> None:
        """A filter needing an action the MTA lacks: no reply, connection closed, filter named in the log."""

        class NeedsChangeFrom(Milter):
            actions = Action.CHANGE_FROM

        logs = LogCapture(self)
        mta = FakeMTA([RecordingMilter, NeedsChangeFrom], offer=Negotiate(6, Action(0x3F), ProtocolFlag(0x1FFFFF)))
        self.assertEqual(mta.negotiate(), [])
        self.assertFalse(mta.connected)
        self.assertEqual(mta.transport.value(), b"")
        self.assertEqual(len(logs.matching("negotiation failed", "NeedsChangeFrom", "CHANGE_FROM")), 1, logs.lines())

    def test_missing_protocol_bit(self) -> None:
        """A filter needing leading space from an MTA that does not offer it gets no connection."""

        class Spaced(Milter):
            leading_space = True

        mta = FakeMTA([Spaced], offer=Negotiate(2, Action(0x0F), ProtocolFlag(0x7F)))
        self.assertEqual(mta.negotiate(), [])
        self.assertFalse(mta.connected)


class FilterFailureTests(SynchronousTestCase):
    """A failing filter gets its fallback and the connection goes on."""

    def check_fallback(self, spec: FilterSpec, delay: float, expected: FilterVerdict) -> FakeMTA:
        clock = Clock()
        mta = FakeMTA([spec], clock=clock)
        mta.connect()
        responses = mta.mail_from("<a@example.com>")
        if delay:
            self.assertEqual(responses, [])
            clock.advance(delay - 0.5)
            self.assertEqual(mta.collect(), [])
            clock.advance(0.5)
            responses = mta.collect()
        self.assertEqual(responses, [expected])
        self.assertTrue(mta.connected)
        if not delay and isinstance(expected, TempFail | Reject):
            self.assertEqual(mta.mail_from("<a@example.com>"), responses)  # the same again
        self.assertEqual(mta.helo("again"), [Continue()])  # and the connection goes on
        return mta

    def test_raises(self) -> None:
        """A filter that raises gets TempFail at once; the traceback is logged with the connection id."""
        logs = LogCapture(self)
        mta = self.check_fallback(FilterSpec(Raises), 0, TempFail())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual(len(logs.matching(f"[{mta.protocol.connection_id}]", "Raises", "failed in mail_from")), 2)

    def test_hangs(self) -> None:
        """A filter that never answers gets TempFail when its timeout passes."""
        logs = LogCapture(self)
        self.check_fallback(FilterSpec(Hangs, timeout=5), 5, TempFail())
        self.assertTrue(logs.matching("Hangs", "timed out after 5"))

    def test_garbage(self) -> None:
        """A filter that returns something not a verdict gets TempFail."""
        logs = LogCapture(self)
        self.check_fallback(FilterSpec(Garbage), 0, TempFail())
        self.assertTrue(logs.matching("Garbage", "42"))

    def test_custom_fallbacks(self) -> None:
        """The fallback can be Accept, Continue or Reject per filter."""
        self.check_fallback(FilterSpec(Hangs, timeout=3, fallback=Accept()), 3, Accept())
        self.check_fallback(FilterSpec(Garbage, fallback=Continue()), 0, Continue())
        self.check_fallback(FilterSpec(Raises, fallback=Reject()), 0, Reject())
        self.flushLoggedErrors(ZeroDivisionError)

    def test_other_filters_unaffected(self) -> None:
        """Next to a failing filter, the others see the whole message."""
        recorder = RecordingMilter()
        mta = FakeMTA([FilterSpec(Raises, fallback=Continue()), lambda: recorder])
        result = mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "s")], b"b\r\n")
        self.assertTrue(result.delivered)
        self.assertIn("end_of_message", recorder.names)
        self.flushLoggedErrors(ZeroDivisionError)


class ConnectionEndTests(SynchronousTestCase):
    """However a connection ends, every filter closes once and open messages are aborted."""

    def recorders(self) -> tuple[RecordingMilter, RecordingMilter, RecordingMilter]:
        return RecordingMilter({"connect": Accept()}), RecordingMilter(), RecordingMilter()

    def test_disconnect_mid_message(self) -> None:
        """An MTA gone mid-message: abort for the filters in the message, close for every filter, once."""
        retired, first, second = self.recorders()
        mta = FakeMTA([lambda: retired, lambda: first, lambda: second])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        mta.header("Subject", "s")
        mta.disconnect()
        self.assertEqual(retired.names, ["connect", "close"])
        for recorder in (first, second):
            self.assertEqual(recorder.names[-3:], ["abort", "reset", "close"])
            self.assertEqual(recorder.names.count("close"), 1)
            self.assertEqual(recorder.names.count("abort"), 1)
            self.assertEqual(recorder.names.count("reset"), 1)
        mta.protocol.connectionLost()
        self.assertEqual(first.names.count("close"), 1)

    def test_disconnect_while_filter_pending(self) -> None:
        """An MTA gone while a filter is working: its work is cancelled, it aborts and closes once."""
        pending: Deferred[FilterVerdict | None] = Deferred()
        slow = RecordingMilter({"header": lambda c: pending})
        other = RecordingMilter()
        mta = FakeMTA([lambda: slow, lambda: other])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        self.assertEqual(mta.header("Subject", "s"), [])
        mta.disconnect()
        self.assertTrue(pending.called)
        for recorder in (slow, other):
            self.assertEqual(recorder.names[-3:], ["abort", "reset", "close"])
        self.assertFalse(mta.protocol.factory.connections)

    def test_disconnect_between_messages(self) -> None:
        """An MTA gone between messages: close only."""
        recorder = RecordingMilter()
        mta = FakeMTA([recorder], profile=SENDMAIL)
        mta.message("<a@example.com>", ["<b@example.net>"])
        mta.disconnect()
        self.assertEqual(recorder.names[-3:], ["end_of_message", "reset", "close"])

    def test_quit_closes_transport(self) -> None:
        """QUIT mid-message closes the transport after aborting and closing every filter once."""
        retired, first, second = self.recorders()
        mta = FakeMTA([lambda: retired, lambda: first, lambda: second])
        mta.connect()
        mta.mail_from("<a@example.com>")
        self.assertEqual(mta.quit(), [])
        self.assertFalse(mta.transport.connected)
        self.assertFalse(mta.connected)
        self.assertEqual(retired.names, ["connect", "close"])
        self.assertEqual(first.names, ["connect", "mail_from", "abort", "reset", "close"])
        self.assertEqual(second.names, first.names)


class ProgressTests(SynchronousTestCase):
    """Slow end-of-message work sends PROGRESS keep-alives."""

    def test_progress_while_pending(self) -> None:
        """A PROGRESS packet goes out every progress interval until the answer is ready, none after."""
        clock = Clock()
        ready: Deferred[FilterVerdict | None] = Deferred()

        class Slow(Milter):
            actions = Action.ADD_HEADERS

            def end_of_message(self, changes: Changes) -> Result:
                changes.add_header("X-Slow", "1")
                return ready

        factory = MilterFactory([FilterSpec(Slow, timeout=300)], clock, progress_interval=10)
        mta = FakeMTA(factory)
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        self.assertEqual(mta.end_of_message(), [])
        clock.advance(9)
        self.assertEqual(mta.collect(), [])
        for _ in range(3):
            clock.advance(1)
            self.assertEqual(mta.collect(), [Progress()])
            clock.advance(9)
        ready.callback(None)
        self.assertEqual(mta.collect(), [AddHeader("X-Slow", "1"), Continue()])
        clock.advance(60)
        self.assertEqual(mta.collect(), [])
        self.assertEqual(mta.steps[-1].responses.count(Progress()), 3)


class PipeliningTests(SynchronousTestCase):
    """Commands sent back to back under no-reply flags are handled strictly in order."""

    def test_no_reply_headers_in_order(self) -> None:
        """Later headers and EOH wait until a slow no-reply header callback has finished."""
        clock = Clock()
        order: list[str] = []
        first: Deferred[FilterVerdict | None] = Deferred()

        class Watcher(Milter):
            no_reply = frozenset({"header"})

            def header(self, command: Header) -> Result:
                order.append(f"start {command.name}")
                if command.name != "A":
                    return None

                def done(result: FilterVerdict | None) -> FilterVerdict | None:
                    order.append("done A")
                    return result

                return first.addCallback(done)

            def end_of_headers(self, command: EndOfHeaders) -> Result:
                order.append("eoh")
                return Reject()

        mta = FakeMTA([Watcher], clock=clock)
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        self.assertTrue(mta.session.protocol & ProtocolFlag.NR_HEADER)
        for name in "ABC":
            self.assertEqual(mta.header(name, "v"), [])
        self.assertEqual(mta.end_of_headers(), [])
        self.assertEqual(order, ["start A"])
        first.callback(None)
        self.assertEqual(mta.collect(), [Reject()])
        self.assertEqual(order, ["start A", "done A", "start B", "start C", "eoh"])

    def test_pipelined_bytes(self) -> None:
        """Several commands in one read are answered one by one, in order."""
        recorder = RecordingMilter({"helo": lambda c: Reject() if c.name == "bad" else None})
        mta = FakeMTA([recorder])
        mta.connect()
        data = encode(Helo("good")) + encode(Helo("bad")) + encode(Helo("good"))
        mta.protocol.dataReceived(data)  # straight to the protocol: FakeMTA would wait for each reply
        self.assertEqual(mta.transport.value()[-15:], encode(Continue()) + encode(Reject()) + encode(Continue()))


class FactoryTests(SynchronousTestCase):
    """MilterFactory builds one protocol with fresh filters per connection."""

    def test_fresh_filters(self) -> None:
        """Each connection gets its own filter instances and connection id."""
        made: list[IMilter] = []

        def make() -> IMilter:
            made.append(RecordingMilter())
            return made[-1]

        factory, _ = fake([make])
        one, two = FakeMTA(factory), FakeMTA(factory)
        self.assertIsInstance(one.protocol, MilterProtocol)
        self.assertNotEqual(one.protocol.connection_id, two.protocol.connection_id)
        self.assertIsNot(made[-1], made[-2])
        self.assertIsNot(one.protocol.chain, two.protocol.chain)
