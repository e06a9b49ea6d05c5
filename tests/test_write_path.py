"""The reply write path: one send() straight to an idle socket, the rest through the transport, in order."""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from txmilt.milter import Milter
from txmilt.protocol import MilterFactory, MilterProtocol


class FakeSocket:
    """A socket that takes at most ``room`` bytes per send() (or raises ``error``)."""

    def __init__(self, room: int, error: int | None = None) -> None:
        self.room = room
        self.error = error
        self.sent = bytearray()
        self.calls = 0

    def send(self, data: bytes) -> int:
        self.calls += 1
        if self.error is not None:
            raise OSError(self.error, "fake")
        taken = bytes(data[: self.room])
        self.sent += taken
        return len(taken)


class TCPLikeTransport(StringTransport):
    """A StringTransport with the attributes Twisted's TCP transport has."""

    def __init__(self) -> None:
        super().__init__()
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.TLS = False


def protocol_with(sock: FakeSocket | None, transport: Any) -> MilterProtocol:
    factory = MilterFactory([Milter], Clock())
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, MilterProtocol)
    protocol.makeConnection(transport)
    protocol._socket = sock  # type: ignore[assignment]  # what connectionMade takes from a TCP transport
    return protocol


REPLY = bytes(range(256)) * 40


class WritePathTests(SynchronousTestCase):
    def test_idle_socket_takes_it_all(self) -> None:
        """An idle socket gets the whole batch in one send(); the transport nothing."""
        sock, transport = FakeSocket(len(REPLY)), TCPLikeTransport()
        protocol_with(sock, transport)._write(REPLY)
        self.assertEqual((bytes(sock.sent), sock.calls), (REPLY, 1))
        self.assertEqual(transport.value(), b"")

    def test_partial_send_queues_only_the_rest(self) -> None:
        """What the kernel did not take goes to the transport once, after what it took: no byte twice."""
        for room in (1, 5, 4095, len(REPLY) - 1):
            sock, transport = FakeSocket(room), TCPLikeTransport()
            protocol_with(sock, transport)._write(REPLY)
            self.assertEqual(bytes(sock.sent) + transport.value(), REPLY, room)
            self.assertEqual(transport.value(), REPLY[room:], room)

    def test_would_block(self) -> None:
        """EAGAIN from the socket: everything goes through the transport."""
        sock, transport = FakeSocket(0, errno.EAGAIN), TCPLikeTransport()
        protocol_with(sock, transport)._write(REPLY)
        self.assertEqual(transport.value(), REPLY)

    def test_queued_data_keeps_order(self) -> None:
        """With bytes already queued in Twisted, the batch is queued behind them, never sent ahead."""
        for attribute, value in (("dataBuffer", b"earlier"), ("_tempDataBuffer", [b"earlier"])):
            sock, transport = FakeSocket(len(REPLY)), TCPLikeTransport()
            setattr(transport, attribute, value)
            protocol_with(sock, transport)._write(REPLY)
            self.assertEqual(sock.calls, 0, attribute)
            self.assertEqual(transport.value(), REPLY, attribute)

    def test_tls_goes_through_the_transport(self) -> None:
        """Under TLS the socket carries ciphertext: replies always go through the transport."""
        sock, transport = FakeSocket(len(REPLY)), TCPLikeTransport()
        transport.TLS = True
        protocol_with(sock, transport)._write(REPLY)
        self.assertEqual(sock.calls, 0)
        self.assertEqual(transport.value(), REPLY)

    def test_other_transports(self) -> None:
        """A transport that is not a TCP or unix connection (no socket): through the transport."""
        transport = StringTransport()
        protocol = protocol_with(None, transport)
        protocol.connectionMade()
        self.assertIsNone(protocol._socket)
        protocol._write(REPLY)
        self.assertEqual(transport.value(), REPLY)
