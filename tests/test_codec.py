"""Tests for txmilt.codec: framing, golden bytes, round trips and malformed packets."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests import strategies as s
from txmilt.codec import (
    ABSOLUTE_FRAME_LIMIT,
    DEFAULT_FRAME_LIMIT,
    LIBMILTER_FRAME_LIMIT,
    FrameBuffer,
    decode_command,
    decode_response,
    encode,
    frame,
)
from txmilt.errors import FrameSizeError, LocalProtocolError, MilterError, RemoteProtocolError
from txmilt.messages import (
    Abort,
    Accept,
    Action,
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Command,
    Connect,
    Continue,
    Data,
    DeleteRecipient,
    Discard,
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
    QuitNoClose,
    RcptTo,
    Reject,
    ReplaceBody,
    Response,
    Skip,
    TempFail,
)


def h(text: str) -> bytes:
    """Bytes from the hex notation of PROTOCOL.md."""
    return bytes.fromhex(text)


def one_frame(data: bytes) -> tuple[str, bytes]:
    """The single frame in ``data``."""
    buffer = FrameBuffer()
    buffer.feed(data)
    result = buffer.next_frame()
    assert result is not None
    assert buffer.next_frame() is None and buffer.pending == 0
    return result


def command_of(data: bytes) -> Command:
    """The command encoded in one whole packet."""
    return decode_command(*one_frame(data))


def response_of(data: bytes) -> Response:
    """The response encoded in one whole packet."""
    return decode_response(*one_frame(data))


#: The golden session of PROTOCOL.md §8: (direction, message, bytes).
GOLDEN_OFFER = Negotiate(6, Action(0x1FF), ProtocolFlag(0x1FFFFF))
GOLDEN_REPLY = NegotiateReply(6, Action.ADD_HEADERS, ProtocolFlag.NO_DATA | ProtocolFlag.NO_UNKNOWN)
GOLDEN_SESSION: tuple[tuple[str, Command | Response, bytes], ...] = (
    (">", GOLDEN_OFFER, h("00 00 00 0d 4f 00 00 00 06 00 00 01 ff 00 1f ff ff")),
    ("<", GOLDEN_REPLY, h("00 00 00 0d 4f 00 00 00 06 00 00 00 01 00 00 03 00")),
    (">", Macros("C", (("j", "mx.example.net"),)),
     h("00 00 00 13 44 43 6a 00 6d 78 2e 65 78 61 6d 70 6c 65 2e 6e 65 74 00")),
    (">", Connect("mail.example.com", Family.INET, 54321, "192.0.2.10"),
     h("00 00 00 20 43 6d 61 69 6c 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00 34 d4 31"
       " 31 39 32 2e 30 2e 32 2e 31 30 00")),
    ("<", Continue(), h("00 00 00 01 63")),
    (">", Helo("mail.example.com"), h("00 00 00 12 48 6d 61 69 6c 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00")),
    ("<", Continue(), h("00 00 00 01 63")),
    (">", MailFrom("<alice@example.com>", ("BODY=8BITMIME",)),
     h("00 00 00 23 4d 3c 61 6c 69 63 65 40 65 78 61 6d 70 6c 65 2e 63 6f 6d 3e 00"
       " 42 4f 44 59 3d 38 42 49 54 4d 49 4d 45 00")),
    ("<", Continue(), h("00 00 00 01 63")),
    (">", RcptTo("<bob@example.net>"), h("00 00 00 13 52 3c 62 6f 62 40 65 78 61 6d 70 6c 65 2e 6e 65 74 3e 00")),
    ("<", Continue(), h("00 00 00 01 63")),
    (">", Header("Subject", "Hello"), h("00 00 00 0f 4c 53 75 62 6a 65 63 74 00 48 65 6c 6c 6f 00")),
    ("<", Continue(), h("00 00 00 01 63")),
    (">", EndOfHeaders(), h("00 00 00 01 4e")),
    ("<", Continue(), h("00 00 00 01 63")),
    (">", BodyChunk(b"Hi Bob\r\n"), h("00 00 00 09 42 48 69 20 42 6f 62 0d 0a")),
    ("<", Continue(), h("00 00 00 01 63")),
    (">", EndOfMessage(), h("00 00 00 01 45")),
    ("<", AddHeader("X-Checked", "yes"), h("00 00 00 0f 68 58 2d 43 68 65 63 6b 65 64 00 79 65 73 00")),
    ("<", Continue(), h("00 00 00 01 63")),
    (">", Quit(), h("00 00 00 01 51")),
)

#: "More golden response packets" of PROTOCOL.md §8.
GOLDEN_RESPONSES: tuple[tuple[Response, bytes], ...] = (
    (InsertHeader(0, "X-Ins", "top"), h("00 00 00 0f 69 00 00 00 00 58 2d 49 6e 73 00 74 6f 70 00")),
    (ChangeHeader(1, "Subject", ""), h("00 00 00 0e 6d 00 00 00 01 53 75 62 6a 65 63 74 00 00")),
    (ChangeFrom("<new@example.com>", ("SIZE=10", "BODY=8BITMIME")),
     h("00 00 00 29 65 3c 6e 65 77 40 65 78 61 6d 70 6c 65 2e 63 6f 6d 3e 00"
       " 53 49 5a 45 3d 31 30 20 42 4f 44 59 3d 38 42 49 54 4d 49 4d 45 00")),
    (AddRecipient("<c@example.org>"), h("00 00 00 11 2b 3c 63 40 65 78 61 6d 70 6c 65 2e 6f 72 67 3e 00")),
    (AddRecipient("<d@example.org>", ("NOTIFY=NEVER",)),
     h("00 00 00 1e 32 3c 64 40 65 78 61 6d 70 6c 65 2e 6f 72 67 3e 00 4e 4f 54 49 46 59 3d 4e 45 56 45 52 00")),
    (DeleteRecipient("<bob@example.net>"), h("00 00 00 13 2d 3c 62 6f 62 40 65 78 61 6d 70 6c 65 2e 6e 65 74 3e 00")),
    (Quarantine("held"), h("00 00 00 06 71 68 65 6c 64 00")),
    (Progress(), h("00 00 00 01 70")),
    (ReplaceBody(b"new\r\n"), h("00 00 00 06 62 6e 65 77 0d 0a")),
    (TempFail("try later", 451, "4.7.1"),
     h("00 00 00 15 79 34 35 31 20 34 2e 37 2e 31 20 74 72 79 20 6c 61 74 65 72 00")),
    (Reject(("line one", "line two"), code=550, status="5.0.0"),
     h("00 00 00 28 79 35 35 30 2d 35 2e 30 2e 30 20 6c 69 6e 65 20 6f 6e 65 0d 0a"
       " 35 35 30 20 35 2e 30 2e 30 20 6c 69 6e 65 20 74 77 6f 00")),
    (Skip(), h("00 00 00 01 73")),
    (Reject(), h("00 00 00 01 72")),
    (TempFail(), h("00 00 00 01 74")),
    (Accept(), h("00 00 00 01 61")),
    (Discard(), h("00 00 00 01 64")),
)

#: The OPTNEG reply with macro lists of PROTOCOL.md §4.5.
GOLDEN_MACRO_REPLY = (
    NegotiateReply(
        6,
        Action.ADD_HEADERS | Action.SET_MACRO_LIST,
        ProtocolFlag.NO_DATA | ProtocolFlag.NO_UNKNOWN,
        {MacroStage.CONNECT: ("j", "{client_addr}"), MacroStage.END_OF_MESSAGE: ("i",)},
    ),
    h("00 00 00 27 4f 00 00 00 06 00 00 01 01 00 00 03 00"
      " 00 00 00 00 6a 20 7b 63 6c 69 65 6e 74 5f 61 64 64 72 7d 00"
      " 00 00 00 05 69 00"),
)


class GoldenBytesTests(SynchronousTestCase):
    """Every packet of PROTOCOL.md §8 and §4.5, byte for byte, both directions."""

    def test_golden_session_encodes(self) -> None:
        """Each message of the golden session encodes to exactly its bytes."""
        for _, message, data in GOLDEN_SESSION:
            self.assertEqual(encode(message), data, message)

    def test_golden_session_decodes(self) -> None:
        """Each packet of the golden session decodes to its message."""
        for direction, message, data in GOLDEN_SESSION:
            decoded = command_of(data) if direction == ">" else response_of(data)
            self.assertEqual(decoded, message)

    def test_golden_responses_encode(self) -> None:
        """Each response of the "more golden response packets" table encodes to exactly its bytes."""
        for response, data in GOLDEN_RESPONSES:
            self.assertEqual(encode(response), data, response)

    def test_golden_responses_decode(self) -> None:
        """Each packet of the "more golden response packets" table decodes to its response."""
        for response, data in GOLDEN_RESPONSES:
            self.assertEqual(response_of(data), response)

    def test_setreply_is_tempfail_default(self) -> None:
        """TempFail("try later") is libmilter's setreply 451 4.7.1 with TEMPFAIL."""
        self.assertEqual(encode(TempFail("try later")), GOLDEN_RESPONSES[9][1])

    def test_chgheader_delete(self) -> None:
        """Deleting a header is a CHGHEADER with an empty value."""
        self.assertEqual(response_of(GOLDEN_RESPONSES[1][1]), ChangeHeader(1, "Subject", ""))

    def test_macro_list_reply(self) -> None:
        """The OPTNEG reply with macro lists of §4.5 encodes and decodes exactly."""
        reply, data = GOLDEN_MACRO_REPLY
        self.assertEqual(encode(reply), data)
        self.assertEqual(response_of(data), reply)

    def test_macro_list_reply_with_commas(self) -> None:
        """Macro lists separated by commas (as Sendmail accepts) decode like spaces."""
        data = frame("O", h("00 00 00 06 00 00 01 01 00 00 03 00 00 00 00 00") + b"j,{client_addr}, _\0")
        reply = response_of(data)
        assert isinstance(reply, NegotiateReply)
        self.assertEqual(reply.macros, {MacroStage.CONNECT: ("j", "{client_addr}", "_")})

    def test_connect_inet6(self) -> None:
        """CONNECT family '6' ends in '6', the port and the IPv6: address, as in §8."""
        command = Connect("mx.example", Family.INET6, 2525, "IPv6:2001:db8::1")
        data = encode(command)
        tail = h("36 09 dd 49 50 76 36 3a 32 30 30 31 3a 64 62 38 3a 3a 31 00")
        self.assertTrue(data.endswith(b"mx.example\0" + tail), data)
        self.assertEqual(data[:4], len(data[4:]).to_bytes(4, "big"))
        self.assertEqual(command_of(data), command)

    def test_connect_unknown(self) -> None:
        """CONNECT family 'U' ends with the family byte: no port, no address."""
        command = Connect("localhost", Family.UNKNOWN)
        data = encode(command)
        self.assertEqual(data, h("00 00 00 0c 43") + b"localhost" + h("00 55"))
        self.assertEqual(command_of(data), command)

    def test_connect_unix(self) -> None:
        """CONNECT family 'L' carries port 0 and the socket path."""
        command = Connect("localhost", Family.UNIX, 0, "/var/run/smtp.sock")
        data = encode(command)
        self.assertTrue(data.endswith(b"localhost" + h("00 4c 00 00 2f 76 61 72") + b"/run/smtp.sock\0"))
        self.assertEqual(command_of(data), command)

    def test_empty_commands(self) -> None:
        """Commands without payload are the five bytes 00 00 00 01 <letter>."""
        for command in (Data(), EndOfHeaders(), EndOfMessage(), Abort(), Quit(), QuitNoClose()):
            self.assertEqual(encode(command), b"\0\0\0\1" + command.letter.encode())
            self.assertEqual(command_of(encode(command)), command)


