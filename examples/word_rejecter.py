"""Refuse mail whose subject or body matches a regular expression, with a multi-line reply."""

from __future__ import annotations

import re
from collections.abc import Sequence

from txmilt import BodyChunk, Header, Milter, Reject, Result, Skip

#: Bytes of body kept across chunk boundaries so a match split over two chunks is still found.
_OVERLAP = 1024


class WordRejecter(Milter):
    """Rejects a message when its Subject or body matches any of ``patterns`` (case-insensitive)."""

    def __init__(
        self,
        patterns: Sequence[str] = ("viagra", r"\bcasino\b", "lottery winner"),
        reply: Sequence[str] = ("Your message looks like spam to us.", "Contact postmaster if this is wrong."),
    ) -> None:
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
        self.binary = re.compile(self.pattern.pattern.encode(), re.IGNORECASE)
        self.reply = tuple(reply)
        self.tail = b""  # per message: cleared in reset()

    def _refuse(self, where: str, found: str) -> Reject:
        lines = (f"Rejected: {where} contains {found!r}.", *self.reply)
        return Reject(lines, code=550, status="5.7.1")

    def header(self, command: Header) -> Result:
        if command.name.lower() == "subject" and (match := self.pattern.search(command.value)):
            return self._refuse("the subject", match.group(0))
        return None

    def body(self, command: BodyChunk) -> Result:
        window = self.tail + command.data
        if match := self.binary.search(window):
            return self._refuse("the body", match.group(0).decode("utf-8", "replace"))
        self.tail = window[-_OVERLAP:]
        return None

    def reset(self) -> Result:
        self.tail = b""
        return None


class SubjectOnlyRejecter(WordRejecter):
    """Like WordRejecter, but reads only the Subject and asks the MTA to skip the body."""

    def body(self, command: BodyChunk) -> Result:
        return Skip()
