"""Hypothesis strategies for every milter command and response, and for whole conversations."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import assume
from hypothesis import strategies as st

from txmilt.codec import decode_text
from txmilt.errors import InvalidReplyError
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
    Verdict,
    required_action,
)
from txmilt.session import OPTIONAL_PROTOCOL_BITS, Requirements, negotiate

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


def wire_text(min_size: int = 0, max_size: int = 12, forbidden: str = "\0") -> st.SearchStrategy[str]:
    """Text as decoded from the wire: any unicode and surrogate-escaped bytes, never ``forbidden``.

    The text is built from bytes and decoded the way the codec decodes, so it
    is canonical: encoding it and decoding again gives the same string.
    ``forbidden`` must be ASCII.
    """
    bad = set(forbidden.encode("ascii"))
    chars = st.characters(codec="utf-8", exclude_characters=forbidden)
    raw_bytes = st.binary(min_size=1, max_size=4).map(lambda b: bytes(x for x in b if x not in bad))
    specials = st.sampled_from([c for c in ("%", "%%", " ", ",", "{", "}", "\t", "\n") if c not in forbidden])
    piece = st.one_of(
        st.text(chars, min_size=1, max_size=4).map(lambda t: t.encode("utf-8")),
        raw_bytes,
        specials.map(lambda t: t.encode("ascii")),
    )
    return (
        st.lists(piece, max_size=max_size)
        .map(lambda pieces: decode_text(b"".join(pieces)))
        .filter(lambda text: min_size <= len(text))
    )


names = wire_text(min_size=1, forbidden="\0")
words = wire_text(min_size=1, forbidden="\0 ")
bodies = st.binary(min_size=1, max_size=64)


# -------------------------------------------------------------------- commands


def connects() -> st.SearchStrategy[Connect]:
    """CONNECT with a valid address for each family."""
    host = wire_text()
    port = st.integers(min_value=0, max_value=0xFFFF)
    ipv4 = st.ip_addresses(v=4).map(str)
    ipv6 = st.tuples(st.ip_addresses(v=6), st.sampled_from(["", "IPv6:", "ipv6:"]), st.booleans()).map(
        lambda t: t[1] + (t[0].exploded if t[2] else str(t[0]))
    )
    return st.one_of(
        st.builds(Connect, host, st.just(Family.INET), port, ipv4),
        st.builds(Connect, host, st.just(Family.INET6), port, ipv6),
        st.builds(Connect, host, st.just(Family.UNIX), port, wire_text()),
        st.builds(Connect, host, st.just(Family.UNKNOWN)),
    )


def macro_packets(letters: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Macros]:
    """MACRO packets, possibly with no pairs; any one-byte command letter by default."""
    if letters is None:
        letters = st.integers(min_value=0, max_value=255).map(chr)
    pair = st.tuples(
        st.one_of(wire_text(), st.sampled_from(["j", "{j}", "i", "_", "{daemon_name}", "{client_addr}"])),
        wire_text(),
    )
    return st.builds(Macros, letters, st.lists(pair, max_size=4).map(tuple))


def negotiates() -> st.SearchStrategy[Negotiate]:
    """Any OPTNEG offer the frame can carry."""
    return st.builds(Negotiate, u32, u32.map(Action), u32.map(ProtocolFlag))


def commands() -> st.SearchStrategy[Command]:
    """Every command the MTA can send, with any field values the wire can carry."""
    args = st.lists(words, max_size=3).map(tuple)
    esmtp = st.lists(names, max_size=3).map(tuple)
    return st.one_of(
        negotiates(),
        macro_packets(),
        connects(),
        st.builds(Helo, wire_text()),
        st.builds(MailFrom, wire_text(), esmtp),
        st.builds(RcptTo, wire_text(), args),
        st.just(Data()),
        st.builds(Header, names, wire_text()),
        st.just(EndOfHeaders()),
        st.builds(BodyChunk, bodies),
        st.builds(EndOfMessage, st.binary(max_size=16)),
        st.builds(Unknown, wire_text()),
        st.just(Abort()),
        st.just(Quit()),
        st.just(QuitNoClose()),
    )


# ------------------------------------------------------------------- responses

statuses = st.tuples(st.integers(0, 999), st.integers(0, 999)).map(lambda t: f"{t[0]}.{t[1]}")
reply_lines = wire_text(max_size=8, forbidden="\0\r\n")


@st.composite
def refusals(draw: st.DrawFn, kind: type[Reject] | type[TempFail] | None = None) -> Reject | TempFail:
    """Reject or TempFail, plain or with a custom SMTP reply valid per ``messages._check_reply``."""
    cls: type[Reject] | type[TempFail] = Reject
    if kind is not None:
        cls = kind
    elif draw(st.booleans()):
        cls = TempFail
    if draw(st.booleans()):
        return cls()
    klass = 5 if cls is Reject else 4
    code = draw(st.one_of(st.none(), st.integers(klass * 100, klass * 100 + 99)))
    status = draw(st.one_of(st.none(), st.just(""), statuses.map(lambda s: f"{klass}.{s}")))
    text = draw(st.one_of(reply_lines, st.lists(reply_lines, min_size=1, max_size=4).map(tuple)))
    try:
        return cls(text, code, status)
    except InvalidReplyError:
        assume(False)
        raise  # pragma: no cover


def macro_lists() -> st.SearchStrategy[dict[MacroStage, tuple[str, ...]]]:
    """Macro lists per stage as a milter may request them."""
    name = wire_text(min_size=1, max_size=4, forbidden="\0 ,")
    return st.dictionaries(st.sampled_from(MacroStage), st.lists(name, max_size=4).map(tuple), max_size=3)


def modifications() -> st.SearchStrategy[Modification]:
    """Every end-of-message modification."""
    args = st.one_of(st.none(), st.lists(words, max_size=3).map(tuple))
    return st.one_of(
        st.builds(AddHeader, names, wire_text()),
        st.builds(InsertHeader, u32, names, wire_text()),
        st.builds(ChangeHeader, u32, names, wire_text()),
        st.builds(ChangeFrom, wire_text(), args),
        st.builds(AddRecipient, wire_text(), args),
        st.builds(DeleteRecipient, wire_text()),
        st.builds(ReplaceBody, st.binary(max_size=64)),
        st.builds(Quarantine, names),
    )


def verdicts() -> st.SearchStrategy[Verdict]:
    """Every final verdict, including the ones no milter should send."""
    return st.one_of(
        st.sampled_from([Continue(), Accept(), Discard(), Skip(), Shutdown(), ConnectionFail()]),
        refusals(),
    )


def responses() -> st.SearchStrategy[Response]:
    """Every response a milter can send, with any field values the wire can carry."""
    return st.one_of(
        st.builds(NegotiateReply, u32, u32.map(Action), u32.map(ProtocolFlag), macro_lists()),
        verdicts(),
        st.just(Progress()),
        modifications(),
    )


# ---------------------------------------------------------------- conversations

#: What MTAs really offer (PROTOCOL.md §4.4).
REAL_OFFERS = (
    Negotiate(6, ALL_ACTIONS, ALL_PROTOCOL),
    Negotiate(4, ALL_ACTIONS, ProtocolFlag(0x37F)),
    Negotiate(3, ALL_ACTIONS, ProtocolFlag(0x17F)),
    Negotiate(2, ALL_ACTIONS, ProtocolFlag(0x7F)),
    Negotiate(2, Action.NONE, ProtocolFlag.NONE),
)


@dataclass
class Step:
    """Commands the MTA sends back to back, and the milter's answer to the last (None: no reply)."""

    commands: tuple[Command, ...]
    responses: tuple[Response, ...] | None