class RoundTripTests(SynchronousTestCase):
    """decode(encode(x)) == x for every message, the letter and payload taken from the frame."""

    @given(s.commands())
    def test_commands(self, command: Command) -> None:
        """Every command survives encode then decode_command."""
        self.assertEqual(command_of(encode(command)), command)

    @given(s.responses())
    def test_responses(self, response: Response) -> None:
        """Every response survives encode then decode_response."""
        self.assertEqual(response_of(encode(response)), response)

    @given(s.wire_text(forbidden="\0\r\n"))
    def test_percent(self, text: str) -> None:
        """'%' is doubled on the wire and undoubled when decoded."""
        data = encode(Reject(text))
        self.assertEqual(data[5:].count(b"%"), 2 * text.encode("utf-8", "surrogateescape").count(b"%"))
        self.assertEqual(response_of(data), Reject(text))


class FrameBufferTests(SynchronousTestCase):
    """Reassembly of length-prefixed frames."""

    @given(
        st.lists(st.tuples(st.integers(0, 255).map(chr), st.binary(max_size=300)), max_size=12),
        s.cuts,
    )
    def test_chunking_irrelevant(self, frames: list[tuple[str, bytes]], cuts: list[int]) -> None:
        """A stream of frames fed in arbitrary chunks yields the same frames as fed whole."""
        data = b"".join(len(payload + b"x").to_bytes(4, "big") + bytes([ord(letter)]) + payload
                        for letter, payload in frames)
        buffer = FrameBuffer()
        got = []
        for chunk in s.chunked(data, cuts):
            buffer.feed(chunk)
            while (result := buffer.next_frame()) is not None:
                got.append(result)
        self.assertEqual(got, frames)
        self.assertEqual(buffer.pending, 0)

    def test_partial_header(self) -> None:
        """Fewer than five bytes are not a frame yet."""
        buffer = FrameBuffer()
        buffer.feed(b"\0\0\0\1")
        self.assertIsNone(buffer.next_frame())
        self.assertEqual(buffer.pending, 4)
        buffer.feed(b"N")
        self.assertEqual(buffer.next_frame(), ("N", b""))

    def test_length_zero_counts_as_one(self) -> None:
        """A length of 0 is read like 1: ``00 00 00 00 4e`` is EOH, as libmilter answers it."""
        buffer = FrameBuffer()
        buffer.feed(h("00 00 00 00 4e 00 00 00 01 41"))
        self.assertEqual(buffer.next_frame(), ("N", b""))
        self.assertEqual(buffer.next_frame(), ("A", b""))
        self.assertEqual(decode_command("N", b""), EndOfHeaders())

    def test_libmilter_limit_accepts_65535(self) -> None:
        """At limit 65535 a 65535-byte payload is accepted."""
        buffer = FrameBuffer(LIBMILTER_FRAME_LIMIT)
        payload = b"x" * 65535
        buffer.feed(frame("B", payload))
        self.assertEqual(buffer.next_frame(), ("B", payload))

    def test_libmilter_limit_refuses_65536(self) -> None:
        """At limit 65535 a 65536-byte payload raises FrameSizeError, before the payload arrives."""
        buffer = FrameBuffer(LIBMILTER_FRAME_LIMIT)
        buffer.feed(h("00 01 00 01 42"))
        error = self.assertRaises(FrameSizeError, buffer.next_frame)
        self.assertEqual((error.size, error.limit), (65536, 65535))
        self.assertIn("'B'", str(error))
        self.assertIsInstance(error, RemoteProtocolError)

    def test_configurable_limit(self) -> None:
        """Any limit accepts exactly ``limit`` payload bytes and refuses ``limit + 1``."""
        for limit in (1, 100, 4096, DEFAULT_FRAME_LIMIT):
            ok = FrameBuffer(limit)
            ok.feed((limit + 1).to_bytes(4, "big") + b"L")
            self.assertIsNone(ok.next_frame())
            too_big = FrameBuffer(limit)
            too_big.feed((limit + 2).to_bytes(4, "big") + b"L")
            error = self.assertRaises(FrameSizeError, too_big.next_frame)
            self.assertEqual((error.size, error.limit), (limit + 1, limit))

    def test_default_limit(self) -> None:
        """The default limit is 1 MiB, enough for Postfix's 100 KiB headers."""
        self.assertEqual(FrameBuffer().limit, 1024 * 1024)

    def test_absurd_length(self) -> None:
        """A length of 0xFFFFFFFF is refused, also at the largest limit."""
        for limit in (DEFAULT_FRAME_LIMIT, ABSOLUTE_FRAME_LIMIT):
            buffer = FrameBuffer(limit)
            buffer.feed(h("ff ff ff ff 4c"))
            error = self.assertRaises(FrameSizeError, buffer.next_frame)
            self.assertEqual(error.size, 0xFFFFFFFE)

    def test_postfix_stray_output(self) -> None:
        """ASCII 'post' read as a length (1886352244) is refused, not awaited."""
        buffer = FrameBuffer()
        buffer.feed(b"postsrsd: ")
        self.assertRaises(FrameSizeError, buffer.next_frame)

    def test_bad_limits(self) -> None:
        """A limit below 1 or above the signed 32-bit range is a LocalProtocolError."""
        for limit in (0, -1, ABSOLUTE_FRAME_LIMIT + 1):
            self.assertRaises(LocalProtocolError, FrameBuffer, limit)

    def test_large_stream_compacts(self) -> None:
        """Many large frames fed in one piece all come out intact."""
        frames = [("B", bytes([n]) * 70000) for n in range(5)]
        buffer = FrameBuffer()
        buffer.feed(b"".join(frame(letter, payload) for letter, payload in frames))
        buffer.feed(frame("E"))
        got = []
        while (result := buffer.next_frame()) is not None:
            got.append(result)
        self.assertEqual(got, [*frames, ("E", b"")])


