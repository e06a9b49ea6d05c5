"""Tests for txmilt.session: both sides of the golden session, order, macros, replies, EOF, fuzzing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests import strategies as s
from tests.test_codec import GOLDEN_MACRO_REPLY, GOLDEN_REPLY, GOLDEN_SESSION
from txmilt.codec import LIBMILTER_FRAME_LIMIT, encode, frame
from txmilt.errors import (
    FrameSizeError,
    LocalProtocolError,
    MilterError,
    NegotiationError,
    RemoteProtocolError,
)
from txmilt.messages import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
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
    ConnectionFail,
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
    Modification,
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
    Shutdown,
    Skip,
    TempFail,
    Unknown,
    required_action,
)
from txmilt.session import (
    EMPTY_MACROS,
    NEED_DATA,
    NO_FLAG,
    NO_REPLY_FLAG,
    Disconnected,
    MilterEvent,
    MilterSession,
    MTAEvent,
    MTASession,
    Requirements,
    Stage,
    negotiate,
)

SENDMAIL = Negotiate(6, ALL_ACTIONS, ALL_PROTOCOL)
CONNECT = Connect("mail.example.com", Family.INET, 54321, "192.0.2.10")
HELO = Helo("mail.example.com")
MAIL = MailFrom("<alice@example.com>", ("BODY=8BITMIME",))
RCPT = RcptTo("<bob@example.net>")
HEADER = Header("Subject", "Hello")
BODY = BodyChunk(b"Hi Bob\r\n")
#: One whole message as Sendmail sends it.
MESSAGE: tuple[Command, ...] = (MAIL, RCPT, Data(), HEADER, EndOfHeaders(), BODY, EndOfMessage())


def stream(*messages: Command | Response) -> bytes:
    """The wire bytes of ``messages``."""
    return b"".join(encode(m) for m in messages)


def milter(
    protocol: ProtocolFlag = ProtocolFlag.NONE,
    actions: Action = Action.NONE,
    offer: Negotiate = SENDMAIL,
    frame_limit: int | None = None,
) -> MilterSession:
    """A MilterSession that negotiated ``protocol`` and ``actions``."""
    session = MilterSession() if frame_limit is None else MilterSession(frame_limit)
    session.receive_data(encode(offer))
    assert session.next_event() == offer
    session.send(NegotiateReply(min(offer.version, 6), actions, protocol))
    return session


def feed(session: MilterSession, *commands: Command, reply: Response | None = None) -> list[MilterEvent]:
    """Feed ``commands``; the events, each owed reply answered with ``reply``."""
    if commands:
        session.receive_data(stream(*commands))
    return drain(session, reply)


def drain(session: MilterSession, reply: Response | None = None) -> list[MilterEvent]:
    """Every event available now, each owed reply answered with ``reply`` (Continue by default)."""
    events: list[MilterEvent] = []
    while (event := session.next_event()) is not NEED_DATA:
        events.append(event)
        if session.reply_due:
            session.send(reply or Continue())
    return events


def mta(
    protocol: ProtocolFlag = ProtocolFlag.NONE, actions: Action = Action.NONE, offer: Negotiate = SENDMAIL
) -> MTASession:
    """An MTASession that negotiated ``protocol`` and ``actions``."""
    session = MTASession()
    session.send(offer)
    session.receive_data(encode(NegotiateReply(min(offer.version, 6), actions, protocol)))
    assert isinstance(session.next_event(), NegotiateReply)
    return session


def responses_of(session: MTASession, *responses: Response) -> list[MTAEvent]:
    """Feed ``responses`` to an MTASession; the events."""
    session.receive_data(stream(*responses))
    events: list[MTAEvent] = []
    while (event := session.next_event()) is not NEED_DATA:
        events.append(event)
    return events


class GoldenSessionTests(SynchronousTestCase):
    """The golden session of PROTOCOL.md §8 through both sessions, byte for byte."""

    def test_milter_side(self) -> None:
        """MilterSession turns the MTA's packets into events and our replies into the golden bytes."""
        session = MilterSession()
        script = list(GOLDEN_SESSION)
        sent: list[bytes] = []
        position = 0
        while position < len(script):
            direction, message, data = script[position]
            position += 1
            self.assertEqual(direction, ">")
            session.receive_data(data)
            event = session.next_event()
            if isinstance(message, Macros):
                self.assertIs(event, NEED_DATA)
                continue
            self.assertEqual(event, message)
            if isinstance(event, Connect):
                self.assertEqual(dict(session.macros), {"j": "mx.example.net"})
                self.assertEqual(session.macros["{j}"], "mx.example.net")
            while position < len(script) and script[position][0] == "<":
                _, response, expected = script[position]
                position += 1
                self.assertTrue(session.reply_due)
                assert not isinstance(response, Command)
                if isinstance(response, NegotiateReply):
                    assert isinstance(event, Negotiate)
                    response = negotiate(event, Requirements(
                        actions=Action.ADD_HEADERS, optional=ProtocolFlag.NO_DATA | ProtocolFlag.NO_UNKNOWN,
                    ))
                data = session.send(response)
                self.assertEqual(data, expected)
                sent.append(data)
            self.assertFalse(session.reply_due)
        self.assertEqual(dict(session.macros), {})
        self.assertEqual(session.stage, Stage.CLOSED)
        self.assertIs(session.next_event(), NEED_DATA)
        self.assertEqual(b"".join(sent), b"".join(d for direction, _, d in GOLDEN_SESSION if direction == "<"))

    def test_milter_side_whole_stream(self) -> None:
        """The MTA's half of the golden session fed in one piece gives the same events."""
        session = MilterSession()
        session.receive_data(b"".join(d for direction, _, d in GOLDEN_SESSION if direction == ">"))
        out = []
        events = []
        while (event := session.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Negotiate):
                out.append(session.send(GOLDEN_REPLY))
            elif isinstance(event, EndOfMessage):
                out.append(session.send(AddHeader("X-Checked", "yes")))
                out.append(session.send(Continue()))
            elif session.reply_due:
                out.append(session.send(Continue()))
        self.assertEqual(events, [m for d, m, _ in GOLDEN_SESSION if d == ">" and not isinstance(m, Macros)])
        self.assertEqual(b"".join(out), b"".join(d for direction, _, d in GOLDEN_SESSION if direction == "<"))

    def test_mta_side(self) -> None:
        """MTASession sends the golden command bytes and decodes the milter's golden replies."""
        session = MTASession()
        for direction, message, data in GOLDEN_SESSION:
            if direction == ">":
                assert not isinstance(message, Response)
                self.assertEqual(session.send(message), data)
            else:
                self.assertTrue(session.reply_due)
                session.receive_data(data)
                self.assertEqual(session.next_event(), message)
        self.assertFalse(session.reply_due)
        self.assertFalse(session.wants(Data))
        self.assertFalse(session.wants(Unknown))
        self.assertTrue(session.wants(Header))
        self.assertEqual(session.stage, Stage.CLOSED)

    def test_mta_side_batched_replies(self) -> None:
        """Packets 19 and 20 arriving in one read give two events."""
        session = mta(ProtocolFlag.NO_DATA | ProtocolFlag.NO_UNKNOWN, Action.ADD_HEADERS)
        for command in (CONNECT, HELO, MAIL, RCPT, HEADER, EndOfHeaders(), BODY):
            session.send(command)
            self.assertEqual(responses_of(session, Continue()), [Continue()])
        session.send(EndOfMessage())
        batch = GOLDEN_SESSION[18][2] + GOLDEN_SESSION[19][2]
        session.receive_data(batch)
        self.assertEqual(session.next_event(), AddHeader("X-Checked", "yes"))
        self.assertTrue(session.reply_due)
        self.assertEqual(session.next_event(), Continue())
        self.assertFalse(session.reply_due)
        self.assertIs(session.next_event(), NEED_DATA)

    def test_macro_list_reply(self) -> None:
        """The §4.5 OPTNEG reply with macro lists goes out and comes back exactly."""
        reply, data = GOLDEN_MACRO_REPLY
        session = MilterSession()
        session.receive_data(encode(SENDMAIL))
        event = session.next_event()
        assert isinstance(event, Negotiate)
        needs = Requirements(Action.ADD_HEADERS, optional=ProtocolFlag(0x300), macros=dict(reply.macros))
        self.assertEqual(session.send(negotiate(event, needs)), data)
        client = MTASession()
        client.send(SENDMAIL)
        client.receive_data(data)
        self.assertEqual(client.next_event(), reply)
        self.assertEqual(client.negotiated, reply)


