"""Milter framing and the byte layout of every command and response, both directions."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from txmilt.errors import (
    InvalidReplyError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from txmilt.framing import ABSOLUTE_FRAME_LIMIT as ABSOLUTE_FRAME_LIMIT
from txmilt.framing import DEFAULT_FRAME_LIMIT as DEFAULT_FRAME_LIMIT
from txmilt.framing import LIBMILTER_FRAME_LIMIT as LIBMILTER_FRAME_LIMIT
from txmilt.framing import FrameBuffer as FrameBuffer
from txmilt.framing import frame as frame
from txmilt.messages import (
    ENHANCED_STATUS,
    MAX_BODY_CHUNK,
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
)

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_OPTNEG = struct.Struct("!III")


def encode_text(text: str, what: str) -> bytes:
    """UTF-8 (surrogateescape) bytes of ``text``; refuse a NUL, which the wire cannot carry."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} {text!r} cannot be encoded (a lone surrogate)") from None
    if b"\0" in raw:
        raise LocalProtocolError(f"{what} {text!r} contains a NUL byte")
    return raw


def decode_text(raw: bytes) -> str:
    """Lossless text from wire bytes."""
    return raw.decode("utf-8", "surrogateescape")


# ------------------------------------------------------------------- encoding


def _z(text: str, what: str) -> bytes:
    return encode_text(text, what) + b"\0"


def _args(args: tuple[str, ...], what: str) -> bytes:
    for arg in args:
        if not arg or " " in arg:
            raise LocalProtocolError(f"{what} argument {arg!r} must be non-empty and without spaces")
    return _z(" ".join(args), what)


