"""The benchmark filter on python-libmilter (pure Python, a thread per connection).

Usage: python libmilter_filter.py PORT [HEADER-NAME]
"""

from __future__ import annotations

import sys

import libmilter as lm

HEADER_NAME = b"X-Bench"


class BenchMilter(lm.ThreadMixin, lm.MilterProtocol):  # type: ignore[misc]
    def __init__(self, opts: int = 0, protos: int = 0) -> None:
        lm.MilterProtocol.__init__(self, opts, protos)
        lm.ThreadMixin.__init__(self)
        self.recipients = self.headers = self.body_bytes = 0

    def connect(self, hostname, family, ip, port, cmdDict):  # type: ignore[no-untyped-def]  # noqa: N803
        self.client = ip
        return lm.CONTINUE

    def helo(self, heloname):  # type: ignore[no-untyped-def]
        self.helo_name = heloname
        return lm.CONTINUE

    def mailFrom(self, frAddr, cmdDict):  # type: ignore[no-untyped-def]  # noqa: N802, N803
        self.sender = frAddr
        self.recipients = self.headers = self.body_bytes = 0
        return lm.CONTINUE

    def rcpt(self, recip, cmdDict):  # type: ignore[no-untyped-def]  # noqa: N803
        self.recipients += 1
        return lm.CONTINUE

    def header(self, key, val, cmdDict):  # type: ignore[no-untyped-def]  # noqa: N803
        self.headers += 1
        return lm.CONTINUE

    def eoh(self, cmdDict):  # type: ignore[no-untyped-def]  # noqa: N803
        return lm.CONTINUE

    def body(self, chunk, cmdDict):  # type: ignore[no-untyped-def]  # noqa: N803
        self.body_bytes += len(chunk)
        return lm.CONTINUE

    def eob(self, cmdDict):  # type: ignore[no-untyped-def]  # noqa: N803
        self.addHeader(HEADER_NAME, b"1")
        return lm.CONTINUE

    def close(self):  # type: ignore[no-untyped-def]
        pass

    def abort(self):  # type: ignore[no-untyped-def]
        pass


def main() -> None:
    global HEADER_NAME
    port = int(sys.argv[1])
    if len(sys.argv) > 2:
        HEADER_NAME = sys.argv[2].encode()
    factory = lm.ThreadFactory(f"inet:127.0.0.1:{port}", BenchMilter, lm.SMFIF_ADDHDRS, listenq=1024)
    factory.run()


if __name__ == "__main__":
    main()
