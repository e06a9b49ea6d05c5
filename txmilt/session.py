"""Sans-IO milter sessions: legal order, macros, negotiation and who owes a reply.

``MilterSession`` is the filter side (what libmilter does); ``MTASession`` drives
the same tables from the MTA side so clients and test MTAs can be built on it.
Both are fed bytes with ``receive_data`` (``b""`` means end of stream), hand out
events with ``next_event`` and turn outgoing messages into bytes with ``send``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from txmilt.codec import (
    COMMAND_DECODERS,
    DEFAULT_FRAME_LIMIT,
    FrameBuffer,
    decode_command,
    decode_response,
    encode,
)
from txmilt.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from txmilt.macros import EMPTY_MACROS as EMPTY_MACROS
from txmilt.macros import MacroView as MacroView
from txmilt.macros import WireMacros, normal_macro_name
from txmilt.messages import (
    Abort,
    Accept,
    Action,
    Command,
    ConnectionFail,
    Continue,
    Discard,
    EndOfMessage,
    Macros,
    MailFrom,
    Negotiate,
    NegotiateReply,
    Progress,
    ProtocolFlag,
    Quit,
    QuitNoClose,
    Reject,
    Response,
    Shutdown,
    Skip,
    TempFail,
    required_action,
)
from txmilt.negotiation import NO_FLAG as NO_FLAG
from txmilt.negotiation import NO_REPLY_FLAG as NO_REPLY_FLAG
from txmilt.negotiation import OPTIONAL_PROTOCOL_BITS as OPTIONAL_PROTOCOL_BITS
from txmilt.negotiation import TRACKING_EVENTS as TRACKING_EVENTS
from txmilt.negotiation import Requirements as Requirements
from txmilt.negotiation import check_negotiation as check_negotiation
from txmilt.negotiation import negotiate as negotiate
from txmilt.negotiation import offered as offered
from txmilt.states import COMMAND_NAMES as COMMAND_NAMES
from txmilt.states import Scope as Scope
from txmilt.states import Stage as Stage
from txmilt.states import can_answer as can_answer
from txmilt.states import closes as closes
from txmilt.states import describe, transitions


class _NeedData(enum.Enum):
    """Sentinel type: no whole event until more bytes arrive."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The stream ended; ``truncated`` if it stopped inside a frame."""

    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the MTA sent was damaged and ignored, as libmilter ignores it; worth one log line."""

    text: str


MilterEvent = Command | Disconnected | Notice
MTAEvent = Response | Disconnected

# Macro sets libmilter keeps, by command letter, in lookup order (latest stage first).
_MACRO_LETTERS: Final = "ENTRMHC"
# Sets discarded when a command of this letter is processed: every later stage.
_MACRO_CLEARS: Final[Mapping[str, str]] = {"C": "HMRTNE", "H": "MRTNE", "M": "RTNE", "R": "TNE"}

_FINAL: Final = (Continue, Accept, Reject, TempFail, Discard, Skip, Shutdown)
_ALWAYS_ALLOWED: Final = (NegotiateReply, Progress, Continue, Accept, Reject, TempFail, Shutdown)
_NO_REPLY_COMMANDS: Final = (Macros, Abort, Quit, QuitNoClose)
_ENDINGS: Final = (Abort, Quit, QuitNoClose)
#: The CONTINUE packet, the answer to almost every command.
_CONTINUE_FRAME: Final = b"\x00\x00\x00\x01c"

#: Default most headers one message may have before it is over the limit.
DEFAULT_MAX_HEADERS: Final = 1000
#: Default most HEADER payload bytes (names, values, NULs) one message may have.
DEFAULT_MAX_HEADER_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """Why the current message went over a per-message limit: ``what`` counted ``value``, above ``limit``."""

    what: str
    value: int
    limit: int

    def __str__(self) -> str:
        return f"{self.what} {self.value} above the limit of {self.limit}"


@functools.lru_cache(maxsize=64)
def _answered(protocol: ProtocolFlag) -> frozenset[type]:
    """The commands that need a reply under ``protocol`` (one shared set per flag value)."""
    replied = {kind for kind, flag in NO_REPLY_FLAG.items() if not protocol & flag}
    return frozenset({Negotiate, EndOfMessage, *replied})


_REPLIES_SENT: dict[tuple[Negotiate, int], tuple[NegotiateReply, bytes]] = {}


def _checked_reply(offer: Negotiate, reply: NegotiateReply) -> bytes:
    """The bytes of ``reply`` once it is checked against ``offer``; remembered for replies sent again.

    A daemon sends the same few reply objects (its chain's plans) to every
    connection, so the check and the encoding are done once per offer and reply.
    """
    key = (offer, id(reply))
    known = _REPLIES_SENT.get(key)
    if known is not None and known[0] is reply:
        return known[1]
    check_negotiation(offer, reply, LocalProtocolError)
    data = encode(reply)
    if len(_REPLIES_SENT) >= 64:
        _REPLIES_SENT.clear()
    _REPLIES_SENT[key] = (reply, data)
    return data


# ------------------------------------------------------------------ sessions


class _Session:
    """Order, negotiation and reply bookkeeping shared by both sides."""

    __slots__ = (
        "_answered", "_awaiting", "_eof", "_frames", "_message_open", "_transitions", "negotiated", "offer", "stage",
    )

    _local_error: type[ProtocolError] = LocalProtocolError

    def __init__(self, frame_limit: int = DEFAULT_FRAME_LIMIT) -> None:
        self._frames = FrameBuffer(frame_limit)
        self._eof = False
        self.stage = Stage.INIT
        self.offer: Negotiate | None = None
        self.negotiated: NegotiateReply | None = None
        self._transitions = transitions(ProtocolFlag.NONE)
        self._answered = _answered(ProtocolFlag.NONE)
        self._awaiting: Command | None = None
        self._message_open = False

    # -- negotiated values

    @property
    def protocol(self) -> ProtocolFlag:
        """Negotiated protocol bits (none before negotiation)."""
        return self.negotiated.protocol if self.negotiated else ProtocolFlag.NONE

    @property
    def actions(self) -> Action:
        """Negotiated actions (none before negotiation)."""
        return self.negotiated.actions if self.negotiated else Action.NONE

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not form a whole frame yet."""
        return self._frames.pending

    @property
    def in_transaction(self) -> bool:
        """Whether a message is open: from MAIL until its end is answered, a reply closes it, or ABORT."""
        return self._message_open

    @property
    def awaiting(self) -> Command | None:
        """The command whose final reply is still owed, if any."""
        return self._awaiting

    def _set_negotiated(self, offer: Negotiate, reply: NegotiateReply) -> None:
        self.offer, self.negotiated = offer, reply
        self._transitions = transitions(reply.protocol)
        self._answered = _answered(reply.protocol)
        self.stage = Stage.OPTIONS

    def _reply_expected(self, command: Command) -> bool:
        return type(command) in self._answered

    def _order(self, command: Command, error: type[ProtocolError]) -> list[Command]:
        """Move the stage for ``command`` (TRANSITIONS); the events it stands for (an implicit abort first)."""
        stage = self.stage
        kind = type(command)
        target = self._transitions[stage].get(kind)
        if target is not None:  # the common case: a command of a stage, where it may come
            self.stage = target
            if kind is MailFrom:
                self._message_open = True
            return [command]
        if stage is Stage.CLOSED:
            raise error(f"{describe(command)} after the session closed")
        if stage is Stage.INIT and kind is not Negotiate:
            raise error(f"{describe(command)} in stage {stage.value}")
        if kind is Macros:
            return [command]
        if kind is Negotiate:
            if stage is not Stage.INIT:
                raise error(f"second {describe(command)} in stage {stage.value}")
            return [command]  # the stage moves when the reply is sent
        if kind is Abort:
            if not self._message_open:
                return []  # libmilter ignores an ABORT outside a message, and a second one
            self._message_open = False
            self.stage = Stage.HELO
            return [command]
        if kind is Quit or kind is QuitNoClose:
            events: list[Command] = [Abort()] if self._message_open else []
            self._message_open = False
            self.stage = Stage.CLOSED if kind is Quit else Stage.OPTIONS
            return [*events, command]
        target = self._transitions[Stage.HELO].get(kind)
        if target is None:
            raise error(f"{describe(command)} not allowed in stage {stage.value}")
        # libmilter's fallback: abandon the open message, if any, and take the command as after HELO.
        events = [Abort()] if self._message_open else []
        self._message_open = kind is MailFrom
        self.stage = target
        return [*events, command]

    def _after_final(self, command: Command, reply: Response) -> None:
        """Move the stage once the final reply to ``command`` is out (the CLOSES table)."""
        self._awaiting = None
        if self.stage is Stage.CLOSED:
            return
        kind = type(command)
        if kind is EndOfMessage:
            self._message_open = False
        elif closes(kind, type(reply)) is not Scope.NONE:
            self._message_open = False
            self.stage = Stage.HELO

    def _check_response(self, response: Response, error: type[ProtocolError]) -> Command:
        """Raise ``error`` unless ``response`` may answer what is awaited; the awaited command."""
        command = self._awaiting
        name = type(response).__name__
        if command is None:
            raise error(f"{name} sent while no reply is owed (stage {self.stage.value})")
        if isinstance(command, Negotiate) != isinstance(response, NegotiateReply):
            raise error(f"{name} cannot answer {describe(command)}")
        if isinstance(response, _ALWAYS_ALLOWED):
            return command
        if isinstance(response, ConnectionFail):
            raise error("CONN_FAIL ('f') is handled by no MTA and must not be sent")
        if isinstance(response, Skip | Discard):
            if not can_answer(type(command), type(response)):
                raise error(f"{name.upper()} cannot answer {describe(command)}")
            if isinstance(response, Skip) and not self.protocol & ProtocolFlag.SKIP:
                raise error("SKIP was not negotiated")
            return command
        if not isinstance(command, EndOfMessage):
            raise error(f"{name} only allowed at end of message, not in reply to {describe(command)}")
        needed = required_action(response)
        if not self.actions & needed:
            raise error(f"{name} needs action {needed.name}, which was not negotiated")
        return command


class MilterSession(_Session):
    """The filter side of one MTA connection.

    It counts the headers of the current message and their payload bytes; when
    either passes its limit (0: none), ``over_limit`` says so until the next MAIL.
    The headers still come out as events: what to answer is the caller's choice.
    """

    __slots__ = (
        "_damage_noticed", "_macro_view", "_macros", "_pending", "header_bytes", "header_count", "max_header_bytes",
        "max_headers", "over_limit",
    )

    def __init__(
        self,
        frame_limit: int = DEFAULT_FRAME_LIMIT,
        *,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        super().__init__(frame_limit)
        self._macros: dict[str, Mapping[str, str]] = {}
        self._macro_view: MacroView | None = None
        self._pending: list[MilterEvent] = []
        self._damage_noticed = False
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        #: Headers received in the current message.
        self.header_count = 0
        #: HEADER payload bytes received in the current message.
        self.header_bytes = 0
        #: The first limit the current message went over, or None; cleared by the next MAIL.
        self.over_limit: LimitExceeded | None = None

    @property
    def reply_due(self) -> bool:
        """Whether the last event still needs a final reply from us."""
        return self._awaiting is not None

    @property
    def macros(self) -> MacroView:
        """A snapshot of the macro values visible now."""
        view = self._macro_view
        if view is None:
            stored = self._macros
            view = EMPTY_MACROS
            if stored:
                view = MacroView(tuple([stored[letter] for letter in _MACRO_LETTERS if letter in stored]))
            self._macro_view = view
        return view

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the MTA; ``b""`` marks the end of the stream."""
        if not data:
            self._eof = True
        elif not self._eof:
            self._frames.feed(data)

    def next_event(self) -> MilterEvent | _NeedData:
        """The next command (or Disconnected, or a Notice of ignored damage), or NEED_DATA.

        Asking before the owed reply was sent is a LocalProtocolError, except
        after end of stream: then the reply can no longer arrive and is dropped.
        """
        if self._awaiting is not None:
            if not self._eof:
                raise LocalProtocolError(f"reply to {self._awaiting!r} still owed; send it first")
            self._awaiting = None  # the MTA is gone: the reply can no longer be delivered
        pending = self._pending
        frames = self._frames
        while not pending:
            if self.stage is Stage.CLOSED or (not frames.pending and not self._eof):
                return NEED_DATA
            try:
                frame = frames.next_frame()
            except RemoteProtocolError as e:
                stage, self.stage = self.stage, Stage.CLOSED
                e.args = (f"{e} (in stage {stage.value})",)
                raise
            if frame is None:
                if not self._eof:
                    return NEED_DATA
                truncated = frames.pending > 0
                events: list[MilterEvent] = [Abort()] if self._message_open else []
                self._message_open = False
                self.stage = Stage.CLOSED
                pending.extend([*events, Disconnected(truncated)])
                event = pending.pop(0)
                break
            letter, payload = frame
            # An undamaged MACRO packet (whole NUL-terminated name/value pairs) is kept undecoded until a
            # filter reads it; a damaged one takes the general way, decoded as libmilter tolerates it.
            if (letter == "D" and self.stage is not Stage.INIT and payload
                    and (len(payload) == 1 or (payload[-1] == 0 and not payload.count(0) % 2))):
                macro_letter = chr(payload[0])
                if macro_letter in _MACRO_LETTERS:
                    self._macros[macro_letter] = WireMacros(payload[1:])
                    self._macro_view = None
                continue
            events = self._command(letter, payload)
            if len(events) == 1 and not pending:
                event = events[0]  # the common case: one command, no list to go through
                break
            pending.extend(events)
        else:
            event = pending.pop(0)
        if type(event) in self._answered:
            self._awaiting = event  # type: ignore[assignment]
        return event

    def _command(self, letter: str, payload: bytes) -> list[MilterEvent]:
        stage = self.stage
        try:
            decoder = COMMAND_DECODERS.get(letter)
            command = decoder(payload) if decoder is not None else decode_command(letter, payload)
        except RemoteProtocolError as e:
            self.stage = Stage.CLOSED
            e.args = (f"{e} (in stage {stage.value})",)
            raise
        kind = type(command)
        try:
            events: list[MilterEvent] = self._order(command, RemoteProtocolError)  # type: ignore[assignment]
        except RemoteProtocolError:
            self.stage = Stage.CLOSED
            raise
        if kind is Macros:
            assert isinstance(command, Macros)
            self._store_macros(command)
            if command.damage and not self._damage_noticed:
                self._damage_noticed = True
                return [Notice(
                    f"damaged MACRO packet for {command.command!r} ({command.damage}); kept its whole name/value"
                    " pairs and ignored the rest, as libmilter does (reported once per connection)"
                )]
            return []
        if letter == "L":
            self._count_header(len(payload))
        elif letter == "M":
            self.header_count = self.header_bytes = 0
            self.over_limit = None
        if letter in "OQK":
            self._macros = {}
            self._macro_view = None
        elif letter in _MACRO_CLEARS:
            for cleared in _MACRO_CLEARS[letter]:
                if self._macros.pop(cleared, None) is not None:
                    self._macro_view = None
        return events

    def _count_header(self, size: int) -> None:
        self.header_count += 1
        self.header_bytes += size
        if self.over_limit is not None:
            return
        if self.max_headers and self.header_count > self.max_headers:
            self.over_limit = LimitExceeded("headers", self.header_count, self.max_headers)
        elif self.max_header_bytes and self.header_bytes > self.max_header_bytes:
            self.over_limit = LimitExceeded("header bytes", self.header_bytes, self.max_header_bytes)

    def _store_macros(self, packet: Macros) -> None:
        if packet.command in _MACRO_LETTERS:
            values: dict[str, str] = {}
            for name, value in packet.pairs:
                values.setdefault(normal_macro_name(name), value)  # libmilter finds the first of duplicates
            self._macros[packet.command] = values
            self._macro_view = None

    def send(self, response: Response) -> bytes:
        """The bytes for ``response``; LocalProtocolError if it may not be sent now."""
        command = self._awaiting
        if type(response) is Continue and command is not None and type(command) is not Negotiate:
            self._after_final(command, response)  # the common case: CONTINUE may answer anything else
            return _CONTINUE_FRAME
        command = self._check_response(response, LocalProtocolError)
        if isinstance(response, NegotiateReply):
            assert isinstance(command, Negotiate)
            data = _checked_reply(command, response)
            self._set_negotiated(command, response)
            self._awaiting = None
            return data
        data = encode(response)
        if isinstance(response, _FINAL):
            self._after_final(command, response)
        return data


class MTASession(_Session):
    """The MTA side of one milter connection: sends commands, reads replies."""

    __slots__ = ()

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the milter; ``b""`` marks the end of the stream."""
        if data:
            self._frames.feed(data)
        else:
            self._eof = True

    @property
    def reply_due(self) -> bool:
        """Whether a final reply from the milter is still owed."""
        return self._awaiting is not None

    def wants(self, command: type[Command]) -> bool:
        """Whether the milter asked to receive this kind of command."""
        flag = NO_FLAG.get(command)
        return flag is None or not self.protocol & flag

    def send(self, command: Command) -> bytes:
        """The bytes for ``command``; LocalProtocolError if it may not be sent now."""
        if self._awaiting is not None and not isinstance(command, _NO_REPLY_COMMANDS):
            raise LocalProtocolError(f"{command!r} sent while the reply to {self._awaiting!r} is owed")
        if not self.wants(type(command)):
            flag = NO_FLAG[type(command)]
            raise LocalProtocolError(f"the milter switched {describe(command)} off ({flag.name})")
        data = encode(command)
        self._order(command, LocalProtocolError)
        if isinstance(command, _ENDINGS):
            self._awaiting = None
        if isinstance(command, Negotiate):
            self.offer = command
        if self._reply_expected(command):
            self._awaiting = command
        return data

    def next_event(self) -> MTAEvent | _NeedData:
        """The next response from the milter (or Disconnected), or NEED_DATA."""
        if self.stage is Stage.CLOSED and not self._awaiting:
            return NEED_DATA
        stage = self.stage
        try:
            frame = self._frames.next_frame()
            response = None if frame is None else decode_response(*frame)
        except RemoteProtocolError as e:
            self.stage, self._awaiting = Stage.CLOSED, None
            e.args = (f"{e} (in stage {stage.value})",)
            raise
        if response is None:
            if not self._eof:
                return NEED_DATA
            self.stage, self._awaiting = Stage.CLOSED, None
            return Disconnected(self._frames.pending > 0)
        awaited = self._awaiting
        try:
            if isinstance(response, NegotiateReply) and isinstance(awaited, Negotiate):
                check_negotiation(awaited, response, RemoteProtocolError)
            command = self._check_response(response, RemoteProtocolError)
        except RemoteProtocolError:
            self.stage, self._awaiting = Stage.CLOSED, None
            raise
        if isinstance(response, NegotiateReply):
            assert isinstance(command, Negotiate)
            self._set_negotiated(command, response)
            self._awaiting = None
        elif isinstance(response, _FINAL):
            self._after_final(command, response)
        return response