class ConversationTests(SynchronousTestCase):
    """Generated legal conversations run through both sessions, in arbitrary chunks."""

    def run_milter(self, conv: s.Conversation, chunks: Sequence[bytes]) -> tuple[list[MilterEvent], bytes]:
        """Drive a MilterSession with the MTA bytes in ``chunks``; the events and the bytes sent."""
        session = MilterSession()
        scripted: Iterator[tuple[Response, ...]] = iter(
            step.responses for step in conv.steps if step.responses is not None
        )
        events: list[MilterEvent] = []
        out: list[bytes] = []
        for chunk in [*chunks, b""]:
            session.receive_data(chunk)
            while (event := session.next_event()) is not NEED_DATA:
                events.append(event)
                if session.reply_due:
                    out.extend(session.send(response) for response in next(scripted))
        self.assertEqual(list(scripted), [])
        return events, b"".join(out)

    @given(s.conversations(), s.cuts)
    def test_milter_session(self, conv: s.Conversation, cuts: list[int]) -> None:
        """Events and reply bytes do not depend on how the MTA's bytes are chunked."""
        data = stream(*conv.commands())
        whole = self.run_milter(conv, [data])
        expected: list[MilterEvent] = [*conv.events]
        if not conv.events or not isinstance(conv.events[-1], Quit):
            expected.append(Disconnected(False))
        self.assertEqual(whole[0], expected)
        self.assertEqual(whole[1], stream(*conv.responses()))
        self.assertEqual(self.run_milter(conv, s.chunked(data, cuts)), whole)

    @given(s.conversations(), s.cuts)
    def test_mta_session(self, conv: s.Conversation, cuts: list[int]) -> None:
        """MTASession sends the conversation's bytes and decodes every response, however chunked."""
        session = MTASession()
        steps = iter(conv.steps)
        sent: list[bytes] = []
        received: list[MTAEvent] = []

        def send_until_reply_due() -> None:
            while not session.reply_due:
                step = next(steps, None)
                if step is None:
                    return
                sent.extend(session.send(command) for command in step.commands)
                self.assertEqual(session.reply_due, step.responses is not None, step)

        send_until_reply_due()
        for chunk in [*s.chunked(stream(*conv.responses()), cuts), b""]:
            session.receive_data(chunk)
            while (event := session.next_event()) is not NEED_DATA:
                received.append(event)
                send_until_reply_due()
        self.assertIsNone(next(steps, None))
        self.assertEqual(b"".join(sent), stream(*conv.commands()))
        expected: list[MTAEvent] = [*conv.responses()]
        if not isinstance(conv.commands()[-1], Quit):
            expected.append(Disconnected(False))
        self.assertEqual(received, expected)


class RandomInputTests(SynchronousTestCase):
    """Whatever the MTA sends, MilterSession raises nothing but RemoteProtocolError."""

    def drive(self, data: bytes, cuts: Sequence[int], needs: Requirements, limit: int) -> None:
        """Feed ``data`` in chunks, answering OPTNEG with ``needs`` and everything else with Continue."""
        session = MilterSession(limit)
        try:
            for chunk in [*s.chunked(data, cuts), b""]:
                session.receive_data(chunk)
                while (event := session.next_event()) is not NEED_DATA:
                    if not session.reply_due:
                        continue
                    if isinstance(event, Negotiate):
                        try:
                            reply = negotiate(event, needs)
                        except NegotiationError:
                            return
                        session.send(reply)
                    else:
                        session.send(Continue())
        except RemoteProtocolError as e:
            self.assertEqual(session.stage, Stage.CLOSED)
            self.assertIn("stage", str(e))
            self.assertIs(session.next_event(), NEED_DATA)

    needs = st.builds(
        Requirements,
        st.integers(0, 0x1FF).map(Action),
        st.sampled_from([0, 0x800, 0x100000]).map(ProtocolFlag),
        st.integers(0, 0x1FFFFF).map(ProtocolFlag),
    )

    @given(st.binary(max_size=300), s.cuts, needs, st.integers(1, 2000))
    def test_random_bytes(self, data: bytes, cuts: list[int], needs: Requirements, limit: int) -> None:
        """Random bytes raise only RemoteProtocolError."""
        self.drive(data, cuts, needs, limit)

    @given(
        st.lists(
            st.one_of(
                s.commands().map(encode),
                st.tuples(st.sampled_from("ODCHMRTLNBEUAQKZ\0"), st.binary(max_size=20)).map(
                    lambda t: frame(t[0], t[1])
                ),
            ),
            max_size=25,
        ).map(b"".join),
        s.cuts,
        needs,
        st.booleans(),
    )
    def test_random_frames(self, data: bytes, cuts: list[int], needs: Requirements, negotiated: bool) -> None:
        """Well-framed commands in random order, after a valid OPTNEG or not, raise only RemoteProtocolError."""
        if negotiated:
            data = encode(SENDMAIL) + data
        self.drive(data, cuts, needs, 1000)

    @given(s.conversations(max_messages=1), s.cuts, st.data())
    def test_mutated_conversations(self, conv: s.Conversation, cuts: list[int], data: st.DataObject) -> None:
        """Legal conversations with bytes changed, removed or duplicated raise only RemoteProtocolError."""
        raw = bytearray(stream(*conv.commands()))
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(raw) - 1))
            operation = data.draw(st.integers(0, 2))
            if operation == 0:
                raw[position] = data.draw(st.integers(0, 255))
            elif operation == 1:
                del raw[position:position + data.draw(st.integers(1, 8))]
            else:
                raw[position:position] = raw[position:position + data.draw(st.integers(1, 30))]
            if not raw:
                break
        needs = Requirements(conv.reply.actions & ~Action.SET_MACRO_LIST, optional=conv.reply.protocol)
        self.drive(bytes(raw), cuts, needs, 1000)

    @given(st.binary(max_size=200), s.cuts)
    def test_random_responses(self, data: bytes, cuts: list[int]) -> None:
        """Random bytes from a milter raise only RemoteProtocolError in MTASession."""
        session = MTASession(500)
        session.send(SENDMAIL)
        try:
            for chunk in [*s.chunked(data, cuts), b""]:
                session.receive_data(chunk)
                while session.next_event() is not NEED_DATA:
                    pass
        except RemoteProtocolError:
            self.assertIs(session.next_event(), NEED_DATA)