class RandomBytesTests(SynchronousTestCase):
    """Garbage never raises anything but MilterError."""

    @given(st.binary(max_size=200), st.integers(1, 300))
    def test_random_stream(self, data: bytes, limit: int) -> None:
        """Random bytes through FrameBuffer and both decoders raise only RemoteProtocolError."""
        buffer = FrameBuffer(limit)
        buffer.feed(data)
        try:
            while (result := buffer.next_frame()) is not None:
                for decode in (decode_command, decode_response):
                    with contextlib.suppress(RemoteProtocolError):
                        decode(*result)
        except FrameSizeError:
            pass

    @given(st.sampled_from("ODCHMRTLNBEUAQKcartdys4fpqhime+2-bZ\0"), st.binary(max_size=40))
    def test_random_payloads(self, letter: str, payload: bytes) -> None:
        """Random payloads for real letters decode or raise RemoteProtocolError naming the letter."""
        for decode in (decode_command, decode_response):
            try:
                decode(letter, payload)
            except RemoteProtocolError as e:
                self.assertIn(repr(letter), str(e))

    @given(s.commands() | s.responses(), st.data())
    def test_mutated_packets(self, message: Command | Response, data: st.DataObject) -> None:
        """Valid packets with bytes changed or cut raise only RemoteProtocolError."""
        packet = bytearray(encode(message))
        for _ in range(data.draw(st.integers(1, 3))):
            position = data.draw(st.integers(4, len(packet) - 1))
            packet[position] = data.draw(st.integers(0, 255))
        payload = bytes(packet[5:data.draw(st.integers(5, len(packet)))])
        letter = chr(packet[4])
        for decode in (decode_command, decode_response):
            with contextlib.suppress(RemoteProtocolError):
                decode(letter, payload)