@dataclass
class Conversation:
    """A legal milter conversation, and the events a MilterSession must report for it."""

    steps: list[Step] = field(default_factory=list)
    events: list[Command] = field(default_factory=list)

    @property
    def offer(self) -> Negotiate:
        """The MTA's OPTNEG offer."""
        command = self.steps[0].commands[0]
        assert isinstance(command, Negotiate)
        return command

    @property
    def reply(self) -> NegotiateReply:
        """The milter's OPTNEG reply."""
        responses = self.steps[0].responses
        assert responses is not None and isinstance(responses[0], NegotiateReply)
        return responses[0]

    def commands(self) -> list[Command]:
        """Every command in order."""
        return [command for step in self.steps for command in step.commands]

    def responses(self) -> list[Response]:
        """Every response in order."""
        return [response for step in self.steps for response in step.responses or ()]


_NO: dict[type, ProtocolFlag] = {
    Connect: ProtocolFlag.NO_CONNECT, Helo: ProtocolFlag.NO_HELO, MailFrom: ProtocolFlag.NO_MAIL,
    RcptTo: ProtocolFlag.NO_RCPT, Data: ProtocolFlag.NO_DATA, Header: ProtocolFlag.NO_HEADERS,
    EndOfHeaders: ProtocolFlag.NO_EOH, BodyChunk: ProtocolFlag.NO_BODY, Unknown: ProtocolFlag.NO_UNKNOWN,
}
_NR: dict[type, ProtocolFlag] = {
    Connect: ProtocolFlag.NR_CONNECT, Helo: ProtocolFlag.NR_HELO, MailFrom: ProtocolFlag.NR_MAIL,
    RcptTo: ProtocolFlag.NR_RCPT, Data: ProtocolFlag.NR_DATA, Header: ProtocolFlag.NR_HEADER,
    EndOfHeaders: ProtocolFlag.NR_EOH, BodyChunk: ProtocolFlag.NR_BODY, Unknown: ProtocolFlag.NR_UNKNOWN,
}