class OrderTests(SynchronousTestCase):
    """Commands out of order are RemoteProtocolErrors naming the command and the stage (§5)."""

    def assert_refused(self, session: MilterSession, command: Command | bytes, *words: str) -> None:
        """Feeding ``command`` raises RemoteProtocolError containing ``words`` and closes the session."""
        session.receive_data(command if isinstance(command, bytes) else encode(command))
        error = self.assertRaises(RemoteProtocolError, drain, session)
        for word in words:
            self.assertIn(word, str(error))
        self.assertEqual(session.stage, Stage.CLOSED)
        self.assertIs(session.next_event(), NEED_DATA)

    def test_rcpt_before_mail(self) -> None:
        """RCPT after HELO is refused."""
        session = milter()
        feed(session, CONNECT, HELO)
        self.assert_refused(session, RCPT, "RCPT ('R')", "stage HELO")

    def test_connect_twice(self) -> None:
        """A second CONNECT is refused."""
        session = milter()
        feed(session, CONNECT)
        self.assert_refused(session, CONNECT, "CONNECT ('C')", "stage CONNECT")

    def test_body_outside_message(self) -> None:
        """BODY before MAIL, or right after MAIL, is refused."""
        session = milter()
        feed(session, CONNECT, HELO)
        self.assert_refused(session, BODY, "BODY ('B')", "stage HELO")
        session = milter()
        feed(session, CONNECT, HELO, MAIL)
        self.assert_refused(session, BODY, "BODY ('B')", "stage MAIL")

    def test_body_before_eoh(self) -> None:
        """BODY right after DATA or a HEADER is refused: EOH comes first."""
        session = milter()
        feed(session, CONNECT, HELO, MAIL, RCPT, Data())
        self.assert_refused(session, BODY, "BODY ('B')", "stage DATA")
        session = milter()
        feed(session, CONNECT, HELO, MAIL, RCPT, Data(), HEADER)
        self.assert_refused(session, BODY, "BODY ('B')", "stage HEADER")

    def test_content_before_data(self) -> None:
        """DATA, HEADER and EOH need a transaction with a recipient."""
        for command in (Data(), HEADER, EndOfHeaders(), EndOfMessage()):
            session = milter()
            feed(session, CONNECT, HELO, MAIL)
            self.assert_refused(session, command, "stage MAIL")

    def test_header_after_eoh(self) -> None:
        """A HEADER after EOH is refused."""
        session = milter()
        feed(session, CONNECT, HELO, MAIL, RCPT, Data(), EndOfHeaders())
        self.assert_refused(session, HEADER, "HEADER ('L')", "stage EOH")

    def test_data_twice(self) -> None:
        """A second DATA is refused."""
        session = milter()
        feed(session, CONNECT, HELO, MAIL, RCPT, Data())
        self.assert_refused(session, Data(), "DATA ('T')", "stage DATA")

    def test_before_connect(self) -> None:
        """HELO or MAIL before CONNECT is taken as libmilter takes it: as if after HELO; RCPT is refused."""
        self.assertEqual(feed(milter(), HELO), [HELO])
        session = milter()
        self.assertEqual(feed(session, MAIL), [MAIL])
        self.assertTrue(session.in_transaction)
        self.assert_refused(milter(), RCPT, "RCPT ('R')", "after OPTNEG")

    def test_second_optneg(self) -> None:
        """A second OPTNEG is refused, also after QUIT_NC."""
        session = milter()
        self.assert_refused(session, SENDMAIL, "OPTNEG ('O')", "second")
        session = milter()
        feed(session, CONNECT, QuitNoClose())
        self.assert_refused(session, SENDMAIL, "OPTNEG ('O')", "after OPTNEG")

    def test_command_before_optneg(self) -> None:
        """Anything but OPTNEG first is refused."""
        for command in (CONNECT, Macros("C"), Abort(), Quit(), Unknown("XFOO")):
            self.assert_refused(MilterSession(), command, "before OPTNEG")

    def test_unknown_inside_content(self) -> None:
        """UNKNOWN between DATA and end of message abandons the message first, as libmilter does."""
        session = milter()
        self.assertEqual(feed(session, CONNECT, Unknown("X"), HELO, Unknown("Y"), MAIL, Unknown("Z"), RCPT),
                         [CONNECT, Unknown("X"), HELO, Unknown("Y"), MAIL, Unknown("Z"), RCPT])
        self.assertEqual(session.stage, Stage.RCPT)
        feed(session, Data())
        self.assertEqual(feed(session, Unknown("XFOO")), [Abort(), Unknown("XFOO")])
        self.assertFalse(session.in_transaction)

    def test_after_unknown(self) -> None:
        """After UNKNOWN libmilter takes RCPT, DATA and BODY wherever UNKNOWN came from."""
        session = milter()
        self.assertEqual(feed(session, CONNECT, MAIL, Unknown("X"), Data()), [CONNECT, MAIL, Unknown("X"), Data()])
        self.assertTrue(session.in_transaction)
        session = milter(ProtocolFlag.NO_HEADERS | ProtocolFlag.NO_EOH)
        events = feed(session, CONNECT, MAIL, RCPT, Unknown("X"), BODY)
        self.assertEqual(events, [CONNECT, MAIL, RCPT, Unknown("X"), BODY])

    def test_unknown_letter(self) -> None:
        """An unknown command letter names the letter and the stage."""
        session = milter()
        feed(session, CONNECT)
        self.assert_refused(session, frame("Z"), "'Z'", "stage CONNECT")

    def test_bad_payloads_name_stage(self) -> None:
        """Malformed payloads name the command and the stage."""
        cases: list[tuple[tuple[Command, ...], bytes, tuple[str, ...]]] = [
            ((), frame("C", b"host\0"), ("CONNECT", "after OPTNEG")),
            ((CONNECT,), frame("H", b""), ("HELO", "stage CONNECT")),
            ((CONNECT,), frame("H", b"no-nul"), ("HELO", "NUL", "stage CONNECT")),
            ((CONNECT, HELO), frame("M", b""), ("MAIL", "stage HELO")),
            ((CONNECT, HELO, MAIL), frame("R", b"<a>"), ("RCPT", "NUL", "stage MAIL")),
            ((CONNECT, HELO, MAIL, RCPT), frame("T", b"x"), ("DATA", "stage RCPT")),
            ((CONNECT, HELO, MAIL, RCPT, Data()), frame("L", b"\0v\0"), ("HEADER", "empty name", "stage DATA")),
            ((CONNECT, HELO, MAIL, RCPT, Data()), frame("L", b"Subject\0"), ("HEADER", "stage DATA")),
            ((CONNECT, HELO, MAIL, RCPT, Data(), EndOfHeaders()), frame("B"), ("BODY", "stage EOH")),
            ((CONNECT, HELO, MAIL, RCPT, Data(), EndOfHeaders()), frame("D"), ("MACRO", "stage EOH")),
            ((CONNECT, HELO), frame("U", b""), ("UNKNOWN", "stage HELO")),
            ((CONNECT, HELO), frame("A", b"x"), ("ABORT", "stage HELO")),
            ((CONNECT, HELO), frame("O", b"\0" * 11), ("OPTNEG", "stage HELO")),
        ]
        for before, bad, words in cases:
            session = milter()
            feed(session, *before)
            self.assert_refused(session, bad, *words)

    def test_eoh_as_length_zero(self) -> None:
        """``00 00 00 00 4e`` is taken as EOH, as libmilter does."""
        session = milter()
        feed(session, CONNECT, HELO, MAIL, RCPT, Data())
        session.receive_data(bytes.fromhex("00 00 00 00 4e"))
        self.assertEqual(drain(session), [EndOfHeaders()])

    def test_frame_limit(self) -> None:
        """With limit 65535 a 65535-byte BODY passes and a 65536-byte one raises FrameSizeError."""
        session = milter(frame_limit=LIBMILTER_FRAME_LIMIT)
        feed(session, CONNECT, HELO, MAIL, RCPT, Data(), EndOfHeaders())
        self.assertEqual(feed(session, BodyChunk(b"x" * 65535)), [BodyChunk(b"x" * 65535)])
        session.receive_data(bytes.fromhex("00 01 00 01 42"))
        error = self.assertRaises(FrameSizeError, session.next_event)
        self.assertEqual((error.size, error.limit), (65536, 65535))
        self.assertIn("'B'", str(error))
        self.assertIn("stage BODY", str(error))
        self.assertEqual(session.stage, Stage.CLOSED)

    def test_absurd_length(self) -> None:
        """A length of 0xFFFFFFFF raises FrameSizeError at once."""
        session = milter()
        feed(session, CONNECT)
        session.receive_data(bytes.fromhex("ff ff ff ff 48"))
        error = self.assertRaises(FrameSizeError, session.next_event)
        self.assertIn("'H'", str(error))
        self.assertIn("stage CONNECT", str(error))

    def test_default_frame_limit(self) -> None:
        """By default a 1 MiB payload passes (Postfix sends big headers in one packet)."""
        session = milter()
        feed(session, CONNECT, HELO, MAIL, RCPT, Data())
        big = Header("X-Big", "x" * (1024 * 1024 - 7))
        self.assertEqual(len(encode(big)), 1024 * 1024 + 5)
        self.assertEqual(feed(session, big), [big])


