#!/usr/bin/env python3
"""txmilt's own work per message, without sockets or a reactor: CPU time and instruction counts.

    python3 bench/hotpath.py                      # µs of CPU per message and per command, W1 and W2
    python3 bench/hotpath.py --callgrind          # instructions per message (valgrind; repeatable under load)
    python3 bench/hotpath.py --profile W1         # cProfile of W1, top functions

Each session is what the load driver (bench/driver.c) and Postfix send: OPTNEG,
macros + CONNECT, HELO, MAIL, RCPT, DATA, 10 headers, EOH, the body in 65535-byte
BODY packets, end of message, ABORT, QUIT, each command's bytes handed to
``MilterProtocol.dataReceived`` as one socket read (at most 65536 bytes), the
replies collected by a transport that only keeps them. One message per session,
as W1 c=32 and W2 run, so connection set-up and teardown are counted too.
The filter is ``bench.filters.BenchFilter``, as in the socket benchmarks.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from txmilt import messages as m  # noqa: E402
from txmilt.codec import encode  # noqa: E402
from txmilt.protocol import MilterFactory  # noqa: E402

#: Socket reads are at most this long (Twisted's read size).
READ_SIZE = 65536
W1_BODY = 2048
W2_BODY = 1 << 20
HEADER_NAMES = (
    "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
    "Content-Transfer-Encoding", "X-Mailer", "Reply-To",
)
QUEUE_ID = "4BvZ7Q2x9Kz1"


def session_reads(body_size: int, headers: int = 10) -> list[bytes]:
    """The socket reads of one session, as the driver sends them (macros and command in one write)."""
    queue = (("i", QUEUE_ID),)
    steps: list[bytes] = [encode(m.Negotiate(6, m.Action(0x1FF), m.ProtocolFlag(0x1FFFFF)))]

    def step(macros: m.Macros | None, command: Any) -> None:
        steps.append((encode(macros) if macros is not None else b"") + encode(command))

    step(m.Macros("C", (("j", "mx.example.net"), ("{daemon_name}", "mx.example.net"), ("{daemon_addr}", "127.0.0.1"),
                      ("v", "Postfix 3.7.11"), ("_", "client.example.com [192.0.2.10]"))),
         m.Connect("client.example.com", m.Family.INET, 54321, "192.0.2.10"))
    step(m.Macros("H"), m.Helo("client.example.com"))
    step(m.Macros("M", (("{mail_addr}", "sender@example.com"), ("{mail_host}", "example.com"),
                      ("{mail_mailer}", "smtp"))),
         m.MailFrom("<sender@example.com>", ("BODY=8BITMIME", f"SIZE={body_size + 60 * headers}")))
    step(m.Macros("R", (("i", QUEUE_ID), ("{rcpt_addr}", "rcpt1@example.net"), ("{rcpt_host}", "example.net"),
                      ("{rcpt_mailer}", "smtp"))),
         m.RcptTo("<rcpt1@example.net>"))
    step(m.Macros("T", queue), m.Data())
    for number in range(headers):
        name = HEADER_NAMES[number % len(HEADER_NAMES)]
        value = f"value of header {number} for the benchmark <x{number}@example.com>"
        step(m.Macros("L", queue), m.Header(name, value))
    step(m.Macros("N", queue), m.EndOfHeaders())
    lines = (bytes(ord("a") + (row + column) % 26 for column in range(76)) + b"\r\n" for row in range(26))
    page = b"".join(lines)  # 26 lines of 78 bytes, then the letters repeat, as in the driver's body
    body = (page * (body_size // len(page) + 1))[:body_size]
    for at in range(0, body_size, 65535):
        step(m.Macros("B", queue), m.BodyChunk(body[at:at + 65535]))
    step(m.Macros("E", queue), m.EndOfMessage())
    step(None, m.Abort())
    step(None, m.Quit())
    reads = []
    for data in steps:
        reads.extend(data[at:at + READ_SIZE] for at in range(0, len(data), READ_SIZE))
    return reads


class KeepingTransport(StringTransport):
    """Keeps each write (the replies), and counts them; nothing else."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.io.write(data)