class MalformedCommandTests(SynchronousTestCase):
    """Bad command payloads (PROTOCOL.md §1.3, §2) raise RemoteProtocolError naming the command."""

    def assert_refused(self, letter: str, payload: bytes, *words: str) -> None:
        """decode_command refuses the packet with a message containing ``words``."""
        error = self.assertRaises(RemoteProtocolError, decode_command, letter, payload)
        for word in words:
            self.assertIn(word, str(error))

    def test_unknown_letter(self) -> None:
        """An unknown command letter is refused."""
        self.assert_refused("Z", b"", "unknown command", "'Z'")

    def test_response_letter_as_command(self) -> None:
        """A response letter is not a command."""
        self.assert_refused("c", b"", "'c'")

    def test_payload_needed(self) -> None:
        """Commands that need a payload (D, B, C, H, L, M, O, R, U) refuse an empty one."""
        for letter, name in (("D", "MACRO"), ("B", "BODY"), ("C", "CONNECT"), ("H", "HELO"), ("L", "HEADER"),
                             ("M", "MAIL"), ("O", "OPTNEG"), ("R", "RCPT"), ("U", "UNKNOWN")):
            self.assert_refused(letter, b"", name, repr(letter))

    def test_short_optneg(self) -> None:
        """OPTNEG with fewer than 12 bytes is refused; extra bytes are ignored."""
        self.assert_refused("O", b"\0" * 11, "OPTNEG", "12")
        self.assertEqual(decode_command("O", h("00 00 00 06 00 00 01 ff 00 1f ff ff 99")), GOLDEN_OFFER)

    def test_missing_nul(self) -> None:
        """Strings without their final NUL are refused."""
        for letter, payload, name in (
            ("H", b"mail.example.com", "HELO"),
            ("M", b"<a@example.com>\0SIZE=1", "MAIL"),
            ("R", b"<a@example.com>", "RCPT"),
            ("L", b"Subject\0Hello", "HEADER"),
            ("U", b"XFOO", "UNKNOWN"),
            ("C", b"host", "CONNECT"),
            ("C", b"host\x004\x00\x19192.0.2.1", "CONNECT"),
        ):
            self.assert_refused(letter, payload, name, repr(letter))

    def test_header_needs_two_strings(self) -> None:
        """A HEADER with one or three strings is refused."""
        self.assert_refused("L", b"Subject\0", "HEADER", "1 strings")
        self.assert_refused("L", b"Subject\0a\0b\0", "HEADER", "3 strings")

    def test_empty_header_name(self) -> None:
        """A HEADER with an empty name is refused, as libmilter ends the session."""
        self.assert_refused("L", b"\0value\0", "HEADER", "empty name")

    def test_empty_header_value(self) -> None:
        """A HEADER with an empty value is legal: ``X-Empty\\0\\0``."""
        self.assertEqual(decode_command("L", b"X-Empty\0\0"), Header("X-Empty", ""))

    def test_folded_header(self) -> None:
        """A folded header value keeps its bare LF."""
        self.assertEqual(decode_command("L", b"X-Long\0a\n\tb\0"), Header("X-Long", "a\n\tb"))

    def test_helo_two_strings(self) -> None:
        """HELO carries exactly one string."""
        self.assert_refused("H", b"a\0b\0", "HELO")

    def test_empty_payload_commands_refuse_data(self) -> None:
        """DATA, EOH, ABORT, QUIT and QUIT_NC refuse a payload."""
        for letter, name in (("T", "DATA"), ("N", "EOH"), ("A", "ABORT"), ("Q", "QUIT"), ("K", "QUIT_NC")):
            self.assert_refused(letter, b"x", name, repr(letter))

    def test_eob_with_data(self) -> None:
        """BODYEOB with data is accepted, as libmilter does."""
        self.assertEqual(decode_command("E", b"tail\r\n"), EndOfMessage(b"tail\r\n"))

    def test_body_with_nul(self) -> None:
        """BODY chunks are raw bytes and may contain NUL."""
        self.assertEqual(decode_command("B", b"a\0b"), BodyChunk(b"a\0b"))

    def test_mail_args(self) -> None:
        """MAIL and RCPT carry the address then one ESMTP argument per string."""
        self.assertEqual(decode_command("M", b"<>\0SIZE=1\0BODY=8BITMIME\0"),
                         MailFrom("<>", ("SIZE=1", "BODY=8BITMIME")))
        self.assertEqual(decode_command("R", b"<a@b>\0NOTIFY=NEVER\0"), RcptTo("<a@b>", ("NOTIFY=NEVER",)))

    def test_text_is_surrogate_escaped(self) -> None:
        """Bytes that are not UTF-8 decode losslessly with surrogateescape."""
        command = decode_command("H", b"caf\xe9\0")
        self.assertEqual(command, Helo("caf\udce9"))
        self.assertEqual(encode(command), frame("H", b"caf\xe9\0"))