class MacroTests(SynchronousTestCase):
    """Macro storage per stage with libmilter's rules (§2.3)."""

    def test_empty(self) -> None:
        """No macros before any macro packet."""
        session = milter()
        self.assertIs(session.macros, EMPTY_MACROS)
        self.assertEqual(dict(session.macros), {})

    def test_stages_accumulate(self) -> None:
        """Macros of earlier stages stay visible in later ones."""
        session = milter()
        feed(session, Macros("C", (("j", "mx"), ("{daemon_name}", "smtpd"))), CONNECT)
        feed(session, Macros("H", (("{tls_version}", "TLSv1.3"),)), HELO)
        feed(session, Macros("M", (("{mail_addr}", "alice@example.com"),)), MAIL)
        feed(session, Macros("R", (("{rcpt_addr}", "bob@example.net"),)), RCPT)
        feed(session, Macros("T", (("i", "QID1"),)), Data())
        feed(session, Macros("N", (("{n}", "1"),)), EndOfHeaders())
        feed(session, Macros("E", (("{msg_id}", "<x@y>"),)), EndOfMessage())
        self.assertEqual(dict(session.macros), {
            "j": "mx", "daemon_name": "smtpd", "tls_version": "TLSv1.3", "mail_addr": "alice@example.com",
            "rcpt_addr": "bob@example.net", "i": "QID1", "n": "1", "msg_id": "<x@y>",
        })

    def test_braces_optional(self) -> None:
        """``x`` and ``{x}`` name the same macro, whichever way it was sent."""
        session = milter()
        feed(session, Macros("C", (("j", "mx"), ("{daemon_name}", "smtpd"))), CONNECT)
        macros = session.macros
        self.assertEqual((macros["j"], macros["{j}"]), ("mx", "mx"))
        self.assertEqual((macros["daemon_name"], macros["{daemon_name}"]), ("smtpd", "smtpd"))
        self.assertEqual(set(macros), {"j", "daemon_name"})
        self.assertEqual(len(macros), 2)
        self.assertNotIn("{client_addr}", macros)
        self.assertRaises(KeyError, lambda: macros["{x}"])

    def test_duplicate_name_first_wins(self) -> None:
        """A name sent twice in one packet keeps its first value, as libmilter finds it."""
        session = milter()
        feed(session, Macros("C", (("j", "first"), ("{j}", "second"))), CONNECT)
        self.assertEqual(session.macros["j"], "first")

    def test_latest_stage_first(self) -> None:
        """Lookup searches EOM, EOH, DATA, RCPT, MAIL, HELO, CONNECT in that order."""
        session = milter()
        feed(session, Macros("C", (("i", "c"),)), CONNECT)
        self.assertEqual(session.macros["i"], "c")
        for letter, command in (("H", HELO), ("M", MAIL), ("R", RCPT), ("T", Data()), ("N", EndOfHeaders()),
                                ("E", EndOfMessage())):
            feed(session, Macros(letter, (("{i}", letter),)), command)
            self.assertEqual(session.macros["i"], letter)
            self.assertEqual(list(session.macros), ["i"])

    def test_new_packet_replaces_set(self) -> None:
        """A second packet for the same letter replaces that letter's whole set."""
        session = milter()
        feed(session, Macros("C", (("j", "mx"),)), CONNECT, HELO, Macros("M", (("a", "1"), ("b", "2"))), MAIL)
        feed(session, RCPT, Macros("M", (("b", "3"),)), MAIL)
        self.assertEqual(dict(session.macros), {"j": "mx", "b": "3"})

    def test_mail_clears_later_stages(self) -> None:
        """MAIL discards the RCPT, DATA, EOH and EOM sets of the previous message."""
        session = milter()
        feed(session, Macros("C", (("j", "mx"),)), CONNECT, Macros("H", (("h", "1"),)), HELO)
        feed(session, Macros("M", (("m", "1"),)), MAIL, Macros("R", (("r", "1"),)), RCPT,
             Macros("T", (("t", "1"),)), Data(), Macros("N", (("n", "1"),)), EndOfHeaders(),
             Macros("E", (("e", "1"),)), EndOfMessage())
        self.assertEqual(set(session.macros), {"j", "h", "m", "r", "t", "n", "e"})
        feed(session, Abort(), Abort())
        self.assertEqual(set(session.macros), {"j", "h", "m", "r", "t", "n", "e"})
        feed(session, MailFrom("<>"))
        self.assertEqual(dict(session.macros), {"j": "mx", "h": "1", "m": "1"})
        feed(session, Macros("M"), MailFrom("<>"))
        self.assertEqual(dict(session.macros), {"j": "mx", "h": "1"})

    def test_rcpt_clears_later_stages(self) -> None:
        """RCPT discards the DATA, EOH and EOM sets and keeps the others."""
        session = milter(ProtocolFlag.NONE)
        feed(session, CONNECT, Macros("M", (("m", "1"),)), MAIL, Macros("R", (("r", "1"),)), RCPT,
             Macros("T", (("t", "1"),)), Data(), Macros("E", (("e", "1"),)))
        self.assertEqual(set(session.macros), {"m", "r", "t", "e"})
        feed(session, MAIL, Macros("R", (("r", "2"),)), RCPT)
        self.assertEqual(dict(session.macros), {"m": "1", "r": "2"})
        feed(session, Macros("E", (("e", "1"),)), Macros("T", (("t", "1"),)), RcptTo("<c@d>"))
        self.assertEqual(dict(session.macros), {"m": "1", "r": "2"})

    def test_connect_and_helo_clear(self) -> None:
        """CONNECT clears every later set; HELO clears MAIL and later."""
        session = milter()
        feed(session, Macros("C", (("j", "1"),)), CONNECT, Macros("H", (("h", "1"),)), HELO,
             Macros("M", (("m", "1"),)), MAIL, RCPT, Macros("C", (("j", "2"),)), HELO)
        self.assertEqual(dict(session.macros), {"j": "2", "h": "1"})
        feed(session, Macros("H", (("h", "2"),)), Macros("M", (("m", "2"),)), QuitNoClose())
        self.assertEqual(dict(session.macros), {})
        feed(session, Macros("H", (("h", "3"),)), Macros("C", (("j", "3"),)), CONNECT)
        self.assertEqual(dict(session.macros), {"j": "3"})

    def test_snapshot(self) -> None:
        """A macros snapshot does not change when later packets arrive."""
        session = milter()
        feed(session, Macros("C", (("j", "mx"),)), CONNECT)
        snapshot = session.macros
        feed(session, Macros("C", (("j", "other"),)), Macros("H", (("h", "1"),)), HELO, MAIL, QuitNoClose())
        self.assertEqual(dict(snapshot), {"j": "mx"})
        self.assertEqual(dict(session.macros), {})

    def test_snapshot_with_events(self) -> None:
        """The macros read right after an event are the ones sent with its command."""
        session = milter()
        session.receive_data(stream(Macros("C", (("j", "mx"),)), CONNECT, Macros("H", (("h", "x"),)), HELO))
        self.assertEqual(session.next_event(), CONNECT)
        self.assertEqual(dict(session.macros), {"j": "mx"})
        session.send(Continue())
        self.assertEqual(session.next_event(), HELO)
        self.assertEqual(dict(session.macros), {"j": "mx", "h": "x"})

    def test_other_letters_ignored(self) -> None:
        """Macro packets for L, B, U or unknown letters are accepted and ignored, with no event."""
        session = milter()
        feed(session, Macros("C", (("j", "mx"),)), CONNECT, HELO, MAIL, RCPT, Data())
        events = feed(session, Macros("L", (("i", "Q"),)), HEADER, Macros("L", (("i", "Q"),)), HEADER,
                      Macros("Z", (("z", "1"),)), Macros("U"), Macros("\xff"), Macros("B", (("{x}", "1"),)))
        self.assertEqual(events, [HEADER, HEADER])
        self.assertEqual(dict(session.macros), {"j": "mx"})

    def test_empty_packet_clears_set(self) -> None:
        """A macro packet with a letter and no pairs is accepted and empties that letter's set."""
        session = milter()
        self.assertEqual(feed(session, Macros("C", (("j", "mx"),)), Macros("C"), CONNECT), [CONNECT])
        self.assertEqual(dict(session.macros), {})

    def test_macros_for_switched_off_command(self) -> None:
        """Macros sent for a switched-off command (D T with NO_DATA) are kept."""
        session = milter(ProtocolFlag.NO_DATA)
        feed(session, CONNECT, HELO, MAIL, RCPT, Macros("T", (("i", "QID"),)))
        self.assertEqual(feed(session, HEADER), [HEADER])
        self.assertEqual(session.macros["i"], "QID")

    def test_before_optneg(self) -> None:
        """A macro packet before OPTNEG is refused."""
        session = MilterSession()
        self.assertRaises(RemoteProtocolError, feed, session, Macros("C", (("j", "x"),)))


