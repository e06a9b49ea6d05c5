"""MilterClient over a StringTransport: bytes written, replies collected, queueing, timeouts, failures."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint, ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txmilt.client import MilterClient, Reply, connect_milter, milter_endpoint
from txmilt.codec import encode
from txmilt.errors import ConfigurationError, LocalProtocolError, MilterUnavailableError, RemoteProtocolError
from txmilt.messages import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Action,
    AddHeader,
    BodyChunk,
    ChangeFrom,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    InsertHeader,
    MailFrom,
    Negotiate,
    NegotiateReply,
    Progress,
    ProtocolFlag,
    Quarantine,
    RcptTo,
    Reject,
    ReplaceBody,
    Response,
    Skip,
    TempFail,
)

# PROTOCOL.md §8, golden bytes.
OPTNEG = bytes.fromhex("0000000d4f00000006000001ff001fffff")
OPTNEG_REPLY = bytes.fromhex("0000000d4f000000060000000100000300")
MACRO_J = bytes.fromhex("00 00 00 13 44 43 6a 00 6d 78 2e 65 78 61 6d 70 6c 65 2e 6e 65 74 00")
CONNECT = bytes.fromhex(
    "00 00 00 20 43 6d 61 69 6c 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00 34 d4 31"
    " 31 39 32 2e 30 2e 32 2e 31 30 00"
)
HELO = bytes.fromhex("00 00 00 12 48 6d 61 69 6c 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00")
CONTINUE = bytes.fromhex("00 00 00 01 63")
ADD_X_CHECKED = bytes.fromhex("00 00 00 0f 68 58 2d 43 68 65 63 6b 65 64 00 79 65 73 00")
ABORT = bytes.fromhex("0000000141")
QUIT = bytes.fromhex("0000000151")
BODYEOB = bytes.fromhex("0000000145")

CLIENT_CONNECT = Connect("mail.example.com", Family.INET, 54321, "192.0.2.10")


def wire(*messages: Response | Command) -> bytes:
    return b"".join(encode(m) for m in messages)


class Harness:
    """A MilterClient on a StringTransport with a Clock."""

    def __init__(self, timeout: float | None = 10.0, transport: StringTransport | None = None) -> None:
        self.clock = Clock()
        self.transport = transport or StringTransport()
        self.client = MilterClient(self.clock, timeout=timeout)
        self.client.makeConnection(self.transport)

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def negotiate(self, protocol: ProtocolFlag = ProtocolFlag.NONE, actions: Action = ALL_ACTIONS) -> None:
        d = self.client.negotiate()
        self.take()
        self.client.dataReceived(encode(NegotiateReply(6, actions, protocol)))
        assert d.called

    def connected(self, protocol: ProtocolFlag = ProtocolFlag.NONE) -> None:
        """Negotiate, then CONNECT answered with Continue."""
        self.negotiate(protocol)
        d = self.client.send(CLIENT_CONNECT)
        self.client.dataReceived(CONTINUE)
        assert d.called
        self.take()

    def in_message(self, protocol: ProtocolFlag = ProtocolFlag.NONE) -> None:
        """Connected, then MAIL and RCPT answered with Continue."""
        self.connected(protocol)
        for command in (MailFrom("<a@example.com>"), RcptTo("<b@example.net>")):
            self.client.send(command)
            self.client.dataReceived(CONTINUE)
        self.take()

    def lose(self) -> None:
        self.client.connectionLost(Failure(ConnectionDone()))


class NegotiationTests(SynchronousTestCase):
    def test_offer_bytes(self) -> None:
        """The default offer is everything of version 6, byte for byte."""
        h = Harness()
        h.client.negotiate()
        self.assertEqual(h.take(), OPTNEG)

    def test_reply_fires(self) -> None:
        """The OPTNEG reply fires the Deferred and is kept as ``negotiated``."""
        h = Harness()
        d = h.client.negotiate()
        h.client.dataReceived(OPTNEG_REPLY)
        expected = NegotiateReply(6, Action.ADD_HEADERS, ProtocolFlag.NO_DATA | ProtocolFlag.NO_UNKNOWN)
        self.assertEqual(self.successResultOf(d), expected)
        self.assertEqual(h.client.negotiated, expected)

    def test_custom_offer(self) -> None:
        """A given offer is sent as it is."""
        h = Harness()
        h.client.negotiate(Negotiate(2, Action(0x0F), ProtocolFlag(0x7F)))
        self.assertEqual(h.take(), encode(Negotiate(2, Action(0x0F), ProtocolFlag(0x7F))))

    def test_reply_asking_more_than_offered(self) -> None:
        """A reply asking for actions not offered is a protocol error that drops the connection."""
        h = Harness()
        d = h.client.negotiate(Negotiate(6, Action.ADD_HEADERS, ALL_PROTOCOL))
        h.client.dataReceived(encode(NegotiateReply(6, Action.CHANGE_BODY, ProtocolFlag.NONE)))
        self.failureResultOf(d, RemoteProtocolError)
        self.assertTrue(h.transport.disconnecting)

    def test_reply_split_in_pieces(self) -> None:
        """A reply arriving one byte at a time is reassembled."""
        h = Harness()
        d = h.client.negotiate()
        for byte in OPTNEG_REPLY:
            self.assertNoResult(d)
            h.client.dataReceived(bytes([byte]))
        self.successResultOf(d)

    def test_queued_before_connection(self) -> None:
        """A negotiation asked for before the connection is made goes out when it is."""
        client = MilterClient(Clock())
        d = client.negotiate()
        transport = StringTransport()
        client.makeConnection(transport)
        self.assertEqual(transport.value(), OPTNEG)
        client.dataReceived(OPTNEG_REPLY)
        self.successResultOf(d)


class SendTests(SynchronousTestCase):
    def test_macros_then_command(self) -> None:
        """Macros go out as one MACRO packet right before the command (golden packets 3 and 4)."""
        h = Harness()
        h.negotiate()
        d = h.client.send(CLIENT_CONNECT, {"j": "mx.example.net"})
        self.assertEqual(h.take(), MACRO_J + CONNECT)
        self.assertNoResult(d)
        h.client.dataReceived(CONTINUE)
        self.assertEqual(self.successResultOf(d), Reply(Continue()))

    def test_macro_pairs_keep_order(self) -> None:
        """Macros given as pairs are sent in that order, long names as given."""
        h = Harness()
        h.negotiate()
        h.client.send(CLIENT_CONNECT, [("{daemon_name}", "mx"), ("j", "host")])
        self.assertEqual(h.take(), bytes.fromhex("0000001a44") + b"C{daemon_name}\0mx\0j\0host\0" + CONNECT)

    def test_empty_macros(self) -> None:
        """An empty macro mapping still sends the packet with only the letter."""
        h = Harness()
        h.negotiate()
        h.client.send(CLIENT_CONNECT, {})
        self.assertEqual(h.take(), bytes.fromhex("000000024443") + CONNECT)

    def test_one_command_at_a_time(self) -> None:
        """A command sent while another awaits its reply is written only after that reply."""
        h = Harness()
        h.negotiate()
        first = h.client.send(CLIENT_CONNECT)
        second = h.client.send(Helo("mail.example.com"))
        self.assertEqual(h.take(), CONNECT)
        self.assertEqual(h.client.pending, 2)
        h.client.dataReceived(CONTINUE)
        self.assertEqual(self.successResultOf(first), Reply(Continue()))
        self.assertEqual(h.take(), HELO)
        self.assertEqual(h.client.pending, 1)
        self.assertNoResult(second)
        h.client.dataReceived(encode(Reject()))
        self.assertEqual(self.successResultOf(second), Reply(Reject()))

    def test_custom_reply(self) -> None:
        """A REPLYCODE answer arrives as the Reject it stands for."""
        h = Harness()
        h.connected()
        d = h.client.send(MailFrom("<a@example.com>", ("BODY=8BITMIME",)))
        h.client.dataReceived(encode(Reject("no thanks", code=554, status="5.7.0")))
        self.assertEqual(self.successResultOf(d).verdict, Reject("no thanks", code=554, status="5.7.0"))

    def test_end_of_message_modifications(self) -> None:
        """Modifications, PROGRESS and QUARANTINE before the verdict are collected in order."""
        h = Harness()
        h.in_message()
        progress: list[None] = []
        d = h.client.send(EndOfMessage(), on_progress=lambda: progress.append(None))
        self.assertEqual(h.take(), BODYEOB)
        h.client.dataReceived(encode(Progress()))
        self.assertEqual(len(progress), 1)
        h.client.dataReceived(wire(
            AddHeader("X-Checked", "yes"),
            InsertHeader(0, "X-Top", "1"),
            Quarantine("held"),
            ChangeFrom("<new@example.com>", ("SIZE=10",)),
            ReplaceBody(b"new\r\n"),
            Progress(),
            Continue(),
        ))
        self.assertEqual(self.successResultOf(d), Reply(
            Continue(),
            (
                AddHeader("X-Checked", "yes"),
                InsertHeader(0, "X-Top", "1"),
                ChangeFrom("<new@example.com>", ("SIZE=10",)),
                ReplaceBody(b"new\r\n"),
            ),
            progress=2,
            quarantine="held",
        ))
        self.assertEqual(len(progress), 2)

    def test_golden_add_header_bytes(self) -> None:
        """The golden ADDHEADER packet followed by CONTINUE is read as one reply."""
        h = Harness()
        h.in_message()
        d = h.client.send(EndOfMessage())
        h.client.dataReceived(ADD_X_CHECKED + CONTINUE)
        self.assertEqual(self.successResultOf(d), Reply(Continue(), (AddHeader("X-Checked", "yes"),)))

    def test_refuses_negotiate_and_macros(self) -> None:
        """OPTNEG and MACRO are not sent with send()."""
        h = Harness()
        self.assertRaises(LocalProtocolError, h.client.send, Negotiate())

    def test_out_of_order_command_fails_alone(self) -> None:
        """A command the session forbids fails its Deferred; the connection stays usable."""
        h = Harness()
        h.negotiate()
        d = h.client.send(RcptTo("<early@example.com>"))
        self.failureResultOf(d, LocalProtocolError)
        self.assertEqual(h.take(), b"")
        ok = h.client.send(CLIENT_CONNECT)
        self.assertEqual(h.take(), CONNECT)
        h.client.dataReceived(CONTINUE)
        self.successResultOf(ok)

    def test_tcp_nodelay(self) -> None:
        """TCP_NODELAY is switched on for TCP transports."""

        @implementer(ITCPTransport)
        class TCPTransport(StringTransport):  # type: ignore[misc]
            nodelay = False

            def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
                self.nodelay = enabled

        transport = TCPTransport()
        Harness(transport=transport)
        self.assertTrue(transport.nodelay)


class FlagTests(SynchronousTestCase):
    def test_switched_off_fires_at_once(self) -> None:
        """A command the milter switched off is not sent and fires with a skipped Reply."""
        h = Harness()
        h.negotiate(ProtocolFlag.NO_HELO)
        h.client.send(CLIENT_CONNECT)
        h.client.dataReceived(CONTINUE)
        h.take()
        d = h.client.send(Helo("mail.example.com"))
        self.assertEqual(self.successResultOf(d), Reply(skipped=True))
        self.assertEqual(h.take(), b"")

    def test_switched_off_still_gets_macros(self) -> None:
        """Macros for a switched-off command are still sent, as MTAs do."""
        h = Harness()
        h.negotiate(ProtocolFlag.NO_DATA)
        h.client.send(CLIENT_CONNECT)
        h.client.dataReceived(CONTINUE)
        for command in (MailFrom("<a@example.com>"), RcptTo("<b@example.net>")):
            h.client.send(command)
            h.client.dataReceived(CONTINUE)
        h.take()
        d = h.client.send(Data(), {"i": "Q1"})
        self.assertEqual(self.successResultOf(d), Reply(skipped=True))
        self.assertEqual(h.take(), bytes.fromhex("0000000744") + b"Ti\0Q1\0")
        h.client.send(Header("Subject", "hi"))
        self.assertEqual(h.take(), encode(Header("Subject", "hi")))

    def test_no_reply_fires_when_written(self) -> None:
        """Under a no-reply flag the command fires as soon as it is written, and the next follows."""
        h = Harness()
        h.in_message(ProtocolFlag.NR_HEADER | ProtocolFlag.NR_EOH)
        first = h.client.send(Header("Subject", "one"))
        second = h.client.send(Header("To", "two"))
        eoh = h.client.send(EndOfHeaders())
        self.assertEqual(h.take(), wire(Header("Subject", "one"), Header("To", "two"), EndOfHeaders()))
        for d in (first, second, eoh):
            self.assertEqual(self.successResultOf(d), Reply())
        body = h.client.send(BodyChunk(b"x"))
        self.assertEqual(h.take(), encode(BodyChunk(b"x")))
        self.assertNoResult(body)
        h.client.dataReceived(encode(Skip()))
        self.failureResultOf(body, RemoteProtocolError)  # SKIP was not negotiated

    def test_skip_when_negotiated(self) -> None:
        """SKIP answers a body chunk when negotiated."""
        h = Harness()
        h.in_message(ProtocolFlag.SKIP)
        h.client.send(EndOfHeaders())
        h.client.dataReceived(CONTINUE)
        d = h.client.send(BodyChunk(b"x"))
        h.client.dataReceived(encode(Skip()))
        self.assertEqual(self.successResultOf(d), Reply(Skip()))

    def test_abort(self) -> None:
        """ABORT is queued behind a pending command, written, and needs no reply."""
        h = Harness()
        h.in_message()
        header = h.client.send(Header("Subject", "x"))
        aborted = h.client.abort()
        self.assertEqual(h.take(), encode(Header("Subject", "x")))
        self.assertNoResult(aborted)
        h.client.dataReceived(encode(TempFail()))
        self.assertEqual(self.successResultOf(header), Reply(TempFail()))
        self.assertEqual(h.take(), ABORT)
        self.assertIsNone(self.successResultOf(aborted))

    def test_abort_in_message(self) -> None:
        """ABORT inside a message goes out as its golden packet."""
        h = Harness()
        h.in_message()
        self.assertIsNone(self.successResultOf(h.client.abort()))
        self.assertEqual(h.take(), ABORT)


class CloseTests(SynchronousTestCase):
    def test_quit(self) -> None:
        """QUIT is written after queued commands, then the connection closes."""
        h = Harness()
        h.connected()
        helo = h.client.send(Helo("mail.example.com"))
        done = h.client.quit()
        self.assertEqual(h.take(), HELO)
        h.client.dataReceived(CONTINUE)
        self.successResultOf(helo)
        self.assertEqual(h.take(), QUIT)
        self.assertTrue(h.transport.disconnecting)
        self.assertNoResult(done)
        h.lose()
        self.assertIsNone(self.successResultOf(done))
        self.failureResultOf(h.client.send(Helo("late")), MilterUnavailableError)

    def test_close_fails_pending(self) -> None:
        """close() drops the connection at once; pending and queued commands fail."""
        h = Harness()
        h.connected()
        helo = h.client.send(Helo("a"))
        mail = h.client.send(MailFrom("<a@example.com>"))
        done = h.client.close()
        self.failureResultOf(helo, MilterUnavailableError)
        self.failureResultOf(mail, MilterUnavailableError)
        self.assertTrue(h.transport.disconnecting)
        h.lose()
        self.successResultOf(done)

    def test_close_before_connecting(self) -> None:
        """A client closed before its connection is made drops the connection when it comes."""
        client = MilterClient(Clock())
        d = client.negotiate()
        client.close()
        self.failureResultOf(d, MilterUnavailableError)
        transport = StringTransport()
        client.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_disconnect_fails_pending(self) -> None:
        """The milter closing the connection fails the pending command with a clear error."""
        h = Harness()
        h.connected()
        helo = h.client.send(Helo("a"))
        mail = h.client.send(MailFrom("<a@example.com>"))
        h.lose()
        failure = self.failureResultOf(helo, MilterUnavailableError)
        self.assertIn("HELO ('H') awaited its reply", str(failure.value))
        self.failureResultOf(mail, MilterUnavailableError)
        self.assertTrue(h.client.disconnected)
        self.failureResultOf(h.client.send(MailFrom("<a@example.com>")), MilterUnavailableError)

    def test_disconnect_while_negotiating(self) -> None:
        """A milter that hangs up instead of negotiating fails the negotiation."""
        h = Harness()
        d = h.client.negotiate()
        h.client.connectionLost(Failure(ConnectionRefusedError()))
        self.failureResultOf(d, MilterUnavailableError)

    def test_protocol_error_drops(self) -> None:
        """An unknown response letter fails the pending command and queued ones, and drops the connection."""
        h = Harness()
        h.connected()
        helo = h.client.send(Helo("a"))
        mail = h.client.send(MailFrom("<a@example.com>"))
        h.client.dataReceived(bytes.fromhex("000000015a"))
        self.failureResultOf(helo, RemoteProtocolError)
        self.failureResultOf(mail, MilterUnavailableError)
        self.assertTrue(h.transport.disconnecting)

    def test_modification_outside_end_of_message(self) -> None:
        """A modification answering HELO is a protocol error."""
        h = Harness()
        h.connected()
        helo = h.client.send(Helo("a"))
        h.client.dataReceived(encode(AddHeader("X", "y")))
        self.failureResultOf(helo, RemoteProtocolError)

    def test_unsolicited_response(self) -> None:
        """A response while nothing awaits one is a protocol error."""
        h = Harness()
        h.connected()
        h.client.dataReceived(CONTINUE)
        self.assertTrue(h.transport.disconnecting)
        self.failureResultOf(h.client.send(Helo("a")), MilterUnavailableError)


class TimeoutTests(SynchronousTestCase):
    def test_timeout_drops(self) -> None:
        """No reply within the timeout: TimeoutError, queued commands fail, connection aborted."""
        h = Harness(timeout=10)
        h.connected()
        helo = h.client.send(Helo("a"))
        mail = h.client.send(MailFrom("<a@example.com>"))
        h.clock.advance(9.9)
        self.assertNoResult(helo)
        h.clock.advance(0.1)
        self.failureResultOf(helo, TimeoutError)
        self.failureResultOf(mail, MilterUnavailableError)
        self.assertTrue(h.transport.disconnecting)

    def test_timeout_counts_from_writing(self) -> None:
        """A queued command's timeout starts when it is written, not when it is queued."""
        h = Harness(timeout=10)
        h.connected()
        helo = h.client.send(Helo("a"))
        mail = h.client.send(MailFrom("<a@example.com>"))
        h.clock.advance(8)
        h.client.dataReceived(CONTINUE)
        self.successResultOf(helo)
        h.clock.advance(8)
        self.assertNoResult(mail)
        h.client.dataReceived(CONTINUE)
        self.successResultOf(mail)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_progress_restarts_timer(self) -> None:
        """Each PROGRESS restarts the wait, as it does for Postfix."""
        h = Harness(timeout=10)
        h.in_message()
        d = h.client.send(EndOfMessage())
        for _ in range(3):
            h.clock.advance(9)
            h.client.dataReceived(encode(Progress()))
        h.clock.advance(9)
        h.client.dataReceived(CONTINUE)
        self.assertEqual(self.successResultOf(d), Reply(Continue(), progress=3))

    def test_no_timeout(self) -> None:
        """timeout=None waits forever."""
        h = Harness(timeout=None)
        h.connected()
        d = h.client.send(Helo("a"))
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.client.dataReceived(CONTINUE)
        self.successResultOf(d)