class MalformedConnectTests(SynchronousTestCase):
    """CONNECT parsing follows libmilter (PROTOCOL.md §2.4)."""

    def assert_refused(self, payload: bytes, *words: str) -> None:
        """decode_command refuses the CONNECT with a message containing ``words``."""
        error = self.assertRaises(RemoteProtocolError, decode_command, "C", payload)
        self.assertIn("CONNECT", str(error))
        for word in words:
            self.assertIn(word, str(error))

    def test_no_family(self) -> None:
        """A CONNECT that stops after the host name is refused."""
        self.assert_refused(b"host\0", "family")

    def test_unknown_family(self) -> None:
        """An unknown family byte is refused."""
        self.assert_refused(b"host\0X\0\0a\0", "family", "X")

    def test_family_u_with_address(self) -> None:
        """Family 'U' carries nothing after the family byte."""
        self.assert_refused(b"host\0U\0\x19x\0", "'U'")

    def test_missing_port(self) -> None:
        """An INET CONNECT without port and address is refused."""
        self.assert_refused(b"host\x004\x00", "port")

    def test_bad_addresses(self) -> None:
        """Addresses that inet_aton/inet_pton would not parse are refused."""
        for family, address in ((b"4", b"300.1.1.1"), (b"4", b"2001:db8::1"), (b"6", b"192.0.2.1"),
                                (b"6", b"IPv6:zz::1"), (b"4", b"")):
            self.assert_refused(b"host\0" + family + b"\0\x19" + address + b"\0", "address")

    def test_ipv6_prefix(self) -> None:
        """The IPv6: prefix is accepted in any case and kept in the address."""
        for address in ("IPv6:2001:db8::1", "ipv6:2001:DB8::1", "2001:db8:0:0:0:0:0:1", "::ffff:192.0.2.1"):
            command = decode_command("C", b"h\x006\x00\x19" + address.encode() + b"\0")
            self.assertEqual(command, Connect("h", Family.INET6, 25, address))

    def test_unix_path(self) -> None:
        """Family 'L' accepts any path, even an empty one."""
        self.assertEqual(decode_command("C", b"h\0L\0\0\0"), Connect("h", Family.UNIX, 0, ""))

    def test_two_addresses(self) -> None:
        """A CONNECT with a second string after the address is refused."""
        self.assert_refused(b"host\x004\x00\x19192.0.2.1\x00x\x00")


