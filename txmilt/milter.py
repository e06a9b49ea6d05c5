"""The filter API users write against: the Milter base class, verdicts and Changes."""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import IO, Any, ClassVar, TypeAlias

from twisted.internet.defer import Deferred
from zope.interface import implementer

from txmilt.codec import encode_text
from txmilt.errors import ArgumentTypeError, LocalProtocolError
from txmilt.interfaces import IMilter
from txmilt.messages import (
    Accept,
    Action,
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Continue,
    Data,
    DeleteRecipient,
    Discard,
    EndOfHeaders,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    Modification,
    RcptTo,
    Reject,
    Skip,
    TempFail,
    Unknown,
    add_leading_space,
)
from txmilt.session import EMPTY_MACROS, MacroView

#: What a filter callback may answer with.
FilterVerdict: TypeAlias = Continue | Accept | Reject | TempFail | Discard | Skip
#: The classes of FilterVerdict, for isinstance checks.
FILTER_VERDICTS = (Continue, Accept, Reject, TempFail, Discard, Skip)
#: What a callback may return: a verdict, None (continue), a Deferred of one, or a coroutine.
Result: TypeAlias = (
    FilterVerdict | Deferred[FilterVerdict | None] | Coroutine[Any, Any, FilterVerdict | None] | None
)


#: A line break that does not continue the header (folding needs a space or tab next).
_UNFOLDED_LF = re.compile(r"\n(?![ \t])")
#: Header indexes travel as unsigned 32-bit integers.
_MAX_INDEX = 0xFFFFFFFF


#: A header name: printable ASCII (33 to 126) but ':'.
_HEADER_NAME = re.compile(r"[!-9;-~]+")