class CancelTests(SynchronousTestCase):
    def test_cancel_queued(self) -> None:
        """Cancelling a queued command takes it back; it is never written."""
        h = Harness()
        h.connected()
        helo = h.client.send(Helo("a"))
        mail = h.client.send(MailFrom("<a@example.com>"))
        mail.cancel()
        self.failureResultOf(mail)
        h.take()
        h.client.dataReceived(CONTINUE)
        self.successResultOf(helo)
        self.assertEqual(h.take(), b"")

    def test_cancel_written(self) -> None:
        """Cancelling a written command discards its reply when it comes; the next command follows it."""
        h = Harness()
        h.connected()
        helo = h.client.send(Helo("a"))
        helo.cancel()
        self.failureResultOf(helo)
        mail = h.client.send(MailFrom("<a@example.com>"))
        self.assertEqual(h.take(), encode(Helo("a")))
        h.client.dataReceived(encode(Reject()))
        self.assertEqual(h.take(), encode(MailFrom("<a@example.com>")))
        h.client.dataReceived(CONTINUE)
        self.assertEqual(self.successResultOf(mail), Reply(Continue()))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects protocols to a StringTransport, or never answers ("hang")."""

    def __init__(self, outcome: str = "connect") -> None:
        self.outcome = outcome
        self.transport = StringTransport()
        self.protocol: IProtocol | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if self.outcome == "hang":
            return Deferred()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8891))
        assert protocol is not None
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        return succeed(protocol)


class ConnectTests(SynchronousTestCase):
    def test_connect_and_negotiate(self) -> None:
        """connect_milter connects, negotiates, and fires with the ready client."""
        clock = Clock()
        endpoint = FakeEndpoint()
        d = connect_milter(endpoint, clock, Negotiate(6, Action.ADD_HEADERS, ALL_PROTOCOL))
        self.assertEqual(endpoint.transport.value(), encode(Negotiate(6, Action.ADD_HEADERS, ALL_PROTOCOL)))
        self.assertNoResult(d)
        assert endpoint.protocol is not None
        endpoint.protocol.dataReceived(encode(NegotiateReply(6, Action.ADD_HEADERS)))
        client = self.successResultOf(d)
        self.assertIs(client, endpoint.protocol)
        self.assertEqual(client.negotiated, NegotiateReply(6, Action.ADD_HEADERS))

    def test_connection_refused(self) -> None:
        """A refused connection fails with MilterUnavailableError naming the address."""

        @implementer(IStreamClientEndpoint)
        class Refusing:
            def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                d.errback(ConnectionRefusedError())
                return d

        failure = self.failureResultOf(connect_milter(Refusing(), Clock()), MilterUnavailableError)
        self.assertIn("cannot connect to milter", str(failure.value))

    def test_connect_timeout(self) -> None:
        """No connection within the timeout fails with MilterUnavailableError."""
        clock = Clock()
        d = connect_milter(FakeEndpoint("hang"), clock, timeout=5)
        clock.advance(5)
        failure = self.failureResultOf(d, MilterUnavailableError)
        self.assertIn("no connection within 5", str(failure.value))

    def test_negotiation_timeout_closes(self) -> None:
        """A milter silent after connecting times out and is disconnected."""
        clock = Clock()
        endpoint = FakeEndpoint()
        d = connect_milter(endpoint, clock, timeout=5)
        clock.advance(5)
        self.failureResultOf(d, TimeoutError)
        self.assertTrue(endpoint.transport.disconnecting)


class AddressTests(SynchronousTestCase):
    def test_libmilter_forms(self) -> None:
        """libmilter and Postfix address forms become hostname or unix endpoints."""
        for address, host, port in [
            ("inet:8891@127.0.0.1", "127.0.0.1", 8891),
            ("inet:127.0.0.1:8891", "127.0.0.1", 8891),
            ("inet6:8891@[::1]", "::1", 8891),
            ("inet6:8891@::1", "::1", 8891),
            ("inet:[::1]:8891", "::1", 8891),
            ("INET:25@mx.example", "mx.example", 25),
        ]:
            endpoint = milter_endpoint(address, MemoryReactorClock())
            self.assertIsInstance(endpoint, HostnameEndpoint, address)
            self.assertEqual((endpoint._hostText, endpoint._port), (host, port), address)  # type: ignore[attr-defined]
        for address in ("unix:/run/milter.sock", "local:/run/milter.sock"):
            endpoint = milter_endpoint(address, MemoryReactorClock())
            self.assertIsInstance(endpoint, UNIXClientEndpoint)
            self.assertEqual(endpoint._path, "/run/milter.sock")  # type: ignore[attr-defined]

    def test_twisted_descriptions(self) -> None:
        """Twisted client descriptions are passed to clientFromString."""
        self.assertIsInstance(milter_endpoint("tcp:host=127.0.0.1:port=8891", MemoryReactorClock()), TCP4ClientEndpoint)
        unix = milter_endpoint("unix:path=/run/m.sock:timeout=3", MemoryReactorClock())
        self.assertEqual(unix._path, "/run/m.sock")  # type: ignore[attr-defined]

    def test_bad_addresses(self) -> None:
        """Addresses that cannot work are configuration errors."""
        for address in ("inet:8891", "inet:99999@h", "bogus", "xyz:1", "inet:@h"):
            self.assertRaises(ConfigurationError, milter_endpoint, address, MemoryReactorClock())