def _optneg(m: Negotiate | NegotiateReply) -> bytes:
    for what, value in (("version", m.version), ("actions", m.actions), ("protocol", m.protocol)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise LocalProtocolError(f"OPTNEG {what} {value:#x} does not fit in 32 bits")
    return _OPTNEG.pack(m.version, int(m.actions), int(m.protocol))


def _enc_negotiate(m: Negotiate) -> bytes:
    return frame("O", _optneg(m))


def _enc_negotiate_reply(m: NegotiateReply) -> bytes:
    parts = [_optneg(m)]
    for stage in sorted(m.macros):
        names = m.macros[stage]
        for name in names:
            if not name or " " in name or "," in name:
                raise LocalProtocolError(f"macro name {name!r} must be non-empty, without spaces or commas")
        parts.append(_U32.pack(int(stage)) + _z(" ".join(names), "macro list"))
    return frame("O", b"".join(parts))


def _enc_macros(m: Macros) -> bytes:
    if len(m.command) != 1 or ord(m.command) > 0xFF:
        raise LocalProtocolError(f"macro packet needs a one-byte command letter, not {m.command!r}")
    body = b"".join(_z(name, "macro name") + _z(value, "macro value") for name, value in m.pairs)
    return frame("D", m.command.encode("latin-1") + body)


def _enc_connect(m: Connect) -> bytes:
    payload = _z(m.hostname, "host name") + m.family.value.encode("ascii")
    if m.family is Family.UNKNOWN:
        if m.port or m.address:
            raise LocalProtocolError(f"family 'U' carries no port or address: {m!r}")
        return frame("C", payload)
    if not 0 <= m.port <= 0xFFFF:
        raise LocalProtocolError(f"port {m.port} is out of range")
    _check_address(m.family, m.address, LocalProtocolError)
    payload += _U16.pack(m.port) + _z(m.address, "address")
    return frame("C", payload)


def _enc_envelope(letter: str) -> Callable[[Any], bytes]:
    def encode(m: MailFrom | RcptTo) -> bytes:
        for arg in m.args:
            if not arg:
                raise LocalProtocolError(f"empty ESMTP argument in {m!r}")
        return frame(letter, _z(m.address, "address") + b"".join(_z(a, "ESMTP argument") for a in m.args))

    return encode


def _enc_empty(m: Any) -> bytes:
    return frame(m.letter)


def _enc_body(m: BodyChunk) -> bytes:
    if not m.data:
        raise LocalProtocolError("a BODY packet cannot be empty")
    return frame("B", m.data)


def _enc_header_like(m: Header | AddHeader) -> bytes:
    if not m.name:
        raise LocalProtocolError(f"empty header name in {m!r}")
    return frame(m.letter, _z(m.name, "header name") + _z(m.value, "header value"))


def _enc_indexed_header(m: InsertHeader | ChangeHeader) -> bytes:
    if not m.name:
        raise LocalProtocolError(f"empty header name in {m!r}")
    if not 0 <= m.index <= 0xFFFFFFFF:
        raise LocalProtocolError(f"header index {m.index} is out of range")
    return frame(m.letter, _U32.pack(m.index) + _z(m.name, "header name") + _z(m.value, "header value"))


def _enc_refusal(m: Reject | TempFail) -> bytes:
    if not m.custom:
        return frame(m.letter)
    return frame("y", _z(m.reply_text(), "reply"))


def _enc_change_from(m: ChangeFrom) -> bytes:
    payload = _z(m.address, "address")
    if m.args is not None:
        payload += _args(m.args, "CHGFROM")
    return frame("e", payload)


def _enc_add_recipient(m: AddRecipient) -> bytes:
    if m.args is None:
        return frame("+", _z(m.address, "address"))
    payload = _z(m.address, "address")
    if m.args:
        payload += _args(m.args, "ADDRCPT_PAR")
    return frame("2", payload)


def _enc_replace_body(m: ReplaceBody) -> bytes:
    if len(m.data) > MAX_BODY_CHUNK:
        raise LocalProtocolError(
            f"a REPLBODY packet carries at most {MAX_BODY_CHUNK} bytes, not {len(m.data)}; use split_body()"
        )
    return frame("b", m.data)


def _enc_quarantine(m: Quarantine) -> bytes:
    if not m.reason:
        raise LocalProtocolError("a quarantine reason cannot be empty")
    return frame("q", _z(m.reason, "quarantine reason"))


_ENCODERS: Mapping[type, Callable[[Any], bytes]] = {
    Negotiate: _enc_negotiate,
    NegotiateReply: _enc_negotiate_reply,
    Macros: _enc_macros,
    Connect: _enc_connect,
    Helo: lambda m: frame("H", _z(m.name, "HELO name")),
    MailFrom: _enc_envelope("M"),
    RcptTo: _enc_envelope("R"),
    Data: _enc_empty,
    Header: _enc_header_like,
    EndOfHeaders: _enc_empty,
    BodyChunk: _enc_body,
    EndOfMessage: lambda m: frame("E", m.data),
    Unknown: lambda m: frame("U", _z(m.line, "command line")),
    Abort: _enc_empty,
    Quit: _enc_empty,
    QuitNoClose: _enc_empty,
    Continue: _enc_empty,
    Accept: _enc_empty,
    Reject: _enc_refusal,
    TempFail: _enc_refusal,
    Discard: _enc_empty,
    Skip: _enc_empty,
    Shutdown: _enc_empty,
    ConnectionFail: _enc_empty,
    Progress: _enc_empty,
    Quarantine: _enc_quarantine,
    AddHeader: _enc_header_like,
    InsertHeader: _enc_indexed_header,
    ChangeHeader: _enc_indexed_header,
    ChangeFrom: _enc_change_from,
    AddRecipient: _enc_add_recipient,
    DeleteRecipient: lambda m: frame("-", _z(m.address, "address")),
    ReplaceBody: _enc_replace_body,
}


def encode(message: Command | Response) -> bytes:
    """The packet bytes for one command or response."""
    try:
        encoder = _ENCODERS[type(message)]
    except KeyError:
        raise LocalProtocolError(f"{message!r} is not a milter message") from None
    return encoder(message)


# ------------------------------------------------------------------- decoding

_M = TypeVar("_M")


def _strings(letter: str, payload: bytes, name: str) -> list[str]:
    """Split a payload made of NUL-terminated strings."""
    if not payload:
        raise RemoteProtocolError(f"{name} ({letter!r}) needs a payload but has none")
    if payload[-1] != 0:
        raise RemoteProtocolError(f"{name} ({letter!r}) payload does not end with NUL")
    return decode_text(payload[:-1]).split("\0")  # NUL is one byte in UTF-8: decoding once is the same


def _exactly(letter: str, payload: bytes, name: str, count: int) -> list[str]:
    parts = _strings(letter, payload, name)
    if len(parts) != count:
        raise RemoteProtocolError(f"{name} ({letter!r}) has {len(parts)} strings, expected {count}")
    return parts


def _empty(cls: type[_M], name: str) -> Callable[[bytes], _M]:
    instance = cls()

    def decode(payload: bytes) -> _M:
        if payload:
            raise RemoteProtocolError(f"{name} ({cls.letter!r}) carries {len(payload)} unexpected bytes")  # type: ignore[attr-defined]
        return instance

    return decode


def _dec_negotiate(payload: bytes) -> Negotiate:
    if len(payload) < _OPTNEG.size:
        raise RemoteProtocolError(f"OPTNEG ('O') has {len(payload)} bytes, needs 12")
    version, actions, protocol = _OPTNEG.unpack_from(payload)
    return Negotiate(version, Action(actions), ProtocolFlag(protocol))


def _dec_negotiate_reply(payload: bytes) -> NegotiateReply:
    if len(payload) < _OPTNEG.size:
        raise RemoteProtocolError(f"OPTNEG reply ('O') has {len(payload)} bytes, needs 12")
    version, actions, protocol = _OPTNEG.unpack_from(payload)
    macros: dict[MacroStage, tuple[str, ...]] = {}
    rest = payload[_OPTNEG.size:]
    while rest:
        end = rest.find(b"\0", 4)
        if len(rest) < 5 or end < 0:
            raise RemoteProtocolError("OPTNEG reply ('O') has a truncated macro list")
        (stage_number,) = _U32.unpack_from(rest)
        try:
            stage = MacroStage(stage_number)
        except ValueError:
            raise RemoteProtocolError(
                f"OPTNEG reply ('O') lists macros for unknown stage {stage_number}"
            ) from None
        if stage in macros:
            raise RemoteProtocolError(f"OPTNEG reply ('O') lists macros for {stage.name} twice")
        names = decode_text(rest[4:end]).replace(",", " ").split(" ")
        macros[stage] = tuple(name for name in names if name)
        rest = rest[end + 1:]
    return NegotiateReply(version, Action(actions), ProtocolFlag(protocol), macros)


def _dec_macros(payload: bytes) -> Macros:
    if not payload:
        raise RemoteProtocolError("MACRO ('D') has no command letter")
    command = chr(payload[0])
    if len(payload) == 1:
        return Macros(command)
    # Damage is tolerated as libmilter tolerates it: the whole name/value pairs are kept.
    damage = []
    body = payload[1:]
    if body[-1] != 0:
        damage.append("the last string does not end with NUL")
        body = body[: body.rfind(b"\0") + 1]
    parts = [decode_text(part) for part in body[:-1].split(b"\0")] if body else []
    if len(parts) % 2:
        damage.append(f"name {parts[-1]!r} has no value")
        del parts[-1]
    return Macros(command, tuple(zip(parts[::2], parts[1::2], strict=True)), "; ".join(damage))


def _check_address(
    family: Family, address: str, error: type[ProtocolError] = RemoteProtocolError
) -> None:
    """Raise ``error`` unless ``address`` parses as libmilter would for ``family``."""
    text = address
    if family is Family.INET6 and text[:5].lower() == "ipv6:":
        text = text[5:]
    if family is Family.INET:
        try:
            socket.inet_pton(socket.AF_INET, text)  # what it takes, ipaddress takes too; quicker
            return
        except (OSError, ValueError):
            pass  # ipaddress decides (and explains)
    try:
        if family is Family.INET:
            ipaddress.IPv4Address(text)
        elif family is Family.INET6:
            ipaddress.IPv6Address(text)
    except ValueError:
        raise error(f"CONNECT ('C') address {address!r} is not a valid {family.name} address") from None


def _dec_connect(payload: bytes) -> Connect:
    end = payload.find(b"\0")
    if end < 0:
        raise RemoteProtocolError("CONNECT ('C') host name does not end with NUL")
    hostname = decode_text(payload[:end])
    if len(payload) < end + 2:
        raise RemoteProtocolError("CONNECT ('C') has no address family")
    try:
        family = Family(chr(payload[end + 1]))
    except ValueError:
        raise RemoteProtocolError(
            f"CONNECT ('C') has unknown address family {payload[end + 1:end + 2]!r}"
        ) from None
    rest = payload[end + 2:]
    if family is Family.UNKNOWN:
        if rest:
            raise RemoteProtocolError("CONNECT ('C') with family 'U' carries an address")
        return Connect(hostname, family)
    if len(rest) < 3:
        raise RemoteProtocolError("CONNECT ('C') is missing its port or address")
    (port,) = _U16.unpack_from(rest)
    (address,) = _exactly("C", rest[2:], "CONNECT address", 1)
    _check_address(family, address)
    return Connect(hostname, family, port, address)


def _dec_envelope(cls: type[MailFrom] | type[RcptTo], name: str) -> Callable[[bytes], MailFrom | RcptTo]:
    def decode(payload: bytes) -> MailFrom | RcptTo:
        address, *args = _strings(cls.letter, payload, name)
        return cls(address, tuple(args))

    return decode


def _dec_header(payload: bytes) -> Header:
    name, value = _exactly("L", payload, "HEADER", 2)
    if not name:
        raise RemoteProtocolError("HEADER ('L') has an empty name")
    return Header(name, value)


def _dec_body(payload: bytes) -> BodyChunk:
    if not payload:
        raise RemoteProtocolError("BODY ('B') needs a payload but has none")
    return BodyChunk(payload)


def _dec_single(cls: Callable[[str], _M], letter: str, name: str) -> Callable[[bytes], _M]:
    def decode(payload: bytes) -> _M:
        (text,) = _exactly(letter, payload, name, 1)
        return cls(text)

    return decode


_COMMAND_DECODERS: Mapping[str, Callable[[bytes], Command]] = {
    "O": _dec_negotiate,
    "D": _dec_macros,
    "C": _dec_connect,
    "H": _dec_single(Helo, "H", "HELO"),
    "M": _dec_envelope(MailFrom, "MAIL"),
    "R": _dec_envelope(RcptTo, "RCPT"),
    "T": _empty(Data, "DATA"),
    "L": _dec_header,
    "N": _empty(EndOfHeaders, "EOH"),
    "B": _dec_body,
    "E": EndOfMessage,
    "U": _dec_single(Unknown, "U", "UNKNOWN"),
    "A": _empty(Abort, "ABORT"),
    "Q": _empty(Quit, "QUIT"),
    "K": _empty(QuitNoClose, "QUIT_NC"),
}


#: The decoder of each command letter (``decode_command`` without the unknown-letter error).
COMMAND_DECODERS = _COMMAND_DECODERS


def decode_command(letter: str, payload: bytes) -> Command:
    """The command an MTA sent in one frame."""
    try:
        decoder = _COMMAND_DECODERS[letter]
    except KeyError:
        raise RemoteProtocolError(f"unknown command {letter!r}") from None
    return decoder(payload)


_REPLY_CODE = re.compile(r"[0-9]{3}")


def parse_reply(text: str) -> Reject | TempFail:
    """The Reject or TempFail that a REPLYCODE text stands for."""
    lines = text.split("\r\n")
    code = lines[0][:3]
    status: str | None = None
    texts = []
    for number, line in enumerate(lines):
        marker = " " if number == len(lines) - 1 else "-"
        if line[:3] != code or not _REPLY_CODE.fullmatch(code) or line[3:4] not in (marker, ""):
            raise RemoteProtocolError(f"REPLYCODE ('y') line {line!r} does not continue reply {code!r}")
        words = line[4:]
        first, _, after = words.partition(" ")
        if number == 0:
            status = first if ENHANCED_STATUS.fullmatch(first) and first[0] == code[0] else ""
        if status:
            if first != status:
                raise RemoteProtocolError(f"REPLYCODE ('y') line {line!r} drops enhanced status {status}")
            words = after
        texts.append(_unescape_percent(words))
    cls = Reject if code[:1] == "5" else TempFail
    try:
        return cls(tuple(texts), int(code), status)
    except InvalidReplyError as e:
        raise RemoteProtocolError(f"REPLYCODE ('y') {text!r}: {e}") from None


def _unescape_percent(text: str) -> str:
    pieces = text.split("%%")
    if any("%" in piece for piece in pieces):
        raise RemoteProtocolError(f"REPLYCODE ('y') text {text!r} has a lone '%'")
    return "%".join(pieces)


def _dec_reply(payload: bytes) -> Reject | TempFail:
    (text,) = _exactly("y", payload, "REPLYCODE", 1)
    return parse_reply(text)


def _dec_indexed(cls: type[InsertHeader] | type[ChangeHeader], name: str) -> Callable[[bytes], Response]:
    def decode(payload: bytes) -> Response:
        if len(payload) < 4:
            raise RemoteProtocolError(f"{name} ({cls.letter!r}) has no index")
        (index,) = _U32.unpack_from(payload)
        header, value = _exactly(cls.letter, payload[4:], name, 2)
        if not header:
            raise RemoteProtocolError(f"{name} ({cls.letter!r}) has an empty header name")
        return cls(index, header, value)

    return decode


def _dec_add_header(payload: bytes) -> AddHeader:
    name, value = _exactly("h", payload, "ADDHEADER", 2)
    if not name:
        raise RemoteProtocolError("ADDHEADER ('h') has an empty header name")
    return AddHeader(name, value)


def _split_args(text: str) -> tuple[str, ...]:
    return tuple(arg for arg in text.split(" ") if arg)


def _dec_change_from(payload: bytes) -> ChangeFrom:
    parts = _strings("e", payload, "CHGFROM")
    if len(parts) > 2:
        raise RemoteProtocolError(f"CHGFROM ('e') has {len(parts)} strings, at most 2")
    return ChangeFrom(parts[0], _split_args(parts[1]) if len(parts) == 2 else None)


def _dec_add_rcpt_par(payload: bytes) -> AddRecipient:
    parts = _strings("2", payload, "ADDRCPT_PAR")
    if len(parts) > 2:
        raise RemoteProtocolError(f"ADDRCPT_PAR ('2') has {len(parts)} strings, at most 2")
    return AddRecipient(parts[0], _split_args(parts[1]) if len(parts) == 2 else ())


def _dec_quarantine(payload: bytes) -> Quarantine:
    (reason,) = _exactly("q", payload, "QUARANTINE", 1)
    if not reason:
        raise RemoteProtocolError("QUARANTINE ('q') has an empty reason")
    return Quarantine(reason)


_RESPONSE_DECODERS: Mapping[str, Callable[[bytes], Response]] = {
    "O": _dec_negotiate_reply,
    "c": _empty(Continue, "CONTINUE"),
    "a": _empty(Accept, "ACCEPT"),
    "r": _empty(Reject, "REJECT"),
    "t": _empty(TempFail, "TEMPFAIL"),
    "d": _empty(Discard, "DISCARD"),
    "s": _empty(Skip, "SKIP"),
    "4": _empty(Shutdown, "SHUTDOWN"),
    "f": _empty(ConnectionFail, "CONN_FAIL"),
    "p": _empty(Progress, "PROGRESS"),
    "y": _dec_reply,
    "q": _dec_quarantine,
    "h": _dec_add_header,
    "i": _dec_indexed(InsertHeader, "INSHEADER"),
    "m": _dec_indexed(ChangeHeader, "CHGHEADER"),
    "e": _dec_change_from,
    "+": _dec_single(AddRecipient, "+", "ADDRCPT"),
    "2": _dec_add_rcpt_par,
    "-": _dec_single(DeleteRecipient, "-", "DELRCPT"),
    "b": ReplaceBody,
}


def decode_response(letter: str, payload: bytes) -> Response:
    """The response a milter sent in one frame."""
    try:
        decoder = _RESPONSE_DECODERS[letter]
    except KeyError:
        raise RemoteProtocolError(f"unknown response {letter!r}") from None
    return decoder(payload)


