"""Append a disclaimer footer to text bodies, leaving signed or alternative MIME bodies intact."""

from __future__ import annotations

import base64
import quopri
import re
from email.message import Message
from email.parser import BytesHeaderParser

from txmilt import Action, BodyChunk, Changes, Header, Milter, Result

_FINAL_BOUNDARY = "--{boundary}--"


class Disclaimer(Milter):
    """Adds ``footer`` to text/plain bodies and as a new part of multipart/mixed bodies.

    Bodies over ``max_body`` bytes, and every other MIME shape (alternative,
    signed, encrypted, HTML only), pass unchanged.
    """

    actions = Action.CHANGE_BODY

    def __init__(self, footer: str = "This message was checked by txmilt.", max_body: int = 10 * 1024 * 1024) -> None:
        self.footer = footer
        self.max_body = max_body
        self.reset()

    def reset(self) -> Result:
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        return None

    def header(self, command: Header) -> Result:
        if command.name.lower() in ("content-type", "content-transfer-encoding", "mime-version"):
            self.headers.append((command.name, command.value))
        return None

    def body(self, command: BodyChunk) -> Result:
        self.size += len(command.data)
        if self.size <= self.max_body:
            self.chunks.append(command.data)
        return None

    def end_of_message(self, changes: Changes) -> Result:
        if self.size <= self.max_body:
            body = b"".join(self.chunks)
            new = self.with_footer(self._head(), body)
            if new is not None and new != body:
                changes.replace_body(new)
        return None

    def _head(self) -> Message:
        text = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return BytesHeaderParser().parsebytes(text.encode("utf-8", "surrogateescape") + b"\r\n")

    def with_footer(self, head: Message, body: bytes) -> bytes | None:
        """The body with the footer added, or None to leave it as it is."""
        kind = head.get_content_type()
        if kind == "text/plain":
            return self._text(head, body)
        if kind == "multipart/mixed":
            return self._mixed(head, body)
        return None

    def _text(self, head: Message, body: bytes) -> bytes | None:
        charset = head.get_content_charset() or "us-ascii"
        try:
            footer = ("\r\n-- \r\n" + self.footer.replace("\n", "\r\n") + "\r\n").encode(charset)
        except (LookupError, UnicodeEncodeError):
            return None
        encoding = str(head.get("content-transfer-encoding", "7bit")).strip().lower()
        separator = b"" if body.endswith(b"\r\n") or not body else b"\r\n"
        if encoding in ("7bit", "8bit", "binary"):
            return body + separator + footer
        if encoding == "quoted-printable":
            return body + separator + quopri.encodestring(footer).replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
        if encoding == "base64":
            try:
                decoded = base64.b64decode(b"".join(body.split()), validate=True)
            except ValueError:
                return None
            encoded = base64.encodebytes(decoded + footer).replace(b"\n", b"\r\n")
            return encoded
        return None

    def _mixed(self, head: Message, body: bytes) -> bytes | None:
        boundary = head.get_boundary()
        if not boundary:
            return None
        closing = re.compile(rb"(?m)^--" + re.escape(boundary.encode("ascii", "replace")) + rb"--[ \t]*\r?$")
        matches = list(closing.finditer(body))
        if not matches:
            return None
        where = matches[-1].start()
        part = (
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\nContent-Disposition: inline\r\n\r\n"
            f"{self.footer}\r\n"
        ).replace("\n", "\r\n").replace("\r\r\n", "\r\n").encode("utf-8")
        return body[:where] + part + body[where:]
