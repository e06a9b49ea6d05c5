"""Frozen dataclasses for every milter command, response and modification.

Text fields are ``str`` decoded from the wire as UTF-8 with ``surrogateescape``,
so any byte sequence survives a round trip; bodies stay ``bytes``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

from txmilt.errors import InvalidReplyError

#: The newest protocol version txmilt speaks.
PROTOCOL_VERSION = 6

#: Largest body or replacement-body chunk either MTA sends in one packet.
MAX_BODY_CHUNK = 65535


class Action(enum.IntFlag):
    """Modification rights negotiated in OPTNEG (``SMFIF_*``)."""

    NONE = 0
    ADD_HEADERS = 0x001
    CHANGE_BODY = 0x002
    ADD_RECIPIENTS = 0x004
    DELETE_RECIPIENTS = 0x008
    CHANGE_HEADERS = 0x010
    QUARANTINE = 0x020
    CHANGE_FROM = 0x040
    ADD_RECIPIENTS_WITH_ARGS = 0x080
    SET_MACRO_LIST = 0x100


class ProtocolFlag(enum.IntFlag):
    """Events switched off, replies suppressed and options (``SMFIP_*``)."""

    NONE = 0
    NO_CONNECT = 0x00000001
    NO_HELO = 0x00000002
    NO_MAIL = 0x00000004
    NO_RCPT = 0x00000008
    NO_BODY = 0x00000010
    NO_HEADERS = 0x00000020
    NO_EOH = 0x00000040
    NR_HEADER = 0x00000080
    NO_UNKNOWN = 0x00000100
    NO_DATA = 0x00000200
    SKIP = 0x00000400
    RCPT_REJECTED = 0x00000800
    NR_CONNECT = 0x00001000
    NR_HELO = 0x00002000
    NR_MAIL = 0x00004000
    NR_RCPT = 0x00008000
    NR_DATA = 0x00010000
    NR_UNKNOWN = 0x00020000
    NR_EOH = 0x00040000
    NR_BODY = 0x00080000
    HEADER_LEADING_SPACE = 0x00100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000
    RESERVED = 0x40000000
    TEST = 0x80000000


#: Everything a version 6 MTA offers (Sendmail and Postfix alike).
ALL_ACTIONS = Action(0x1FF)
ALL_PROTOCOL = ProtocolFlag(0x1FFFFF)

#: Bits reserved for MTA/libmilter internals (buffer sizes); never negotiated here.
INTERNAL_PROTOCOL_BITS = ProtocolFlag(0x70000000)


class MacroStage(enum.IntEnum):
    """Stage numbers for macro lists in the OPTNEG reply (``SMFIM_*``)."""

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4
    END_OF_MESSAGE = 5
    END_OF_HEADERS = 6


class Family(enum.Enum):
    """Address family of the SMTP client in CONNECT (``SMFIA_*``)."""

    UNKNOWN = "U"
    UNIX = "L"
    INET = "4"
    INET6 = "6"


# --------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Negotiate:
    """Option negotiation offer from the MTA (command 'O')."""

    letter: ClassVar[str] = "O"
    version: int = PROTOCOL_VERSION
    actions: Action = ALL_ACTIONS
    protocol: ProtocolFlag = ALL_PROTOCOL


@dataclass(frozen=True, slots=True)
class Macros:
    """Macro values for the command with letter ``command`` (command 'D')."""

    letter: ClassVar[str] = "D"
    command: str
    pairs: tuple[tuple[str, str], ...] = ()
    #: What was wrong with the packet, if it arrived damaged (only its whole pairs are in ``pairs``).
    damage: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Connect:
    """SMTP client connection: host name and address (command 'C')."""

    letter: ClassVar[str] = "C"
    hostname: str
    family: Family = Family.UNKNOWN
    port: int = 0
    address: str = ""


@dataclass(frozen=True, slots=True)
class Helo:
    """HELO/EHLO name (command 'H')."""

    letter: ClassVar[str] = "H"
    name: str


class _EnvelopeAddress:
    """The ``mailbox`` and ``domain`` of an envelope address as the MTA sent it (``<user@host>``)."""

    __slots__ = ()
    address: str

    @property
    def mailbox(self) -> str:
        """The address without angle brackets or source route: ``user@example.com``; ``""`` for ``<>``."""
        text = self.address.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1].strip()
        if text.startswith("@") and ":" in text:  # obsolete source route: <@relay,@relay:user@host>
            text = text.partition(":")[2]
        return text

    @property
    def domain(self) -> str:
        """The part of ``mailbox`` after its last ``@``, as written; ``""`` if there is none."""
        local, at, domain = self.mailbox.rpartition("@")
        return domain if at and local else ""


@dataclass(frozen=True, slots=True)
class MailFrom(_EnvelopeAddress):
    """Envelope sender and its ESMTP parameters (command 'M')."""

    letter: ClassVar[str] = "M"
    address: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RcptTo(_EnvelopeAddress):
    """One envelope recipient and its ESMTP parameters (command 'R')."""

    letter: ClassVar[str] = "R"
    address: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Data:
    """The client sent DATA (command 'T')."""

    letter: ClassVar[str] = "T"


@dataclass(frozen=True, slots=True)
class Header:
    """One message header; folded lines are joined by bare LF (command 'L')."""

    letter: ClassVar[str] = "L"
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class EndOfHeaders:
    """All headers have been sent (command 'N')."""

    letter: ClassVar[str] = "N"


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """A piece of the body with CRLF line ends (command 'B')."""

    letter: ClassVar[str] = "B"
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """End of the message; MTAs send no data here (command 'E')."""

    letter: ClassVar[str] = "E"
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Unknown:
    """An SMTP command the MTA did not recognise (command 'U')."""

    letter: ClassVar[str] = "U"
    line: str


@dataclass(frozen=True, slots=True)
class Abort:
    """The current message is abandoned (command 'A')."""

    letter: ClassVar[str] = "A"


@dataclass(frozen=True, slots=True)
class Quit:
    """The SMTP session is over; close the socket (command 'Q')."""

    letter: ClassVar[str] = "Q"


@dataclass(frozen=True, slots=True)
class QuitNoClose:
    """The SMTP session is over; a new one follows on this socket (command 'K')."""

    letter: ClassVar[str] = "K"


Command: TypeAlias = (
    Negotiate | Macros | Connect | Helo | MailFrom | RcptTo | Data | Header
    | EndOfHeaders | BodyChunk | EndOfMessage | Unknown | Abort | Quit | QuitNoClose
)

# -------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class NegotiateReply:
    """The milter's answer to OPTNEG, with macro lists per stage (response 'O')."""

    letter: ClassVar[str] = "O"
    version: int = PROTOCOL_VERSION
    actions: Action = Action.NONE
    protocol: ProtocolFlag = ProtocolFlag.NONE
    macros: Mapping[MacroStage, tuple[str, ...]] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.version, self.actions, self.protocol, tuple(sorted(self.macros.items()))))