class MacroPacketTests(SynchronousTestCase):
    """MACRO packet parsing (PROTOCOL.md §2.3)."""

    def test_no_letter(self) -> None:
        """A macro packet without a command letter is refused."""
        error = self.assertRaises(RemoteProtocolError, decode_command, "D", b"")
        self.assertIn("MACRO", str(error))

    def test_letter_without_pairs(self) -> None:
        """A macro packet with only its letter is legal and has no pairs."""
        self.assertEqual(decode_command("D", b"U"), Macros("U"))

    def test_damaged(self) -> None:
        """A damaged macro packet keeps its whole pairs and says what was wrong, as libmilter ignores damage."""
        odd = decode_command("D", b"Cj\0mx\0_\0")
        self.assertEqual(odd, Macros("C", (("j", "mx"),)))
        assert isinstance(odd, Macros)
        self.assertIn("'_' has no value", odd.damage)
        unterminated = decode_command("D", b"Cj\0mx\0_\0value")
        self.assertEqual(unterminated, Macros("C", (("j", "mx"),)))
        assert isinstance(unterminated, Macros)
        self.assertIn("does not end with NUL", unterminated.damage)
        self.assertIn("'_' has no value", unterminated.damage)
        self.assertEqual(decode_command("D", b"Cj\0mx\0"), Macros("C", (("j", "mx"),), ""))

    def test_unknown_letter(self) -> None:
        """Macro packets for any letter decode; the session decides what to keep."""
        self.assertEqual(decode_command("D", b"Zj\0x\0"), Macros("Z", (("j", "x"),)))
        self.assertEqual(decode_command("D", b"\xffj\0x\0"), Macros("\xff", (("j", "x"),)))

    def test_empty_values(self) -> None:
        """Empty names and values survive."""
        self.assertEqual(decode_command("D", b"M\0\0{x}\0\0"), Macros("M", (("", ""), ("{x}", ""))))