class ReplyDueTests(SynchronousTestCase):
    """Which commands need a reply, given the NR flags."""

    ORDERED: tuple[Command, ...] = (CONNECT, HELO, MAIL, RCPT, Data(), HEADER, EndOfHeaders(), BODY, EndOfMessage())

    def due(self, session: MilterSession, command: Command) -> bool:
        """Whether the event for ``command`` needs a reply."""
        session.receive_data(encode(command))
        self.assertEqual(session.next_event(), command)
        due = session.reply_due
        if due:
            session.send(Continue())
        return due

    def test_without_nr_flags(self) -> None:
        """Every command but MACRO, ABORT, QUIT and QUIT_NC needs a reply."""
        session = milter()
        for command in (*self.ORDERED, Unknown("X")):
            self.assertTrue(self.due(session, command), command)
        session.receive_data(stream(Macros("M"), MAIL, Abort(), QuitNoClose()))
        self.assertEqual(session.next_event(), MAIL)
        session.send(Continue())
        self.assertEqual(session.next_event(), Abort())
        self.assertFalse(session.reply_due)
        self.assertEqual(session.next_event(), QuitNoClose())
        self.assertFalse(session.reply_due)
        session.receive_data(encode(Quit()))
        self.assertEqual(session.next_event(), Quit())
        self.assertFalse(session.reply_due)

    def test_each_nr_flag(self) -> None:
        """Each NR flag silences exactly its command; end of message always needs a reply."""
        for silenced, flag in NO_REPLY_FLAG.items():
            session = milter(flag)
            for command in (*self.ORDERED, Unknown("X")):
                self.assertEqual(self.due(session, command), not isinstance(command, silenced), (flag, command))

    def test_all_nr_flags(self) -> None:
        """With every NR flag only OPTNEG and end of message need replies, and replies are refused."""
        session = milter(ProtocolFlag(sum(NO_REPLY_FLAG.values())))
        for command in self.ORDERED[:-1]:
            self.assertFalse(self.due(session, command))
            self.assertRaises(LocalProtocolError, session.send, Continue())
            self.assertRaises(LocalProtocolError, session.send, Reject())
        self.assertTrue(self.due(session, EndOfMessage()))

    def test_pipelined(self) -> None:
        """With NR flags the MTA pipelines; every command comes out as an event in order."""
        session = milter(ProtocolFlag.NR_HEADER | ProtocolFlag.NR_BODY)
        feed(session, CONNECT, HELO, MAIL, RCPT, Data())
        events = feed(session, HEADER, HEADER, EndOfHeaders())
        self.assertEqual(events, [HEADER, HEADER, EndOfHeaders()])

    def test_next_event_while_owed(self) -> None:
        """Asking for the next event before replying is a LocalProtocolError."""
        session = milter()
        session.receive_data(stream(CONNECT, HELO))
        self.assertEqual(session.next_event(), CONNECT)
        self.assertEqual(session.awaiting, CONNECT)
        self.assertRaises(LocalProtocolError, session.next_event)


class MessageFlowTests(SynchronousTestCase):
    """Several messages per connection, aborts, quits and refusals."""

    def test_sendmail_style(self) -> None:
        """Sendmail goes from end of message straight to the next MAIL."""
        session = milter()
        events = feed(session, CONNECT, HELO, *MESSAGE, *MESSAGE, HELO, *MESSAGE, Quit())
        self.assertEqual(events, [CONNECT, HELO, *MESSAGE, *MESSAGE, HELO, *MESSAGE, Quit()])

    def test_postfix_style(self) -> None:
        """Postfix's D L before each header, D B before each chunk and ABORTs after messages give no events."""
        session = milter()
        postfix_message = (
            Macros("M", (("{mail_addr}", "alice@example.com"),)), MAIL,
            Macros("R", (("i", "QID"), ("{rcpt_addr}", "bob@example.net"))), RCPT,
            Macros("T", (("i", "QID"),)), Data(),
            Macros("L", (("i", "QID"),)), HEADER, Macros("L", (("i", "QID"),)), Header("To", "bob"),
            Macros("N", (("i", "QID"),)), EndOfHeaders(),
            Macros("B", (("i", "QID"),)), BODY, Macros("B", (("i", "QID"),)), BodyChunk(b"bye\r\n"),
            Macros("E", (("i", "QID"),)), EndOfMessage(), Abort(),
        )
        events = feed(session, Macros("C", (("j", "mx"),)), CONNECT, HELO, *postfix_message,
                      *postfix_message, Abort(), Macros("U"), Unknown("XFOO"), *postfix_message)
        message_events = [MAIL, RCPT, Data(), HEADER, Header("To", "bob"), EndOfHeaders(), BODY,
                          BodyChunk(b"bye\r\n"), EndOfMessage()]
        self.assertEqual(events, [CONNECT, HELO, *message_events, *message_events, Unknown("XFOO"),
                                  *message_events])
        self.assertFalse(session.in_transaction)

    def test_abort_idempotent(self) -> None:
        """ABORT yields one Abort event inside a transaction and nothing outside."""
        session = milter()
        self.assertEqual(feed(session, Abort(), CONNECT, Abort(), HELO, Abort()), [CONNECT, HELO])
        self.assertEqual(feed(session, MAIL, RCPT, Abort(), Abort(), Abort()), [MAIL, RCPT, Abort()])
        self.assertFalse(session.in_transaction)
        self.assertEqual(feed(session, MAIL, Abort(), MAIL), [MAIL, Abort(), MAIL])
        self.assertEqual(feed(session, *MESSAGE[1:], Abort(), Abort()), list(MESSAGE[1:]))

    def test_abort_at_each_stage(self) -> None:
        """ABORT after any command of a message but the last yields Abort and allows a new MAIL."""
        for cut in range(1, len(MESSAGE)):
            session = milter()
            feed(session, CONNECT, HELO)
            events = feed(session, *MESSAGE[:cut], Abort(), *MESSAGE)
            self.assertEqual(events, [*MESSAGE[:cut], Abort(), *MESSAGE])

    def test_implicit_abort(self) -> None:
        """MAIL or HELO in the middle of a message yields Abort first."""
        for cut in range(1, len(MESSAGE)):
            for restart in (MAIL, HELO):
                session = milter()
                feed(session, CONNECT, HELO)
                events = feed(session, *MESSAGE[:cut], restart)
                self.assertEqual(events, [*MESSAGE[:cut], Abort(), restart], (cut, restart))

    def test_quit_in_transaction(self) -> None:
        """QUIT with a message open yields Abort then Quit; after that nothing more."""
        session = milter()
        self.assertEqual(feed(session, CONNECT, HELO, MAIL, RCPT, Quit()), [CONNECT, HELO, MAIL, RCPT, Abort(), Quit()])
        self.assertEqual(session.stage, Stage.CLOSED)
        self.assertEqual(feed(session, MAIL), [])
        session.receive_data(b"")
        self.assertIs(session.next_event(), NEED_DATA)

    def test_quit_anywhere(self) -> None:
        """QUIT ends the session at any stage after OPTNEG."""
        for cut in range(len(MESSAGE) + 1):
            session = milter()
            events = feed(session, CONNECT, HELO, *MESSAGE[:cut], Quit())
            expected = [Abort()] if 0 < cut < len(MESSAGE) else []
            self.assertEqual(events, [CONNECT, HELO, *MESSAGE[:cut], *expected, Quit()])

    def test_quit_nc(self) -> None:
        """QUIT_NC ends the SMTP session; a new CONNECT follows with the same negotiation."""
        session = milter(ProtocolFlag.NR_HELO)
        events = feed(session, CONNECT, HELO, MAIL, RCPT, QuitNoClose(), CONNECT, HELO, *MESSAGE, QuitNoClose())
        self.assertEqual(events, [CONNECT, HELO, MAIL, RCPT, Abort(), QuitNoClose(), CONNECT, HELO, *MESSAGE,
                                  QuitNoClose()])
        self.assertEqual(session.stage, Stage.OPTIONS)
        self.assertEqual(session.protocol, ProtocolFlag.NR_HELO)
        self.assertEqual(feed(session, Connect("h", Family.UNKNOWN), Quit()), [Connect("h", Family.UNKNOWN), Quit()])

    def test_empty_header_value(self) -> None:
        """A header with an empty value is an ordinary event."""
        session = milter()
        feed(session, CONNECT, MAIL, RCPT, Data())
        session.receive_data(frame("L", b"X-Empty\0\0"))
        self.assertEqual(drain(session), [Header("X-Empty", "")])

    def test_helo_repeats(self) -> None:
        """HELO may repeat (EHLO after STARTTLS)."""
        session = milter()
        self.assertEqual(feed(session, CONNECT, HELO, HELO, HELO), [CONNECT, HELO, HELO, HELO])

    def test_mail_without_helo(self) -> None:
        """MAIL may follow CONNECT directly."""
        session = milter()
        self.assertEqual(feed(session, CONNECT, *MESSAGE), [CONNECT, *MESSAGE])

    def test_eob_with_data(self) -> None:
        """End of message with data and without body chunks after RCPT is accepted."""
        session = milter()
        commands = (CONNECT, MAIL, RCPT, EndOfMessage(b"x"))
        self.assertEqual(feed(session, *commands), list(commands))

    def test_old_mta_without_data(self) -> None:
        """Headers, EOH, body or end of message may follow RCPT directly (old MTAs send no DATA)."""
        for first in (HEADER, EndOfHeaders(), BODY, EndOfMessage()):
            session = milter()
            self.assertEqual(feed(session, CONNECT, MAIL, RCPT, first), [CONNECT, MAIL, RCPT, first])