@dataclass(frozen=True, slots=True)
class Continue:
    """Go on; at end of message, accept (response 'c')."""

    letter: ClassVar[str] = "c"


@dataclass(frozen=True, slots=True)
class Accept:
    """Accept the message (or connection) without further filtering (response 'a')."""

    letter: ClassVar[str] = "a"


#: An enhanced status code such as ``5.7.1`` (RFC 3463).
ENHANCED_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_MAX_REPLY_LINES = 32
_MAX_REPLY_LINE_BYTES = 980


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Shared shape of Reject and TempFail: optional custom SMTP reply."""

    text: str | tuple[str, ...] = ()
    code: int | None = None
    status: str | None = None

    default_code: ClassVar[int] = 0
    default_status: ClassVar[str] = ""

    def __post_init__(self) -> None:
        text = (self.text,) if isinstance(self.text, str) else tuple(self.text)
        if not text and self.code is None and self.status is None:
            object.__setattr__(self, "text", ())
            return
        code = self.default_code if self.code is None else self.code
        status = self.default_status if self.status is None else self.status
        _check_reply(type(self).__name__, code, status, text or ("",))
        object.__setattr__(self, "text", text or ("",))
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "status", status)

    @property
    def custom(self) -> bool:
        """Whether this refusal carries its own SMTP reply text."""
        return self.code is not None

    def reply_text(self) -> str:
        """The SMTP reply as sent in a REPLYCODE packet, with ``%`` doubled."""
        assert self.code is not None and self.status is not None
        lines: tuple[str, ...] = self.text  # type: ignore[assignment]
        last = len(lines) - 1
        out = []
        for number, line in enumerate(lines):
            words = [w for w in (self.status, line.replace("%", "%%")) if w]
            out.append(f"{self.code}{' ' if number == last else '-'}{' '.join(words)}")
        return "\r\n".join(out)


def _check_reply(verdict: str, code: int, status: str, lines: tuple[str, ...]) -> None:
    """Raise InvalidReplyError unless the MTA would accept this reply."""
    klass = str(code)[:1]
    expected = "5" if verdict == "Reject" else "4"
    if not 400 <= code <= 599 or klass != expected:
        raise InvalidReplyError(f"{verdict} needs a {expected}xx reply code, not {code}")
    if status and (not ENHANCED_STATUS.fullmatch(status) or status[0] != klass):
        raise InvalidReplyError(
            f"enhanced status {status!r} must look like {klass}.7.1 and match code {code}"
        )
    if len(lines) > _MAX_REPLY_LINES:
        raise InvalidReplyError(f"a reply has at most {_MAX_REPLY_LINES} lines, not {len(lines)}")
    first_word = lines[0].split(" ", 1)[0]
    if not status and ENHANCED_STATUS.fullmatch(first_word) and first_word[0] == klass:
        raise InvalidReplyError(
            f"reply text {lines[0]!r} begins with an enhanced status code; pass it as status="
        )
    for line in lines:
        if "\r" in line or "\n" in line or "\0" in line:
            raise InvalidReplyError(f"reply line {line!r} contains CR, LF or NUL; pass lines as a tuple")
        try:
            size = len(line.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            raise InvalidReplyError(f"reply line {line!r} cannot be encoded (a lone surrogate)") from None
        if size > _MAX_REPLY_LINE_BYTES:
            raise InvalidReplyError(f"reply line longer than {_MAX_REPLY_LINE_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class Reject(_Refusal):
    """Refuse permanently (response 'r', or 'y' with a custom 5xx reply)."""

    letter: ClassVar[str] = "r"
    default_code: ClassVar[int] = 550
    default_status: ClassVar[str] = "5.7.1"


@dataclass(frozen=True, slots=True)
class TempFail(_Refusal):
    """Refuse temporarily (response 't', or 'y' with a custom 4xx reply)."""

    letter: ClassVar[str] = "t"
    default_code: ClassVar[int] = 451
    default_status: ClassVar[str] = "4.7.1"


@dataclass(frozen=True, slots=True)
class Discard:
    """Accept the message and silently drop it (response 'd')."""

    letter: ClassVar[str] = "d"


@dataclass(frozen=True, slots=True)
class Skip:
    """Send no more body chunks; go to end of message (response 's')."""

    letter: ClassVar[str] = "s"


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Postfix only: answer 421 and drop the client (response '4')."""

    letter: ClassVar[str] = "4"


