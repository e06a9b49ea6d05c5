"""The message txmilt-check plays: read from an RFC 5322 file or made up, and written back out as bytes."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate, getaddresses, make_msgid
from typing import Final

from txmilt.conversation import raw_header_value
from txmilt.errors import ConfigurationError

__all__ = [
    "MessageFileError",
    "Text",
    "angle_address",
    "header_addresses",
    "made_up_message",
    "parse_message",
    "render_message",
]

# A header field name: printable US-ASCII except the colon (RFC 5322 section 2.2).
_FIELD_NAME: Final = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_SHOWN: Final = 60


class MessageFileError(ConfigurationError):
    """The message file cannot be read, or is not an RFC 5322 message."""


@dataclass(frozen=True)
class Text:
    """A message as an MTA hands it to milters.

    Header values are kept without the one space after the colon, folded
    lines joined by a bare LF (``("Subject", "Hello")`` for ``Subject: Hello``);
    the body has CRLF line ends.
    """

    headers: tuple[tuple[str, str], ...]
    body: bytes


def _shown(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def parse_message(data: bytes, source: str = "the message") -> Text:
    """The headers and body of an RFC 5322 message (CRLF or LF line ends); MessageFileError if it is none.

    Headers end at the first empty line. A line that is neither ``Name: value``
    nor a continuation (starting with a space or tab) of the header before it
    is an error, so a file that is not a message is caught on its first line.
    """
    if not data.strip():
        raise MessageFileError(f"{source} is empty")
    lines = data.split(b"\n")
    fields: list[tuple[bytes, bytes]] = []
    body_start = len(lines)
    for number, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            body_start = number
            break
        where = f"{source}, line {number}"
        if b"\r" in line or b"\0" in line:
            raise MessageFileError(f"{where}: a header holds a bare CR or a NUL byte, which no MTA passes on")
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise MessageFileError(f"{where}: {_shown(line)} continues a header, but no header comes before it")
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise MessageFileError(
                f"{where}: {_shown(line)} is not a header field (Name: value); an empty line must come before"
                " the body"
            )
        fields.append((name, value[1:] if value.startswith(b" ") else value))
    body = b"\n".join(lines[body_start:])
    headers = tuple((name.decode("ascii"), value.decode("utf-8", "surrogateescape")) for name, value in fields)
    return Text(headers, re.sub(rb"\r?\n", b"\r\n", body))


def made_up_message(sender: str, recipients: Sequence[str]) -> Text:
    """A small message from ``sender`` to ``recipients`` (bare addresses), dated now."""
    headers = (
        ("From", sender or "<>"),
        ("To", ", ".join(recipients)),
        ("Subject", "txmilt-check test message"),
        ("Date", formatdate(localtime=True)),
        ("Message-ID", make_msgid(domain="txmilt-check.invalid")),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=us-ascii"),
    )
    body = b"This message was sent by txmilt-check to see what a milter does with it.\r\n"
    return Text(headers, body)


def render_message(headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """The message as the MTA would store it: headers with CRLF line ends, an empty line, the body."""
    lines = [
        f"{name}:{raw_header_value(value)}".replace("\n", "\r\n").encode("utf-8", "surrogateescape")
        for name, value in headers
    ]
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def header_addresses(headers: Iterable[tuple[str, str]], names: Sequence[str]) -> list[str]:
    """The addresses in the headers called ``names`` (any case), in order."""
    wanted = {name.lower() for name in names}
    values = [value for name, value in headers if name.lower() in wanted]
    return [address for _, address in getaddresses(values) if address]


def angle_address(address: str) -> str:
    """An envelope address as SMTP spells it, in angle brackets (``<>`` for the null sender)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address
    return f"<{address}>"