class NoFlagTests(SynchronousTestCase):
    """Commands switched off with NO flags may be skipped by the MTA."""

    def test_no_helo_data_eoh(self) -> None:
        """With NO_HELO|NO_DATA|NO_EOH the MTA goes CONNECT, MAIL, RCPT, HEADER, BODY, EOM."""
        session = milter(ProtocolFlag.NO_HELO | ProtocolFlag.NO_DATA | ProtocolFlag.NO_EOH)
        commands = (CONNECT, MAIL, RCPT, HEADER, BODY, BODY, EndOfMessage(), MAIL, RCPT, BODY, EndOfMessage())
        self.assertEqual(feed(session, *commands), list(commands))

    def test_no_connect(self) -> None:
        """With NO_CONNECT the first command may be HELO or MAIL."""
        for first in (HELO, MAIL):
            session = milter(ProtocolFlag.NO_CONNECT)
            self.assertEqual(feed(session, first), [first])

    def test_no_rcpt(self) -> None:
        """With NO_RCPT, DATA may follow MAIL."""
        session = milter(ProtocolFlag.NO_RCPT)
        self.assertEqual(feed(session, CONNECT, MAIL, Data(), EndOfHeaders()), [CONNECT, MAIL, Data(), EndOfHeaders()])

    def test_no_eoh(self) -> None:
        """With NO_EOH, BODY may follow DATA or a HEADER; without it, it may not."""
        session = milter(ProtocolFlag.NO_EOH)
        self.assertEqual(feed(session, CONNECT, MAIL, RCPT, Data(), BODY), [CONNECT, MAIL, RCPT, Data(), BODY])
        session = milter(ProtocolFlag.NO_EOH | ProtocolFlag.NO_HEADERS)
        self.assertEqual(feed(session, CONNECT, MAIL, RCPT, Data(), EndOfMessage()),
                         [CONNECT, MAIL, RCPT, Data(), EndOfMessage()])

    def test_skipping_is_not_reordering(self) -> None:
        """Switching HELO off does not let RCPT come before MAIL."""
        session = milter(ProtocolFlag.NO_HELO)
        feed(session, CONNECT)
        session.receive_data(encode(RCPT))
        self.assertRaises(RemoteProtocolError, session.next_event)


class RefusalFlowTests(SynchronousTestCase):
    """How verdicts move the stage (§5.2, §5.3)."""

    def test_rcpt_refusal_keeps_transaction(self) -> None:
        """Reject, TempFail or Discard at RCPT keep the message open; more RCPTs may follow."""
        for verdict in (Reject(), TempFail(), Discard(), Reject("no such user", 550, "5.1.1")):
            session = milter()
            feed(session, CONNECT, HELO, MAIL)
            self.assertEqual(feed(session, RCPT, reply=verdict), [RCPT])
            self.assertTrue(session.in_transaction)
            self.assertEqual(feed(session, RcptTo("<c@d>"), Data()), [RcptTo("<c@d>"), Data()])

    def test_mail_refusal_ends_transaction(self) -> None:
        """Reject, TempFail, Discard or Accept at MAIL end the message: a later ABORT gives nothing."""
        for verdict in (Reject(), TempFail(), Discard(), Accept(), TempFail("busy")):
            session = milter()
            feed(session, CONNECT, HELO)
            feed(session, MAIL, reply=verdict)
            self.assertFalse(session.in_transaction)
            self.assertEqual(feed(session, Abort(), MAIL), [MAIL])
            session = milter()
            feed(session, CONNECT, HELO)
            feed(session, MAIL, reply=verdict)
            session.receive_data(encode(RCPT))
            self.assertRaises(RemoteProtocolError, session.next_event)

    def test_accept_at_rcpt_ends_message(self) -> None:
        """Accept at RCPT accepts the whole message."""
        session = milter()
        feed(session, CONNECT, HELO, MAIL)
        feed(session, RCPT, reply=Accept())
        self.assertFalse(session.in_transaction)

    def test_content_refusal_ends_message(self) -> None:
        """A non-continue verdict at DATA, HEADER, EOH or BODY ends the message."""
        for cut in range(3, len(MESSAGE)):
            session = milter()
            feed(session, CONNECT, *MESSAGE[:cut - 1])
            feed(session, MESSAGE[cut - 1], reply=Reject())
            self.assertFalse(session.in_transaction, cut)
            self.assertEqual(feed(session, Abort(), *MESSAGE), list(MESSAGE))

    def test_skip(self) -> None:
        """Skip at BODY keeps the message; end of message follows."""
        session = milter(ProtocolFlag.SKIP)
        feed(session, CONNECT, *MESSAGE[:5])
        feed(session, BODY, reply=Skip())
        self.assertEqual(session.stage, Stage.BODY)
        self.assertEqual(feed(session, EndOfMessage()), [EndOfMessage()])

    def test_unknown_refusal_keeps_message(self) -> None:
        """A refusal (or discard) of UNKNOWN leaves the message open; Accept ends it (libmilter: state HELO)."""
        for verdict in (Reject(), TempFail(), Discard()):
            session = milter()
            feed(session, CONNECT, MAIL)
            feed(session, Unknown("X"), reply=verdict)
            self.assertTrue(session.in_transaction, verdict)
            self.assertEqual(feed(session, RCPT), [RCPT], verdict)
        session = milter()
        feed(session, CONNECT, MAIL)
        feed(session, Unknown("X"), reply=Accept())
        self.assertFalse(session.in_transaction)
        self.assertEqual(session.stage, Stage.HELO)

    def test_connect_refusal(self) -> None:
        """A refusal at CONNECT leaves the session open for QUIT."""
        session = milter()
        feed(session, CONNECT, reply=Reject())
        self.assertEqual(feed(session, Quit()), [Quit()])


class EndOfStreamTests(SynchronousTestCase):
    """EOF (receive_data(b"")) at every point."""

    COMMANDS: tuple[Command, ...] = (
        SENDMAIL, Macros("C", (("j", "mx"),)), CONNECT, HELO, *MESSAGE, Abort(), *MESSAGE[:4], Abort(),
        *MESSAGE[:6], HELO, Unknown("X"), QuitNoClose(), CONNECT, Quit(),
    )

    def test_eof_everywhere(self) -> None:
        """EOF yields Abort (if a message is open) then Disconnected(truncated=inside a frame); after QUIT nothing."""
        packets = [encode(command) for command in self.COMMANDS]
        data = b"".join(packets)
        boundaries = {0}
        open_at: dict[int, bool] = {0: False}
        position, is_open, quit_at = 0, False, len(data) + 1
        for command, packet in zip(self.COMMANDS, packets, strict=True):
            if isinstance(command, MailFrom):
                is_open = True
            elif isinstance(command, EndOfMessage | Abort | Helo | QuitNoClose | Quit):
                is_open = False
            position += len(packet)
            boundaries.add(position)
            open_at[position] = is_open
            if isinstance(command, Quit):
                quit_at = position
        last_open = False
        for cut in range(len(data) + 1):
            if cut in open_at:
                last_open = open_at[cut]
            session = MilterSession()
            if cut:
                session.receive_data(data[:cut])
            events = self.drain_with_golden_replies(session)
            session.receive_data(b"")
            tail = self.drain_with_golden_replies(session)
            if cut >= quit_at:
                self.assertEqual(tail, [], cut)
                self.assertIsInstance(events[-1], Quit)
                continue
            expected: list[MilterEvent] = [Abort()] if last_open else []
            expected.append(Disconnected(cut not in boundaries))
            self.assertEqual(tail, expected, cut)
            self.assertEqual(session.stage, Stage.CLOSED)
            self.assertIs(session.next_event(), NEED_DATA)

    def drain_with_golden_replies(self, session: MilterSession) -> list[MilterEvent]:
        """Every event available now, answering OPTNEG with the golden reply and the rest with Continue."""
        events: list[MilterEvent] = []
        while (event := session.next_event()) is not NEED_DATA:
            events.append(event)
            if session.reply_due:
                session.send(GOLDEN_REPLY if isinstance(event, Negotiate) else Continue())
        return events

    def test_eof_while_reply_owed(self) -> None:
        """EOF while a reply is owed abandons the reply: Abort then Disconnected."""
        session = milter()
        feed(session, CONNECT, HELO)
        session.receive_data(encode(MAIL))
        self.assertEqual(session.next_event(), MAIL)
        self.assertTrue(session.reply_due)
        session.receive_data(b"")
        self.assertEqual(session.next_event(), Abort())
        self.assertFalse(session.reply_due)
        self.assertEqual(session.next_event(), Disconnected(False))

    def test_eof_delivers_buffered_commands(self) -> None:
        """Whole commands received before EOF still come out before Disconnected."""
        session = milter(ProtocolFlag.NR_HEADER)
        feed(session, CONNECT, MAIL, RCPT, Data())
        session.receive_data(stream(HEADER, HEADER)[:-3])
        session.receive_data(b"")
        self.assertEqual(drain(session), [HEADER, Abort(), Disconnected(True)])

    def test_data_after_eof_ignored(self) -> None:
        """Bytes received after EOF are ignored."""
        session = milter()
        session.receive_data(b"")
        session.receive_data(encode(CONNECT))
        self.assertEqual(drain(session), [Disconnected(False)])

    def test_eof_before_optneg(self) -> None:
        """EOF before anything arrives is a clean Disconnected."""
        session = MilterSession()
        session.receive_data(b"")
        self.assertEqual(drain(session), [Disconnected(False)])