@dataclass(frozen=True, slots=True)
class ConnectionFail:
    """Defined by libmilter but handled by no MTA (response 'f'); decoded, never sent."""

    letter: ClassVar[str] = "f"


@dataclass(frozen=True, slots=True)
class Progress:
    """Still working; restarts the MTA's read timer (response 'p')."""

    letter: ClassVar[str] = "p"


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Put the message on hold with a reason (response 'q')."""

    letter: ClassVar[str] = "q"
    reason: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Append a header (response 'h')."""

    letter: ClassVar[str] = "h"
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """Insert a header at a 0-based position; 0 is the very top (response 'i')."""

    letter: ClassVar[str] = "i"
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Replace the index-th (1-based) header of this name; empty value deletes (response 'm')."""

    letter: ClassVar[str] = "m"
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeFrom:
    """Replace the envelope sender, with optional ESMTP parameters (response 'e')."""

    letter: ClassVar[str] = "e"
    address: str
    args: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class AddRecipient:
    """Add a recipient; with ``args`` (even empty) it is sent as ADDRCPT_PAR (response '+' or '2')."""

    letter: ClassVar[str] = "+"
    address: str
    args: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    """Remove a recipient, spelled exactly as in RCPT (response '-')."""

    letter: ClassVar[str] = "-"
    address: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """One chunk of the replacement body; the first truncates (response 'b')."""

    letter: ClassVar[str] = "b"
    data: bytes


Verdict: TypeAlias = Continue | Accept | Reject | TempFail | Discard | Skip | Shutdown | ConnectionFail
Modification: TypeAlias = (
    AddHeader | InsertHeader | ChangeHeader | ChangeFrom | AddRecipient | DeleteRecipient
    | ReplaceBody | Quarantine
)
Response: TypeAlias = NegotiateReply | Verdict | Modification | Progress

#: The action flag each modification needs.
REQUIRED_ACTION: Mapping[type[Modification], Action] = {
    AddHeader: Action.ADD_HEADERS,
    InsertHeader: Action.ADD_HEADERS,
    ChangeHeader: Action.CHANGE_HEADERS,
    ChangeFrom: Action.CHANGE_FROM,
    AddRecipient: Action.ADD_RECIPIENTS,
    DeleteRecipient: Action.DELETE_RECIPIENTS,
    ReplaceBody: Action.CHANGE_BODY,
    Quarantine: Action.QUARANTINE,
}


def required_action(modification: Modification) -> Action:
    """The action flag that must be negotiated before sending ``modification``."""
    if isinstance(modification, AddRecipient) and modification.args is not None:
        return Action.ADD_RECIPIENTS_WITH_ARGS
    return REQUIRED_ACTION[type(modification)]


def split_body(body: bytes) -> tuple[ReplaceBody, ...]:
    """Cut a replacement body into packets of at most 65535 bytes (one empty packet if empty)."""
    if not body:
        return (ReplaceBody(b""),)
    return tuple(
        ReplaceBody(body[start:start + MAX_BODY_CHUNK]) for start in range(0, len(body), MAX_BODY_CHUNK)
    )


def strip_leading_space(value: str) -> str:
    """Remove the one space an MTA strips after the colon when LEADSPC is off."""
    return value[1:] if value.startswith(" ") else value


def add_leading_space(value: str) -> str:
    """Add the space the MTA would add after the colon when LEADSPC is off."""
    return " " + value
