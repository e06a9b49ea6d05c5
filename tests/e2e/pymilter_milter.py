"""A small pymilter (libmilter) milter for txmilt-check's tests: stamps each message, refuses on a word.

Usage: python pymilter_milter.py PORT. It adds ``X-Pymilter: <n> headers from <client address>``
at end of message, and rejects with ``550 5.7.1 pymilter says no`` when the Subject contains "reject".
"""

from __future__ import annotations

import sys
from typing import Any

import Milter  # type: ignore[import-not-found,unused-ignore]


class Stamp(Milter.Base):  # type: ignore[misc,unused-ignore]
    """Counts the headers, remembers the client and the Subject."""

    def __init__(self) -> None:
        self.client = "?"
        self.subject = ""
        self.headers = 0

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.client = hostaddr[0] if isinstance(hostaddr, tuple) else str(hostaddr)
        return int(Milter.CONTINUE)

    def envfrom(self, sender: str, *params: str) -> int:
        self.subject, self.headers = "", 0
        return int(Milter.CONTINUE)

    def header(self, name: str, value: str) -> int:
        self.headers += 1
        if name.lower() == "subject":
            self.subject = value
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        if "reject" in self.subject.lower():
            self.setreply("550", "5.7.1", "pymilter says no")
            return int(Milter.REJECT)
        self.addheader("X-Pymilter", f"{self.headers} headers from {self.client}")
        return int(Milter.CONTINUE)


def main() -> None:
    port = int(sys.argv[1])
    Milter.factory = Stamp
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("txmilt-check-test", f"inet:{port}@127.0.0.1", timeout=60)


if __name__ == "__main__":
    main()
