"""The benchmark filter on pymilter (libmilter bindings): inspect every event, add one header.

Usage: python pymilter_filter.py PORT [HEADER-NAME]
"""

from __future__ import annotations

import sys

import Milter


class BenchMilter(Milter.Base):
    header_name = "X-Bench"

    def __init__(self) -> None:
        self.recipients = self.headers = self.body_bytes = 0

    def connect(self, hostname, family, hostaddr):  # type: ignore[no-untyped-def]
        self.client = hostaddr
        return Milter.CONTINUE

    def hello(self, heloname):  # type: ignore[no-untyped-def]
        self.helo_name = heloname
        return Milter.CONTINUE

    def envfrom(self, sender, *params):  # type: ignore[no-untyped-def]
        self.sender = sender
        self.recipients = self.headers = self.body_bytes = 0
        return Milter.CONTINUE

    def envrcpt(self, recipient, *params):  # type: ignore[no-untyped-def]
        self.recipients += 1
        return Milter.CONTINUE

    def header(self, name, value):  # type: ignore[no-untyped-def]
        self.headers += 1
        return Milter.CONTINUE

    def eoh(self):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def body(self, chunk):  # type: ignore[no-untyped-def]
        self.body_bytes += len(chunk)
        return Milter.CONTINUE

    def eom(self):  # type: ignore[no-untyped-def]
        self.addheader(self.header_name, "1")
        return Milter.CONTINUE


def main() -> None:
    port = int(sys.argv[1])
    if len(sys.argv) > 2:
        BenchMilter.header_name = sys.argv[2]
    Milter.factory = BenchMilter
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("bench", f"inet:{port}@127.0.0.1", timeout=600)


if __name__ == "__main__":
    main()