_short = wire_text(max_size=3)
_short_names = wire_text(min_size=1, max_size=3)
_HELOS = st.builds(Helo, _short)
_MAILS = st.builds(MailFrom, _short, st.lists(_short_names, max_size=2).map(tuple))
_RCPTS = st.builds(RcptTo, _short)
_UNKNOWNS = st.builds(Unknown, _short)
_HEADERS = st.lists(st.builds(Header, _short_names, _short), max_size=3)
_BODIES = st.lists(st.builds(BodyChunk, st.binary(min_size=1, max_size=16)), max_size=3)
_CONNECTS = connects()
_MODIFICATIONS = st.lists(modifications(), max_size=3)
_MACRO_LISTS = macro_lists()
_MACRO_PACKETS = {letter: macro_packets(st.just(letter)) for letter in "CHMRTLNBEU"}
_REFUSALS = {Reject: refusals(Reject), TempFail: refusals(TempFail)}


_OPTIONAL_BITS = [flag for flag in ProtocolFlag if flag & OPTIONAL_PROTOCOL_BITS]


@st.composite
def conversations(draw: st.DrawFn, max_messages: int = 2) -> Conversation:
    """A legal conversation: OPTNEG, then sessions of CONNECT, HELO, messages and UNKNOWNs.

    The MTA behaves like Sendmail or Postfix (ABORT after messages, macro
    packets for L and B, macros for switched-off commands); the milter answers
    with any verdict legal at each point, and modifications it negotiated.
    """
    conv = Conversation()
    offer = draw(st.sampled_from((REAL_OFFERS[0],) * 4 + REAL_OFFERS))
    offered_actions = offer.actions or Action(0x0F)
    offered_protocol = offer.protocol or ProtocolFlag(0x3F)
    actions = Action(draw(st.integers(0, 0x1FF)) & offered_actions & ~Action.SET_MACRO_LIST)
    optional = ProtocolFlag(sum(set(draw(st.lists(st.sampled_from(_OPTIONAL_BITS), max_size=8)))))
    required = ProtocolFlag(
        draw(st.sampled_from([0, 0x800, 0x100000, 0x100800])) & offered_protocol
    )
    macros = draw(_MACRO_LISTS) if offered_actions & Action.SET_MACRO_LIST and draw(st.booleans()) else {}
    reply = negotiate(offer, Requirements(actions, required, optional, macros))
    protocol = reply.protocol
    postfix = draw(st.booleans())
    conv.steps.append(Step((offer,), (reply,)))
    conv.events.append(offer)
    state = {"open": False}

    def send(command: Command, *, closes: bool = False, final: Sequence[Verdict] = (Continue(),)) -> Verdict:
        """Add ``command`` (after its macro packet); the verdict the milter gave, Continue if none."""
        letter = command.letter
        before: tuple[Command, ...] = ()
        if draw(st.integers(0, 3)) == 0 or (postfix and letter in "LB"):
            before = (draw(_MACRO_PACKETS[letter]),)
        no = _NO.get(type(command))
        if no is not None and protocol & no:
            if before:
                conv.steps.append(Step(before, None))
            return Continue()
        conv.events.append(command)
        nr = _NR.get(type(command))
        if nr is not None and protocol & nr:
            conv.steps.append(Step((*before, command), None))
            return Continue()
        out: list[Response] = [Progress()] * draw(st.integers(0, 1))
        if isinstance(command, EndOfMessage):
            out += [m for m in draw(_MODIFICATIONS) if required_action(m) & actions]
        verdict = draw(st.sampled_from(final)) if draw(st.integers(0, 9)) >= 7 else final[0]
        if isinstance(verdict, Reject | TempFail):
            verdict = draw(_REFUSALS[type(verdict)])
        out.append(verdict)
        conv.steps.append(Step((*before, command), tuple(out)))
        return verdict

    ending = (Continue(), Accept(), Reject(), TempFail(), Discard())

    def abort(times: int) -> None:
        for _ in range(times):
            conv.steps.append(Step((Abort(),), None))
            if state["open"]:
                conv.events.append(Abort())
            state["open"] = False

    def message() -> None:
        for _ in range(draw(st.integers(0, 1))):
            send(draw(_HELOS))
        verdict = send(draw(_MAILS), final=ending)
        state["open"] = isinstance(verdict, Continue)
        if not state["open"]:
            abort(draw(st.integers(0, 1)) if postfix else 0)
            return
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.integers(0, 4)) == 0 and not protocol & ProtocolFlag.NO_UNKNOWN:
                verdict = send(draw(_UNKNOWNS), final=ending)
                if isinstance(verdict, Accept):  # the milter is done with the message (libmilter: state HELO)
                    state["open"] = False
                    abort(draw(st.integers(0, 1)) if postfix else 0)
                    return
            verdict = send(draw(_RCPTS), final=(*ending, Discard()))
            if isinstance(verdict, Accept):
                state["open"] = False
                abort(draw(st.integers(0, 1)) if postfix else 0)
                return
        if draw(st.integers(0, 5)) == 0:
            abort(draw(st.integers(1, 2)))
            return
        content: list[Command] = [Data()]
        content += draw(_HEADERS)
        content.append(EndOfHeaders())
        content += draw(_BODIES)
        skip = (Skip(),) if protocol & ProtocolFlag.SKIP else ()
        skipping = False
        for command in content:
            if skipping and isinstance(command, BodyChunk):
                continue
            if skip and isinstance(command, BodyChunk) and draw(st.integers(0, 3)) == 3:
                verdict = send(command, final=skip)
            else:
                verdict = send(command, final=ending)
            skipping = isinstance(verdict, Skip)
            if not isinstance(verdict, Continue | Skip):
                state["open"] = False
                abort(draw(st.integers(0, 2)) if postfix else 0)
                return
        send(EndOfMessage(), final=ending)
        state["open"] = False
        abort(draw(st.integers(0, 2)) if postfix else 0)

    for number in range(draw(st.integers(1, 2))):
        if number:
            conv.steps.append(Step((QuitNoClose(),), None))
            conv.events.append(QuitNoClose())
        verdict = send(draw(_CONNECTS), final=(Continue(), Continue(), Reject(), Accept()))
        if isinstance(verdict, Continue):
            verdict = send(draw(_HELOS), final=(Continue(), Continue(), TempFail()))
        if isinstance(verdict, Continue):
            for _ in range(draw(st.integers(0, max_messages))):
                if draw(st.integers(0, 4)) == 0 and not protocol & ProtocolFlag.NO_UNKNOWN:
                    send(draw(_UNKNOWNS), final=ending)
                message()
    if draw(st.booleans()):
        conv.steps.append(Step((Quit(),), None))
        conv.events.append(Quit())
    return conv


def chunked(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, sorted, deduplicated)."""
    if not data:
        return []
    points = sorted({cut % len(data) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


cuts = st.lists(st.integers(min_value=0, max_value=2**20), max_size=40)