class SendValidationTests(SynchronousTestCase):
    """MilterSession.send refuses replies that are illegal now (LocalProtocolError)."""

    MODIFICATIONS: tuple[Modification, ...] = (
        AddHeader("X", "v"), InsertHeader(0, "X", "v"), ChangeHeader(1, "X", ""), ChangeFrom("<a>"),
        AddRecipient("<a>"), AddRecipient("<a>", ("NOTIFY=NEVER",)), DeleteRecipient("<a>"), ReplaceBody(b"x"),
        Quarantine("held"),
    )

    def at(self, command: Command, protocol: ProtocolFlag = ProtocolFlag.NONE,
           actions: Action = ALL_ACTIONS) -> MilterSession:
        """A session owing a reply to ``command`` (reached through a legal path)."""
        session = milter(protocol, actions)
        path: list[Command] = [CONNECT, HELO, *MESSAGE]
        index = path.index(command)
        feed(session, *path[:index])
        session.receive_data(encode(command))
        self.assertEqual(session.next_event(), command)
        self.assertTrue(session.reply_due)
        return session

    def test_modifications_at_end_of_message(self) -> None:
        """Every modification may be sent at end of message with its action negotiated, then a final reply."""
        session = self.at(EndOfMessage())
        for modification in self.MODIFICATIONS:
            self.assertEqual(session.send(modification), encode(modification))
            self.assertTrue(session.reply_due)
        session.send(Progress())
        self.assertEqual(session.send(Continue()), b"\0\0\0\1c")
        self.assertFalse(session.reply_due)
        self.assertEqual(session.stage, Stage.END_OF_MESSAGE)

    def test_modifications_elsewhere(self) -> None:
        """Modifications before end of message are refused."""
        for command in (CONNECT, HELO, *MESSAGE[:-1]):
            session = self.at(command)
            for modification in self.MODIFICATIONS:
                error = self.assertRaises(LocalProtocolError, session.send, modification)
                self.assertIn("end of message", str(error))
            session.send(Continue())

    def test_modifications_need_action(self) -> None:
        """A modification without its negotiated action is refused, naming the action."""
        for modification in self.MODIFICATIONS:
            needed = required_action(modification)
            session = self.at(EndOfMessage(), actions=ALL_ACTIONS & ~needed)
            error = self.assertRaises(LocalProtocolError, session.send, modification)
            self.assertIn(str(needed.name), str(error))
            self.assertTrue(session.reply_due)

    def test_skip(self) -> None:
        """Skip answers only BODY and only with SKIP negotiated."""
        session = self.at(BODY)
        self.assertRaises(LocalProtocolError, session.send, Skip())
        session = self.at(HEADER, ProtocolFlag.SKIP)
        self.assertRaises(LocalProtocolError, session.send, Skip())
        session = self.at(EndOfMessage(), ProtocolFlag.SKIP)
        self.assertRaises(LocalProtocolError, session.send, Skip())
        session = self.at(BODY, ProtocolFlag.SKIP)
        self.assertEqual(session.send(Skip()), b"\0\0\0\1s")

    def test_discard(self) -> None:
        """Discard is refused at CONNECT and HELO, allowed from MAIL on."""
        for early in (CONNECT, HELO):
            self.assertRaises(LocalProtocolError, self.at(early).send, Discard())
        for command in MESSAGE:
            self.at(command).send(Discard())

    def test_second_final_reply(self) -> None:
        """A second final reply for one command is refused (it would desynchronise the MTA)."""
        for first in (Continue(), Reject("x"), TempFail(), Accept()):
            session = self.at(RCPT)
            session.send(first)
            self.assertRaises(LocalProtocolError, session.send, Reject())
            self.assertRaises(LocalProtocolError, session.send, Progress())

    def test_connection_fail(self) -> None:
        """ConnectionFail is never sent."""
        for command in (CONNECT, EndOfMessage()):
            error = self.assertRaises(LocalProtocolError, self.at(command).send, ConnectionFail())
            self.assertIn("CONN_FAIL", str(error))

    def test_verdicts_anywhere(self) -> None:
        """Continue, Accept, Reject, TempFail, custom replies and Shutdown answer any command."""
        verdicts: tuple[Response, ...] = (
            Continue(), Accept(), Reject(), TempFail(), Reject("no"), TempFail("later", 421), Shutdown(),
        )
        for command in (CONNECT, HELO, *MESSAGE):
            for verdict in verdicts:
                self.assertEqual(self.at(command).send(verdict), encode(verdict))
        for verdict in (*verdicts, Discard()):
            session = milter()
            feed(session, CONNECT)
            session.receive_data(encode(Unknown("XFOO")))
            self.assertEqual(session.next_event(), Unknown("XFOO"))
            self.assertEqual(session.send(verdict), encode(verdict))

    def test_progress(self) -> None:
        """Progress may precede any final reply and is not final."""
        session = self.at(RCPT)
        session.send(Progress())
        session.send(Progress())
        self.assertTrue(session.reply_due)
        session.send(Continue())
        self.assertFalse(session.reply_due)

    def test_nothing_owed(self) -> None:
        """Replies when nothing is owed are refused."""
        session = milter()
        for response in (Continue(), Progress(), AddHeader("X", "y")):
            self.assertRaises(LocalProtocolError, session.send, response)
        session = MilterSession()
        self.assertRaises(LocalProtocolError, session.send, NegotiateReply())

    def test_optneg_reply(self) -> None:
        """OPTNEG needs a NegotiateReply the offer allows; nothing else answers it."""
        session = MilterSession()
        session.receive_data(encode(Negotiate(2, Action(0x3F), ProtocolFlag(0x7F))))
        session.next_event()
        self.assertRaises(LocalProtocolError, session.send, Continue())
        self.assertRaises(LocalProtocolError, session.send, NegotiateReply(6))
        self.assertRaises(LocalProtocolError, session.send, NegotiateReply(2, Action.CHANGE_FROM))
        self.assertRaises(LocalProtocolError, session.send, NegotiateReply(2, protocol=ProtocolFlag.SKIP))
        self.assertRaises(LocalProtocolError, session.send,
                          NegotiateReply(2, Action.NONE, ProtocolFlag.NONE, {MacroStage.CONNECT: ("j",)}))
        self.assertTrue(session.reply_due)
        self.assertEqual(session.stage, Stage.INIT)
        session.send(NegotiateReply(2, Action.ADD_HEADERS, ProtocolFlag.NO_HELO))
        self.assertEqual((session.actions, session.protocol), (Action.ADD_HEADERS, ProtocolFlag.NO_HELO))
        self.assertEqual(session.offer, Negotiate(2, Action(0x3F), ProtocolFlag(0x7F)))
        self.assertEqual(session.stage, Stage.OPTIONS)

    def test_negotiate_reply_elsewhere(self) -> None:
        """A NegotiateReply answers nothing but OPTNEG."""
        self.assertRaises(LocalProtocolError, self.at(CONNECT).send, NegotiateReply())

    def test_unencodable_reply_keeps_state(self) -> None:
        """A reply that cannot be encoded is refused and the reply stays owed."""
        session = self.at(EndOfMessage())
        self.assertRaises(LocalProtocolError, session.send, AddHeader("", "v"))
        self.assertRaises(LocalProtocolError, session.send, Quarantine(""))
        self.assertTrue(session.reply_due)
        session.send(Continue())