class MalformedResponseTests(SynchronousTestCase):
    """Bad response payloads raise RemoteProtocolError naming the response."""

    def assert_refused(self, letter: str, payload: bytes, *words: str) -> None:
        """decode_response refuses the packet with a message containing ``words``."""
        error = self.assertRaises(RemoteProtocolError, decode_response, letter, payload)
        self.assertIn(repr(letter), str(error))
        for word in words:
            self.assertIn(word, str(error))

    def test_unknown_letter(self) -> None:
        """Unknown response letters (and SETSYMLIST 'l') are refused."""
        self.assert_refused("z", b"", "unknown response")
        self.assert_refused("l", b"", "unknown response")

    def test_verdicts_without_payload(self) -> None:
        """c a r t d s 4 f p carry no payload (Postfix checks this too)."""
        for letter in "cartds4fp":
            self.assert_refused(letter, b"x")

    def test_short_optneg_reply(self) -> None:
        """An OPTNEG reply of fewer than 12 bytes is refused."""
        self.assert_refused("O", b"\0" * 8, "OPTNEG")

    def test_truncated_macro_list(self) -> None:
        """A macro list without its NUL, or a stage without a list, is refused."""
        base = h("00 00 00 06 00 00 01 01 00 00 00 00")
        self.assert_refused("O", base + h("00 00 00 00") + b"j", "macro list")
        self.assert_refused("O", base + h("00 00"), "macro list")

    def test_unknown_macro_stage(self) -> None:
        """A macro list for stage 7 is refused."""
        base = h("00 00 00 06 00 00 01 01 00 00 00 00")
        self.assert_refused("O", base + h("00 00 00 07") + b"j\0", "stage 7")

    def test_duplicate_macro_stage(self) -> None:
        """Two macro lists for one stage are refused."""
        base = h("00 00 00 06 00 00 01 01 00 00 00 00")
        self.assert_refused("O", base + (h("00 00 00 01") + b"j\0") * 2, "twice")

    def test_header_changes(self) -> None:
        """Header changes need an index, a non-empty name and exactly two strings."""
        self.assert_refused("i", b"\0\0", "index")
        self.assert_refused("m", b"\0\0\0\1\0v\0", "empty header name")
        self.assert_refused("h", b"\0v\0", "empty header name")
        self.assert_refused("h", b"X\0", "ADDHEADER")

    def test_envelope_changes(self) -> None:
        """CHGFROM and ADDRCPT_PAR carry at most two strings."""
        self.assert_refused("e", b"a\0b\0c\0", "at most 2")
        self.assert_refused("2", b"a\0b\0c\0", "at most 2")
        self.assert_refused("+", b"a\0b\0", "ADDRCPT")
        self.assert_refused("-", b"a", "DELRCPT")

    def test_quarantine_reason(self) -> None:
        """QUARANTINE needs a non-empty reason."""
        self.assert_refused("q", b"\0", "empty reason")

    def test_chgfrom_without_args(self) -> None:
        """CHGFROM with one string has no arguments (None); with an empty one, no arguments (())."""
        self.assertEqual(decode_response("e", b"<a@b>\0"), ChangeFrom("<a@b>"))
        self.assertEqual(decode_response("e", b"<a@b>\0\0"), ChangeFrom("<a@b>", ()))
        self.assertEqual(decode_response("2", b"<a@b>\0"), AddRecipient("<a@b>", ()))

    def test_reply_code_lone_percent(self) -> None:
        """A REPLYCODE text with a lone '%' is refused."""
        self.assert_refused("y", b"550 5.7.1 100% sure\0", "lone '%'")
        self.assert_refused("y", b"550 5.7.1 100%%% sure\0", "lone '%'")

    def test_reply_code_shapes(self) -> None:
        """REPLYCODE texts the MTAs refuse are refused."""
        for text in (b"250 ok", b"55 x", b"5x0 x", b"55\xc2\xb2 x", b"\xd9\xa5\xd9\xa5\xd9\xa5 x", b"550-x",
                     b"550 x\r\n551 y", b"550-x\r\n550-y", b"550 x\r\n550 y", b"550 5.7.1 x\r\n550 y",
                     b"550 4.7.1 x\r\n550-4.7.1 y", b"550 a\rb", b""):
            self.assert_refused("y", text + b"\0", "REPLYCODE")

    def test_reply_code_parsing(self) -> None:
        """REPLYCODE texts decode to Reject or TempFail with code, status and lines."""
        self.assertEqual(decode_response("y", b"421 4.7.0 closing\0"), TempFail("closing", 421, "4.7.0"))
        self.assertEqual(decode_response("y", b"550 \0"), Reject("", 550, ""))
        self.assertEqual(decode_response("y", b"550 5.7.1\0"), Reject("", 550, "5.7.1"))
        self.assertEqual(decode_response("y", b"554 4.7.1 odd\0"), Reject("4.7.1 odd", 554, ""))
        self.assertEqual(decode_response("y", b"550 5.1.1 50%% off\0"), Reject("50% off", 550, "5.1.1"))
        self.assertEqual(decode_response("y", b"550-a\r\n550 b\0"), Reject(("a", "b"), 550, ""))