def _check_header_name(name: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise LocalProtocolError(f"header name {name!r} must be printable ASCII without spaces or ':'")


def _check_header_value(value: str) -> None:
    encode_text(value, "header value")
    if "\r" in value:
        raise LocalProtocolError(f"header value {value!r} contains CR; fold lines with LF and a space")
    if _UNFOLDED_LF.search(value):
        raise LocalProtocolError(
            f"header value {value!r} has a line break not followed by a space or tab; it would start a new header"
        )


def _check_index(call: str, index: int, lowest: int) -> None:
    if not lowest <= index <= _MAX_INDEX:
        raise LocalProtocolError(f"{call} index {index} must be between {lowest} and {_MAX_INDEX}")


def _check_type(signature: str, argument: str, value: object, expected: type | tuple[type, ...]) -> None:
    """ArgumentTypeError, naming the call and its types, unless ``value`` is an ``expected``."""
    if isinstance(value, expected) and not (isinstance(value, bool) and expected is int):
        return
    names = " or ".join(kind.__name__ for kind in (expected if isinstance(expected, tuple) else (expected,)))
    raise ArgumentTypeError(
        f"Changes.{signature}: {argument} must be {names}, not {type(value).__name__} {reprlib.repr(value)}"
    )


def _check_header_call(signature: str, name: object, value: object = "", index: object = 1) -> None:
    """Type checks shared by the header calls: name and value str, index int (in that order)."""
    _check_type(signature, "name", name, str)
    _check_type(signature, "value", value, str)
    _check_type(signature, "index", index, int)


_ADD_HEADER = "add_header(name: str, value: str)"
_INSERT_HEADER = "insert_header(name: str, value: str, index: int = 0)"
_CHANGE_HEADER = "change_header(name: str, value: str, index: int = 1)"
_DELETE_HEADER = "delete_header(name: str, index: int = 1)"
_ADD_RECIPIENT = "add_recipient(address: str, args: Sequence[str] | None = None)"
_CHANGE_FROM = "change_from(address: str, args: Sequence[str] | None = None)"


class Changes:
    """Records one filter's end-of-message changes, in the order made.

    Each method checks at the call that the filter declared the action it
    needs; nothing reaches the wire until the chain applies the changes.
    """

    def __init__(
        self,
        actions: Action,
        *,
        add_space: bool = False,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.actions = actions
        self._add_space = add_space
        self._on_progress = on_progress
        #: Header and recipient changes, in call order.
        self.edits: list[Modification] = []
        #: The new envelope sender, if changed.
        self.sender: ChangeFrom | None = None
        #: The replacement body, if replaced.
        self.body: bytes | None = None
        #: The quarantine reason, if quarantined.
        self.quarantine_reason: str | None = None

    def _require(self, action: Action, call: str) -> None:
        if not int(self.actions) & int(action):  # as ints: IntFlag's own & is slow Python code
            raise LocalProtocolError(f"{call}() needs Action.{action.name} in the filter's actions")

    def _value(self, value: str, *, deleting: bool = False) -> str:
        """``value`` as the chain sends it; an empty value is a header of its own, unless it deletes."""
        _check_header_value(value)
        return add_leading_space(value) if self._add_space and (value or not deleting) else value

    def add_header(self, name: str, value: str) -> None:
        """Append a header to the message."""
        _check_header_call(_ADD_HEADER, name, value)
        self._require(Action.ADD_HEADERS, "add_header")
        _check_header_name(name)
        self.edits.append(AddHeader(name, self._value(value)))

    def insert_header(self, name: str, value: str, index: int = 0) -> None:
        """Insert a header at a 0-based position among all headers; 0 (the default) is the very top."""
        _check_header_call(_INSERT_HEADER, name, value, index)
        self._require(Action.ADD_HEADERS, "insert_header")
        _check_header_name(name)
        _check_index("insert_header", index, 0)
        self.edits.append(InsertHeader(index, name, self._value(value)))

    def change_header(self, name: str, value: str, index: int = 1) -> None:
        """Replace the index-th (1-based) header called ``name``; an empty value deletes it."""
        _check_header_call(_CHANGE_HEADER, name, value, index)
        self._change_header(name, value, index)

    def delete_header(self, name: str, index: int = 1) -> None:
        """Delete the index-th (1-based) header called ``name``."""
        _check_header_call(_DELETE_HEADER, name, index=index)
        self._change_header(name, "", index)

    def _change_header(self, name: str, value: str, index: int) -> None:
        self._require(Action.CHANGE_HEADERS, "change_header")
        _check_header_name(name)
        _check_index("change_header", index, 1)
        self.edits.append(ChangeHeader(index, name, self._value(value, deleting=True)))

    def add_recipient(self, address: str, args: Sequence[str] | None = None) -> None:
        """Add an envelope recipient, with ESMTP arguments if given."""
        _check_type(_ADD_RECIPIENT, "address", address, str)
        action = Action.ADD_RECIPIENTS if args is None else Action.ADD_RECIPIENTS_WITH_ARGS
        self._require(action, "add_recipient")
        encode_text(address, "recipient")
        self.edits.append(AddRecipient(address, None if args is None else _esmtp_args(_ADD_RECIPIENT, args)))

    def delete_recipient(self, address: str) -> None:
        """Remove a recipient, spelled exactly as the MTA sent it."""
        _check_type("delete_recipient(address: str)", "address", address, str)
        self._require(Action.DELETE_RECIPIENTS, "delete_recipient")
        encode_text(address, "recipient")
        self.edits.append(DeleteRecipient(address))

    def change_from(self, address: str, args: Sequence[str] | None = None) -> None:
        """Replace the envelope sender, with ESMTP arguments if given."""
        _check_type(_CHANGE_FROM, "address", address, str)
        self._require(Action.CHANGE_FROM, "change_from")
        encode_text(address, "sender")
        self.sender = ChangeFrom(address, None if args is None else _esmtp_args(_CHANGE_FROM, args))

    def replace_body(self, body: bytes) -> None:
        """Replace the whole body (CRLF line ends); a later call replaces an earlier one."""
        _check_type("replace_body(body: bytes)", "body", body, (bytes, bytearray, memoryview))
        self._require(Action.CHANGE_BODY, "replace_body")
        self.body = bytes(body)

    def quarantine(self, reason: str) -> None:
        """Put the message on hold; the final verdict still decides what else happens."""
        _check_type("quarantine(reason: str)", "reason", reason, str)
        self._require(Action.QUARANTINE, "quarantine")
        if not reason:
            raise LocalProtocolError("quarantine() needs a non-empty reason")
        encode_text(reason, "quarantine reason")
        self.quarantine_reason = reason

    def progress(self) -> None:
        """Tell the MTA the filter is still working (restarts its read timer)."""
        if self._on_progress is not None:
            self._on_progress()

    @property
    def empty(self) -> bool:
        """Whether nothing was changed."""
        return not self.edits and self.sender is None and self.body is None and self.quarantine_reason is None


def _esmtp_args(signature: str, args: Sequence[str]) -> tuple[str, ...]:
    if isinstance(args, str) or not isinstance(args, Sequence):
        given = f"the string {args!r}" if isinstance(args, str) else f"{type(args).__name__} {reprlib.repr(args)}"
        raise ArgumentTypeError(
            f"Changes.{signature}: args must be a sequence of strings such as ['NOTIFY=NEVER'], not {given}"
        )
    for arg in args:
        _check_type(signature, "each of args", arg, str)
        if not arg or " " in arg:
            raise LocalProtocolError(f"ESMTP argument {arg!r} must be non-empty and without spaces")
        encode_text(arg, "ESMTP argument")
    return tuple(args)


@implementer(IMilter)
class Milter:
    """Base class for filters: every callback continues; override what you need.

    Declare what the filter needs as class attributes. The events a filter
    receives follow from the callbacks it overrides, so a filter that only
    reads headers costs the MTA no round trip for anything else.
    """

    #: Modifications this filter may make at end of message.
    actions: ClassVar[Action] = Action.NONE
    #: Macro names this filter needs, per stage.
    macro_requests: ClassVar[Mapping[MacroStage, Sequence[str]]] = {}
    #: See header values exactly as sent (leading space kept); give values with their space.
    leading_space: ClassVar[bool] = False
    #: Also see recipients the MTA already rejected.
    rejected_recipients: ClassVar[bool] = False
    #: Callbacks that only observe (always continue); the MTA then waits for no reply.
    no_reply: ClassVar[frozenset[str]] = frozenset()
    #: Have the chain buffer the whole body: ``body_file`` holds it during ``end_of_message``.
    #: Kept in memory up to the daemon's ``body_spool_threshold``, then in a temporary file; a
    #: body over ``max_body_size`` is not kept, and the filter gets its fallback instead.
    whole_body: ClassVar[bool] = False

    #: Macro values visible at the current callback (set by the chain).
    macros: MacroView = EMPTY_MACROS
    #: With ``whole_body``: the message body (CRLF line ends), a binary file positioned at its
    #: start, readable in ``end_of_message`` until that settles; None at other times.
    body_file: IO[bytes] | None = None

    def connect(self, command: Connect) -> Result:
        """Judge the SMTP client's connection."""
        return None

    def helo(self, command: Helo) -> Result:
        """Judge the HELO/EHLO name."""
        return None

    def mail_from(self, command: MailFrom) -> Result:
        """Judge the envelope sender; a new message begins."""
        return None

    def rcpt_to(self, command: RcptTo) -> Result:
        """Judge one recipient; a refusal refuses only this recipient."""
        return None

    def data(self, command: Data) -> Result:
        """Judge the DATA command."""
        return None

    def header(self, command: Header) -> Result:
        """Judge one header."""
        return None

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        """Judge the message once all headers are in."""
        return None

    def body(self, command: BodyChunk) -> Result:
        """Judge one body chunk; Skip asks for no more."""
        return None

    def end_of_message(self, changes: Changes) -> Result:
        """Give the final verdict; record changes on ``changes``."""
        return None

    def unknown(self, command: Unknown) -> Result:
        """Judge an unrecognised SMTP command."""
        return None

    def abort(self) -> Result:
        """The message was abandoned before its end (libmilter's ``xxfi_abort``)."""
        return None

    def reset(self) -> Result:
        """The message is over for this filter, however it ended: clear per-message state here."""
        return None

    def close(self) -> Result:
        """The SMTP session is over."""
        return None


#: Callback name for each command a filter can receive.
CALLBACKS: Mapping[type, str] = {
    Connect: "connect",
    Helo: "helo",
    MailFrom: "mail_from",
    RcptTo: "rcpt_to",
    Data: "data",
    Header: "header",
    EndOfHeaders: "end_of_headers",
    BodyChunk: "body",
    Unknown: "unknown",
}


def overrides(milter: object, callback: str) -> bool:
    """Whether ``milter`` implements ``callback`` itself (always true for non-Milter providers)."""
    if not isinstance(milter, Milter):
        return True
    return getattr(type(milter), callback, None) is not getattr(Milter, callback)
