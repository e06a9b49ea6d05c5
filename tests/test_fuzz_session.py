"""Stateful fuzzing of MilterSession: commands in any order, mutated and chunked bytes, EOF anywhere.

A hypothesis ``RuleBasedStateMachine`` plays a hostile or clumsy MTA against a
``MilterSession`` and answers every owed reply with a legal response, checking
after each step that:

* only ``RemoteProtocolError`` (or a subclass) escapes the receive path;
* after such an error the session is closed and hands out nothing more;
* each command gets at most one final reply (a second one is refused);
* ``reply_due`` matches the command and the negotiated no-reply flags;
* Abort events come only inside a transaction, and a new message, a new
  session or the end of the stream never leaves a transaction open silently;
* the per-message header limits are reported exactly when passed.

The model of "inside a transaction" is written from PROTOCOL.md §5.2, not
from the session's own tables.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests import strategies as s
from txmilt.codec import encode
from txmilt.errors import LocalProtocolError, NegotiationError, RemoteProtocolError
from txmilt.messages import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Abort,
    Accept,
    Action,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Macros,
    MacroStage,
    MailFrom,
    Negotiate,
    Progress,
    ProtocolFlag,
    Quit,
    QuitNoClose,
    RcptTo,
    Reject,
    Response,
    Shutdown,
    Skip,
    TempFail,
    Unknown,
    required_action,
)
from txmilt.session import (
    NEED_DATA,
    OPTIONAL_PROTOCOL_BITS,
    Disconnected,
    MilterSession,
    Notice,
    Requirements,
    Stage,
    negotiate,
)

#: Small limits, so that the fuzzer passes them often.
FRAME_LIMIT = 4096
MAX_HEADERS = 4
MAX_HEADER_BYTES = 160

# PROTOCOL.md §4.3: the flag that silences the reply to each command, and the one that switches it off.
NO_REPLY = {
    Connect: ProtocolFlag.NR_CONNECT, Helo: ProtocolFlag.NR_HELO, MailFrom: ProtocolFlag.NR_MAIL,
    RcptTo: ProtocolFlag.NR_RCPT, Data: ProtocolFlag.NR_DATA, Header: ProtocolFlag.NR_HEADER,
    EndOfHeaders: ProtocolFlag.NR_EOH, BodyChunk: ProtocolFlag.NR_BODY, Unknown: ProtocolFlag.NR_UNKNOWN,
}
SWITCHED_OFF = {
    Connect: ProtocolFlag.NO_CONNECT, Helo: ProtocolFlag.NO_HELO, MailFrom: ProtocolFlag.NO_MAIL,
    RcptTo: ProtocolFlag.NO_RCPT, Data: ProtocolFlag.NO_DATA, Header: ProtocolFlag.NO_HEADERS,
    EndOfHeaders: ProtocolFlag.NO_EOH, BodyChunk: ProtocolFlag.NO_BODY, Unknown: ProtocolFlag.NO_UNKNOWN,
}
# Commands at which DISCARD may answer (a message is in progress or marked).
DISCARDABLE = (MailFrom, RcptTo, Data, Header, EndOfHeaders, BodyChunk, EndOfMessage, Unknown)

#: A well-behaved MTA's session; the legal step walks it, then repeats the message part.
SCRIPT: tuple[Command, ...] = (
    Negotiate(6, ALL_ACTIONS, ALL_PROTOCOL),
    Connect("client.example", Family.INET, 40000, "192.0.2.7"),
    Helo("client.example"),
    MailFrom("<a@example.org>", ("SIZE=100",)),
    RcptTo("<b@example.com>"),
    RcptTo("<c@example.com>"),
    Data(),
    Header("From", " a@example.org"),
    Header("Subject", " hello"),
    EndOfHeaders(),
    BodyChunk(b"Hello,\r\nworld.\r\n"),
    EndOfMessage(),
    Abort(),
)
MESSAGE_START = 3

_simple = st.sampled_from([command for command in SCRIPT if not isinstance(command, Negotiate)] + [
    Unknown("VRFY x"), Quit(), QuitNoClose(), Abort(), EndOfMessage(b"tail"), Helo("again"),
    Header("X-Empty", ""), Connect("unknown", Family.UNKNOWN),
])
_any_command = st.one_of(_simple, _simple, s.commands())
_macro = st.one_of(st.none(), s.macro_packets(st.sampled_from("CHMRTLNBEUAZ")))
_cuts = st.lists(st.integers(min_value=0, max_value=2**16), max_size=6)
_optional_bits = [flag for flag in ProtocolFlag if flag & OPTIONAL_PROTOCOL_BITS]


def header_size(header: Header) -> int:
    """Payload bytes of a HEADER packet: name, NUL, value, NUL."""
    return len(encode(header)) - 5


class SessionMachine(RuleBasedStateMachine):
    """An MTA, well-behaved or not, against one MilterSession."""

    def __init__(self) -> None:
        super().__init__()
        self.initial_offer = SCRIPT[0]
        self.reset()

    def reset(self) -> None:
        """A fresh connection."""
        self.session = MilterSession(FRAME_LIMIT, max_headers=MAX_HEADERS, max_header_bytes=MAX_HEADER_BYTES)
        self.cursor = 0
        self.protocol = ProtocolFlag.NONE
        self.actions = Action.NONE
        self.events = 0
        self.errored = False  # a RemoteProtocolError escaped: the connection would be dropped
        self.closed = False  # Quit or Disconnected came out
        self.dead = False  # negotiation impossible: a milter closes without a reply
        self.eof = False
        self.in_message = False
        self.noticed = False
        self.headers = 0
        self.header_bytes = 0

    # -- feeding

    @initialize(
        data=st.data(),
        offer=st.one_of(st.just(SCRIPT[0]), st.sampled_from(s.REAL_OFFERS), s.negotiates()),
        now=st.integers(0, 3),
    )
    def start(self, data: st.DataObject, offer: Negotiate, now: int) -> None:
        """Most runs begin with some OPTNEG, sent at once; the others leave it to the rules."""
        self.initial_offer = offer
        if now:
            self.cursor = 1
            self.feed(encode(offer), [], data.draw)

    def feed(self, data: bytes, cuts: list[int], draw: Any) -> None:
        for chunk in s.chunked(data, cuts) if data else []:
            self.session.receive_data(chunk)
            self.drain(draw)

    def drain(self, draw: Any) -> None:
        """Take every event out, answering each owed reply."""
        while True:
            try:
                event = self.session.next_event()
            except RemoteProtocolError:
                assert not self.errored and not self.closed, "an error after the session was over"
                self.errored = True
                assert self.session.stage is Stage.CLOSED
                return
            if event is NEED_DATA:
                return
            assert not self.errored and not self.closed, f"{event!r} after the session was over"
            self.check_event(event)
            if isinstance(event, Notice):
                continue
            if self.session.reply_due:
                self.answer(event, draw)
                if self.dead:
                    return

    # -- checks

    def check_event(self, event: Command | Disconnected | Notice) -> None:
        if isinstance(event, Notice):
            assert not self.session.reply_due
            assert not self.noticed, "a second notice on one connection"
            self.noticed = True
            return
        self.events += 1
        if isinstance(event, Negotiate):
            assert self.events == 1, "a second OPTNEG was let through"
        else:
            assert self.events > 1 or isinstance(event, Disconnected), f"{event!r} before OPTNEG"
        if isinstance(event, Negotiate | EndOfMessage):
            expected = True
        elif type(event) in NO_REPLY:
            expected = not self.protocol & NO_REPLY[type(event)]
        else:
            expected = False
        assert self.session.reply_due == expected, (event, self.protocol)
        self.session.macros.get("j")  # the snapshot works at every point
        if isinstance(event, Abort):
            assert self.in_message, "Abort event outside a transaction"
            self.in_message = False
        elif isinstance(event, Connect | Helo | MailFrom | Quit | QuitNoClose | Disconnected):
            assert not self.in_message, f"{event!r} while a message is open, without an Abort first"
        if isinstance(event, MailFrom):
            self.in_message = True
            self.headers = self.header_bytes = 0
        elif isinstance(event, Header):
            self.headers += 1
            self.header_bytes += header_size(event)
        if isinstance(event, Header | MailFrom):
            over = self.headers > MAX_HEADERS or self.header_bytes > MAX_HEADER_BYTES
            assert (self.session.over_limit is not None) == over, (self.headers, self.header_bytes)
        if isinstance(event, Quit | Disconnected):
            self.closed = True
            assert self.session.stage is Stage.CLOSED
        if isinstance(event, Disconnected):
            assert self.eof

    def answer(self, command: Command | Disconnected, draw: Any) -> None:
        session = self.session
        if isinstance(command, Negotiate):
            optional = ProtocolFlag(sum(set(draw(st.lists(st.sampled_from(_optional_bits), max_size=6)))))
            wanted = Requirements(
                Action(draw(st.integers(0, 0x1FF))) & ~Action.SET_MACRO_LIST,
                ProtocolFlag(draw(st.sampled_from([0, 0x800, 0x100000]))),
                optional,
                draw(st.one_of(st.just({}), st.just({MacroStage.CONNECT: ("j", "{client_addr}")}))),
            )
            for needs in (wanted, Requirements()):
                try:
                    reply = negotiate(command, needs)
                    break
                except NegotiationError:
                    continue
            else:
                self.dead = True  # a milter closes the connection unanswered
                return
            session.send(reply)
            self.protocol, self.actions = reply.protocol, reply.actions
            assert not session.reply_due
            self.refuse_second(reply)
            return
        assert not isinstance(command, Disconnected)
        for _ in range(draw(st.integers(0, 2))):
            session.send(Progress())
            assert session.reply_due
        if isinstance(command, EndOfMessage):
            for modification in draw(st.lists(s.modifications(), max_size=3)):
                if required_action(modification) & self.actions:
                    session.send(modification)
                    assert session.reply_due
        if draw(st.integers(0, 9)) < 8:
            final: Response = Continue()  # mostly go on, so that runs get deep into messages
        else:
            final = draw(st.one_of(self.finals(command)))
        session.send(final)
        assert not session.reply_due
        self.refuse_second(final)
        if isinstance(command, EndOfMessage):
            self.in_message = False
        elif isinstance(final, Accept) or (
            isinstance(final, Reject | TempFail | Discard | Shutdown) and not isinstance(command, RcptTo | Unknown)
        ):
            self.in_message = False  # a refused recipient or unknown command leaves the message open

    def finals(self, command: Command) -> list[st.SearchStrategy[Response]]:
        """Every final reply legal for ``command``."""
        finals: list[st.SearchStrategy[Response]] = [
            st.just(Continue()), st.just(Accept()), s.refusals(), st.just(Shutdown()),
        ]
        if isinstance(command, DISCARDABLE):
            finals.append(st.just(Discard()))
        if isinstance(command, BodyChunk) and self.protocol & ProtocolFlag.SKIP:
            finals.append(st.just(Skip()))
        return finals

    def refuse_second(self, response: Response) -> None:
        """A second final reply to the same command is refused."""
        for again in (response, Continue()):
            try:
                self.session.send(again)
            except LocalProtocolError:
                continue
            raise AssertionError(f"a second reply {again!r} was accepted")

    # -- rules

    def usable(self) -> bool:
        return not (self.dead or self.eof)

    @precondition(usable)
    @rule(data=st.data(), steps=st.integers(1, 30), cuts=_cuts)
    def legal_steps(self, data: st.DataObject, steps: int, cuts: list[int]) -> None:
        """The next commands of a well-behaved MTA (skipping those the milter switched off)."""
        for _ in range(steps):
            if self.errored or self.closed or self.dead:
                return
            command = self.initial_offer if self.cursor == 0 else SCRIPT[self.cursor]
            self.cursor = self.cursor + 1 if self.cursor + 1 < len(SCRIPT) else MESSAGE_START
            flag = SWITCHED_OFF.get(type(command))
            if flag is not None and self.protocol & flag and not isinstance(command, MailFrom):
                continue
            raw = encode(command)
            if command.letter in "CHMRTLNBE" and data.draw(st.integers(0, 3)) == 0:
                raw = encode(data.draw(s.macro_packets(st.just(command.letter)))) + raw
            self.feed(raw, cuts, data.draw)
            if isinstance(command, MailFrom | RcptTo | Data | Header | EndOfHeaders | BodyChunk) and not (
                self.in_message
            ):
                self.cursor = MESSAGE_START  # the milter ended the message: the MTA starts the next one

    @precondition(usable)
    @rule(data=st.data(), command=_any_command, macro=_macro, cuts=_cuts)
    def any_command(self, data: st.DataObject, command: Command, macro: Macros | None, cuts: list[int]) -> None:
        """Any command at any time, perhaps after a macro packet."""
        raw = (encode(macro) if macro is not None else b"") + encode(command)
        self.feed(raw, cuts, data.draw)

    @precondition(usable)
    @rule(data=st.data(), count=st.integers(1, 6), size=st.integers(0, 60), cuts=_cuts)
    def headers_flood(self, data: st.DataObject, count: int, size: int, cuts: list[int]) -> None:
        """Many headers back to back (no-reply style), to pass the per-message limits."""
        raw = b"".join(encode(Header(f"X-H{number}", "v" * size)) for number in range(count))
        self.feed(raw, cuts, data.draw)

    @precondition(usable)
    @rule(
        data=st.data(),
        command=_any_command,
        kind=st.sampled_from(["flip", "truncate", "extend", "length", "letter", "splice"]),
        where=st.integers(min_value=0, max_value=2**16),
        value=st.binary(min_size=1, max_size=8),
        cuts=_cuts,
    )
    def mutated(
        self, data: st.DataObject, command: Command, kind: str, where: int, value: bytes, cuts: list[int]
    ) -> None:
        """An encoded command with one mutation: a flipped byte, a cut, junk, a bad length or letter."""
        raw = bytearray(encode(command))
        at = where % len(raw)
        if kind == "flip":
            raw[at] ^= value[0] or 1
        elif kind == "truncate":
            del raw[at:]
        elif kind == "extend":
            raw += value
        elif kind == "length":
            raw[0:4] = (int.from_bytes(value[:4].ljust(4, b"\0"), "big")).to_bytes(4, "big")
        elif kind == "letter":
            raw[4] = value[0]
        else:
            raw[at:at] = value
        self.feed(bytes(raw), cuts, data.draw)

    @precondition(usable)
    @rule(data=st.data(), junk=st.binary(min_size=1, max_size=64), cuts=_cuts)
    def garbage(self, data: st.DataObject, junk: bytes, cuts: list[int]) -> None:
        """Random bytes."""
        self.feed(junk, cuts, data.draw)

    @precondition(usable)
    @rule(data=st.data())
    def end_of_stream(self, data: st.DataObject) -> None:
        """The MTA goes away, perhaps in the middle of a frame."""
        was_over = self.errored or self.closed
        self.eof = True
        self.session.receive_data(b"")
        before = self.events
        self.drain(data.draw)
        if not was_over and not self.errored and not self.dead:
            assert self.closed, "no Disconnected event at the end of the stream"
            assert self.events > before

    @precondition(lambda self: self.dead or self.eof or self.errored or self.closed)
    @rule(data=st.data(), offer=st.one_of(st.just(SCRIPT[0]), st.sampled_from(s.REAL_OFFERS), s.negotiates()))
    def reconnect(self, data: st.DataObject, offer: Negotiate) -> None:
        """The MTA opens a new connection and negotiates."""
        self.reset()
        self.initial_offer = offer
        self.cursor = 1
        self.feed(encode(offer), [], data.draw)

    @rule(data=st.data(), command=_any_command)
    def late_bytes(self, data: st.DataObject, command: Command) -> None:
        """Bytes after the end of the stream, an error or QUIT produce nothing more."""
        if self.dead:
            return  # the milter has closed the connection
        over = self.eof or self.errored or self.closed
        events = self.events
        self.session.receive_data(encode(command))
        self.drain(data.draw)
        if over:
            assert self.events == events

    # -- invariants

    @invariant()
    def settled(self) -> None:
        """Between steps nothing is owed, and the session agrees with the model."""
        if self.dead:
            return
        assert not self.session.reply_due
        if self.errored or self.closed:
            assert self.session.stage is Stage.CLOSED
            assert self.session.next_event() is NEED_DATA
            return
        assert self.session.in_transaction == self.in_message, (self.session.stage, self.in_message)


class SessionFuzzTests(SessionMachine.TestCase):  # type: ignore[misc,valid-type]
    """Runs the machine (defined here, with a test_ method, so that trial finds it too)."""

    settings = settings(settings.default, max_examples=100, stateful_step_count=25, deadline=None)

    def test_session_invariants(self) -> None:
        """Hostile command sequences never break the session's promises."""
        self.runTest()