class EncodeRefusalTests(SynchronousTestCase):
    """Messages the wire cannot carry raise LocalProtocolError when encoded."""

    def test_nul_in_text(self) -> None:
        """A NUL inside any string is refused."""
        for message in (Helo("a\0b"), Header("X", "a\0"), MailFrom("<a>", ("A\0B",)), AddHeader("X\0", "v"),
                        Macros("C", (("j", "\0"),)), Quarantine("a\0")):
            self.assertRaises(LocalProtocolError, encode, message)

    def test_lone_surrogate(self) -> None:
        """A string that is not UTF-8 plus surrogate-escaped bytes is refused, not a UnicodeError."""
        self.assertRaises(LocalProtocolError, encode, Helo("\ud800"))
        self.assertRaises(LocalProtocolError, encode, AddHeader("X", "\udc41"))

    def test_oversized_body_replacement(self) -> None:
        """A REPLBODY packet over 65535 bytes is refused; split_body cuts it up."""
        self.assertRaises(LocalProtocolError, encode, ReplaceBody(b"x" * 65536))
        self.assertEqual(len(encode(ReplaceBody(b"x" * 65535))), 65535 + 5)

    def test_empty_header_name(self) -> None:
        """Headers and header changes need a name."""
        for message in (Header("", "v"), AddHeader("", "v"), InsertHeader(0, "", "v"), ChangeHeader(1, "", "")):
            self.assertRaises(LocalProtocolError, encode, message)

    def test_header_index_range(self) -> None:
        """Header indexes must fit in 32 bits."""
        self.assertRaises(LocalProtocolError, encode, InsertHeader(-1, "X", "v"))
        self.assertRaises(LocalProtocolError, encode, ChangeHeader(2**32, "X", "v"))

    def test_esmtp_args(self) -> None:
        """ESMTP arguments of CHGFROM/ADDRCPT_PAR are non-empty and contain no space; MAIL's are non-empty."""
        for message in (ChangeFrom("<a>", ("",)), ChangeFrom("<a>", ("A B",)), AddRecipient("<a>", ("",)),
                        MailFrom("<a>", ("",)), RcptTo("<a>", ("",))):
            self.assertRaises(LocalProtocolError, encode, message)

    def test_body_and_quarantine(self) -> None:
        """A BODY packet and a quarantine reason cannot be empty; a replacement body can."""
        self.assertRaises(LocalProtocolError, encode, BodyChunk(b""))
        self.assertRaises(LocalProtocolError, encode, Quarantine(""))
        self.assertEqual(encode(ReplaceBody(b"")), b"\0\0\0\1b")

    def test_connect(self) -> None:
        """CONNECT refuses a bad port, a bad address and an address with family 'U'."""
        for command in (Connect("h", Family.INET, 70000, "192.0.2.1"), Connect("h", Family.INET, 25, "x"),
                        Connect("h", Family.INET6, 25, "192.0.2.1"), Connect("h", Family.UNKNOWN, 25),
                        Connect("h", Family.UNKNOWN, 0, "192.0.2.1")):
            self.assertRaises(LocalProtocolError, encode, command)

    def test_macro_letter(self) -> None:
        """A macro packet needs exactly one one-byte letter."""
        for letter in ("", "CH", "\u0100"):
            self.assertRaises(LocalProtocolError, encode, Macros(letter))

    def test_macro_list_names(self) -> None:
        """Macro names in an OPTNEG reply are non-empty and contain no space or comma."""
        for name in ("", "a b", "a,b"):
            reply = NegotiateReply(6, Action.SET_MACRO_LIST, ProtocolFlag.NONE, {MacroStage.HELO: (name,)})
            self.assertRaises(LocalProtocolError, encode, reply)

    def test_optneg_range(self) -> None:
        """OPTNEG numbers must fit in 32 bits."""
        self.assertRaises(LocalProtocolError, encode, Negotiate(2**32))
        self.assertRaises(LocalProtocolError, encode, NegotiateReply(-1))

    def test_not_a_message(self) -> None:
        """Encoding something that is no milter message is refused."""
        self.assertRaises(LocalProtocolError, encode, object())

    @given(s.commands() | s.responses())
    def test_encode_errors_are_milter_errors(self, message: Command | Response) -> None:
        """Encoding never raises anything but MilterError (here: nothing at all)."""
        try:
            encode(message)
        except MilterError as e:  # pragma: no cover
            self.fail(f"{message!r}: {e}")