class MTASessionTests(SynchronousTestCase):
    """The MTA side checks what the milter sends and what we send."""

    def test_switched_off_command(self) -> None:
        """A command the milter switched off cannot be sent; its macro packet can."""
        for command_type, flag in NO_FLAG.items():
            session = mta(flag)
            self.assertFalse(session.wants(command_type))
            self.assertTrue(session.wants(Macros))
        session = mta(ProtocolFlag.NO_DATA)
        for command in (CONNECT, HELO, MAIL, RCPT):
            session.send(command)
            responses_of(session, Continue())
        session.send(Macros("T", (("i", "Q"),)))
        error = self.assertRaises(LocalProtocolError, session.send, Data())
        self.assertIn("DATA", str(error))
        self.assertIn("NO_DATA", str(error))
        session.send(HEADER)

    def test_command_while_reply_owed(self) -> None:
        """Only MACRO, ABORT, QUIT and QUIT_NC may be sent while a reply is owed."""
        session = mta()
        session.send(CONNECT)
        self.assertRaises(LocalProtocolError, session.send, HELO)
        session.send(Macros("H"))
        session.send(Quit())
        self.assertFalse(session.reply_due)

    def test_order(self) -> None:
        """Commands out of order are LocalProtocolErrors on the MTA side."""
        session = mta()
        session.send(CONNECT)
        responses_of(session, Continue())
        error = self.assertRaises(LocalProtocolError, session.send, RCPT)
        self.assertIn("RCPT", str(error))
        self.assertRaises(LocalProtocolError, MTASession().send, CONNECT)

    def test_unsolicited_response(self) -> None:
        """A response while none is owed is a RemoteProtocolError, and closes the session."""
        for setup, response in (
            ((), Continue()),
            ((CONNECT,), Reject()),
            ((CONNECT, Macros("H")), Progress()),
        ):
            session = MTASession() if not setup else mta()
            for command in setup:
                session.send(command)
                if session.reply_due:
                    responses_of(session, Continue())
            session.receive_data(encode(response))
            error = self.assertRaises(RemoteProtocolError, session.next_event)
            self.assertIn("no reply is owed", str(error))
            self.assertEqual(session.stage, Stage.CLOSED)
            self.assertIs(session.next_event(), NEED_DATA)

    def test_nr_reply_unsolicited(self) -> None:
        """A reply to a command covered by an NR flag is unsolicited."""
        session = mta(ProtocolFlag.NR_CONNECT)
        session.send(CONNECT)
        self.assertFalse(session.reply_due)
        session.receive_data(encode(Continue()))
        self.assertRaises(RemoteProtocolError, session.next_event)

    def test_modification_outside_eom(self) -> None:
        """A modification before end of message is a RemoteProtocolError."""
        session = mta(actions=ALL_ACTIONS)
        for command in (CONNECT, HELO, MAIL):
            session.send(command)
            responses_of(session, Continue())
        session.send(RCPT)
        session.receive_data(encode(AddRecipient("<c@d>")))
        error = self.assertRaises(RemoteProtocolError, session.next_event)
        self.assertIn("RCPT", str(error))

    def test_modification_without_action(self) -> None:
        """A modification whose action was not negotiated is a RemoteProtocolError."""
        session = mta(actions=Action.ADD_HEADERS)
        for command in (CONNECT, HELO, *MESSAGE[:-1]):
            session.send(command)
            responses_of(session, Continue())
        session.send(EndOfMessage())
        self.assertEqual(responses_of(session, AddHeader("X", "1")), [AddHeader("X", "1")])
        session.receive_data(encode(ReplaceBody(b"x")))
        error = self.assertRaises(RemoteProtocolError, session.next_event)
        self.assertIn("CHANGE_BODY", str(error))

    def test_optneg_reply_asks_too_much(self) -> None:
        """An OPTNEG reply asking more than offered is a RemoteProtocolError."""
        offer = Negotiate(6, Action(0x3F), ProtocolFlag(0x7F))
        for reply in (NegotiateReply(7), NegotiateReply(6, Action.CHANGE_FROM),
                      NegotiateReply(6, protocol=ProtocolFlag.HEADER_LEADING_SPACE)):
            session = MTASession()
            session.send(offer)
            session.receive_data(encode(reply))
            self.assertRaises(RemoteProtocolError, session.next_event)
            self.assertIsNone(session.negotiated)

    def test_optneg_answered_otherwise(self) -> None:
        """Anything but an OPTNEG reply to OPTNEG, or an OPTNEG reply later, is a RemoteProtocolError."""
        session = MTASession()
        session.send(SENDMAIL)
        session.receive_data(encode(Continue()))
        self.assertRaises(RemoteProtocolError, session.next_event)
        session = mta()
        session.send(CONNECT)
        session.receive_data(encode(NegotiateReply()))
        self.assertRaises(RemoteProtocolError, session.next_event)

    def test_skip_and_discard(self) -> None:
        """Skip without negotiation, or Discard at CONNECT, is a RemoteProtocolError."""
        session = mta()
        session.send(CONNECT)
        session.receive_data(encode(Discard()))
        self.assertRaises(RemoteProtocolError, session.next_event)
        session = mta()
        for command in (CONNECT, HELO, *MESSAGE[:5]):
            session.send(command)
            responses_of(session, Continue())
        session.send(BODY)
        session.receive_data(encode(Skip()))
        self.assertRaises(RemoteProtocolError, session.next_event)

    def test_malformed_response(self) -> None:
        """A malformed response names itself and the stage."""
        session = mta()
        session.send(CONNECT)
        session.receive_data(frame("c", b"x"))
        error = self.assertRaises(RemoteProtocolError, session.next_event)
        self.assertIn("CONTINUE", str(error))
        self.assertIn("stage CONNECT", str(error))

    def test_response_too_big(self) -> None:
        """A response above the frame limit raises FrameSizeError."""
        session = MTASession(100)
        session.send(SENDMAIL)
        session.receive_data(frame("O", b"\0" * 101))
        self.assertRaises(FrameSizeError, session.next_event)

    def test_eof(self) -> None:
        """EOF gives Disconnected, also while a reply is owed; truncated if inside a frame."""
        session = mta()
        session.send(CONNECT)
        session.receive_data(b"\0\0")
        session.receive_data(b"")
        self.assertEqual(session.next_event(), Disconnected(True))
        self.assertFalse(session.reply_due)
        self.assertIs(session.next_event(), NEED_DATA)

    def test_refusals_move_stage(self) -> None:
        """The MTA side follows the same stage rules as the milter side."""
        session = mta()
        for command in (CONNECT, HELO, MAIL):
            session.send(command)
            responses_of(session, Continue())
        session.send(RCPT)
        self.assertEqual(responses_of(session, Reject("no such user", 550, "5.1.1")),
                         [Reject("no such user", 550, "5.1.1")])
        self.assertTrue(session.in_transaction)
        session.send(RcptTo("<c@d>"))
        responses_of(session, TempFail())
        session.send(Abort())
        self.assertFalse(session.in_transaction)
        session.send(MAIL)
        responses_of(session, Reject())
        self.assertFalse(session.in_transaction)
        self.assertRaises(LocalProtocolError, session.send, RCPT)

    def test_any_error_is_milter_error(self) -> None:
        """Encoding errors from MTASession.send are LocalProtocolErrors and change nothing."""
        session = mta()
        self.assertRaises(LocalProtocolError, session.send, Connect("h", Family.INET, 25, "not-an-ip"))
        self.assertEqual(session.stage, Stage.OPTIONS)
        self.assertTrue(issubclass(LocalProtocolError, MilterError))