def make_factory() -> MilterFactory:
    """The factory the daemon would build for ``--filter bench.filters:BenchFilter``."""
    from bench.filters import BenchFilter

    return MilterFactory([BenchFilter], Clock())


def run_sessions(factory: MilterFactory, reads: Sequence[bytes], sessions: int) -> bytes:
    """Serve ``sessions`` sessions of ``reads``; the replies of the last one."""
    replies = b""
    for _ in range(sessions):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        transport = KeepingTransport()
        protocol.makeConnection(transport)
        for data in reads:
            protocol.dataReceived(data)
        protocol.connectionLost()
        replies = transport.io.getvalue()
    return replies


def check(replies: bytes) -> None:
    """The replies must be what the driver checks: continues, one X-Bench header, then continue."""
    if b"hX-Bench\x001\x00" not in replies or not replies.endswith(b"\x00\x00\x00\x01c"):
        raise SystemExit(f"unexpected replies: {replies[-60:]!r}")


WORKLOADS = {"W1": W1_BODY, "W2": W2_BODY}


def answered(workload: str, headers: int = 10) -> int:
    """Commands answered per session: OPTNEG, CONNECT, HELO, MAIL, RCPT, DATA, headers, EOH, chunks, EOB."""
    return 8 + headers + -(-WORKLOADS[workload] // 65535)


def timed(workload: str, seconds: float) -> float:
    """Best µs of CPU per session (one message) over repeated batches within ``seconds``."""
    reads = session_reads(WORKLOADS[workload])
    factory = make_factory()
    check(run_sessions(factory, reads, 50))
    batch = 200 if workload == "W1" else 5
    best = float("inf")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.process_time()
        run_sessions(factory, reads, batch)
        best = min(best, (time.process_time() - start) / batch * 1e6)
    return best


def callgrind_count(workload: str, sessions: int) -> int:
    """Instructions callgrind counts for the whole process serving ``sessions`` sessions."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=yes",
                   sys.executable, __file__, "--run", workload, str(sessions)]
        env = dict(os.environ, PYTHONHASHSEED="0")
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        match = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode or not match:
            raise SystemExit(f"callgrind failed: {done.stderr[-500:]}")
        return int(match.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callgrind", action="store_true", help="instructions per message (needs valgrind)")
    parser.add_argument("--profile", metavar="WORKLOAD", choices=sorted(WORKLOADS), help="cProfile one workload")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing: seconds per workload (default 3)")
    parser.add_argument("--per-command", action="store_true", help="print only µs per command (for run.py)")
    parser.add_argument("--run", nargs=2, metavar=("WORKLOAD", "SESSIONS"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.run:
        workload, sessions = options.run
        reads = session_reads(WORKLOADS[workload])
        check(run_sessions(make_factory(), reads, int(sessions)))
        return 0
    if options.profile:
        reads = session_reads(WORKLOADS[options.profile])
        factory = make_factory()
        run_sessions(factory, reads, 20)
        profiler = cProfile.Profile()
        profiler.enable()
        run_sessions(factory, reads, 2000 if options.profile == "W1" else 40)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0
    for workload in WORKLOADS:
        commands = answered(workload)
        if options.callgrind:
            few, many = (20, 60) if workload == "W1" else (2, 6)
            per_message = (callgrind_count(workload, many) - callgrind_count(workload, few)) / (many - few)
            print(f"{workload}: {per_message / 1e6:.3f} M instructions per message,"
                  f" {per_message / commands / 1e3:.1f} k per command"
                  f" ({commands} commands; callgrind, {many} - {few} sessions)")
        elif options.per_command:
            print(f"{workload}: {timed(workload, options.seconds) / commands:.1f}")
        else:
            micros = timed(workload, options.seconds)
            print(f"{workload}: {micros:.0f} µs CPU per message, {micros / commands:.1f} per command"
                  f" ({commands} commands; best of batches over {options.seconds:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
