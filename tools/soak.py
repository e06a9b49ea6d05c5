"""Soak test: many messages through a ``twistd milter`` process, watching its memory and file descriptors.

Starts ``twistd -n milter`` with a three-filter chain (word rejecter, disclaimer,
header stamp) on a loopback port, then drives it from several processes, each
keeping its share of ``--connections`` busy with whole Postfix-style messages
(``--per-connection`` messages, then QUIT and a new connection). Every
``--sample`` seconds it records the milter's RSS (``/proc/PID/status`` VmRSS)
and open file descriptors (``/proc/PID/fd``), and at the end prints them at the
start, after warm-up, in the middle and at the end, with the growth after
warm-up.

    python3 tools/soak.py                       # one million messages
    python3 tools/soak.py --messages 50000      # a quick run
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from txmilt.messages import (  # noqa: E402 - after the path is set
    Abort,
    AddHeader,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Macros,
    MailFrom,
    Negotiate,
    NegotiateReply,
    Progress,
    Quit,
    RcptTo,
    Reject,
    ReplaceBody,
    Response,
    Skip,
)
from txmilt.session import NEED_DATA, Disconnected, MTASession  # noqa: E402

TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]

CONFIG = """
[daemon]
listen = ["tcp:{port}:interface=127.0.0.1"]
max_connections = {max_connections}

[[filter]]
name = "words"
class = "examples.word_rejecter:WordRejecter"

[[filter]]
name = "disclaimer"
class = "examples.disclaimer:Disclaimer"

[[filter]]
name = "stamp"
class = "examples.header_stamp:HeaderStamp"
"""

BODY = b"Hello,\r\n\r\n" + b"This is a perfectly ordinary line of a perfectly ordinary message.\r\n" * 15
SPAM_EVERY = 25  # every 25th message mentions the casino in its body and is rejected


# ------------------------------------------------------------------- the MTA


def message_commands(number: int) -> list[Command]:
    """One message as Postfix sends it, with its macro packets."""
    body = BODY + (b"Visit our casino tonight!\r\n" if number % SPAM_EVERY == 0 else b"")
    return [
        Macros("M", (("i", "4ABCDEF"), ("{mail_addr}", "alice@example.org"))),
        MailFrom("<alice@example.org>", ("SIZE=2048",)),
        Macros("R", (("i", "4ABCDEF"), ("{rcpt_addr}", "bob@example.com"))),
        RcptTo("<bob@example.com>"),
        Data(),
        Header("From", " Alice <alice@example.org>"),
        Header("To", " Bob <bob@example.com>"),
        Header("Subject", f" soak message {number}"),
        Header("Content-Type", " text/plain; charset=us-ascii"),
        Header("Message-ID", f" <{number}.soak@example.org>"),
        EndOfHeaders(),
        BodyChunk(body),
        EndOfMessage(),
        Abort(),
    ]


# Commands that end the message when refused (RCPT refuses one recipient only).
_MESSAGE_LEVEL = (MailFrom, Data, Header, EndOfHeaders, BodyChunk)


class Connection:
    """One MTA connection: a queue of commands, sent as replies come back."""

    def __init__(self, address: tuple[str, int], messages: int, first: int) -> None:
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.session = MTASession()
        self.queue: deque[Command] = deque([
            Negotiate(),
            Macros("C", (("j", "mx.example.com"), ("{client_addr}", "192.0.2.25"))),
            Connect("client.example.org", Family.INET, 40000, "192.0.2.25"),
            Helo("client.example.org"),
        ])
        for number in range(first, first + messages):
            self.queue.extend(message_commands(number))
        self.queue.append(Quit())
        self.outgoing = b""
        self.last: Command | None = None
        self.delivered = 0
        self.rejected = 0
        self.bad: list[str] = []
        self.done = False

    def pump(self) -> None:
        """Send commands until one needs a reply."""
        out = []
        while self.queue and not self.session.reply_due:
            command = self.queue.popleft()
            if not isinstance(command, Macros) and not self.session.wants(type(command)):
                continue
            out.append(self.session.send(command))
            self.last = command
        self.outgoing += b"".join(out)
        self.flush()

    def flush(self) -> None:
        while self.outgoing:
            try:
                sent = self.sock.send(self.outgoing)
            except BlockingIOError:
                return
            self.outgoing = self.outgoing[sent:]

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:  # closed by the milter (after QUIT, the session hands out no Disconnected)
            self.done = True
            if self.queue or self.session.reply_due:
                self.bad.append(f"milter closed the connection with {len(self.queue)} commands left")
            return
        self.session.receive_data(data)
        while True:
            event = self.session.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Disconnected):
                self.done = True
                if self.queue:
                    self.bad.append(f"milter closed the connection with {len(self.queue)} commands left")
                return
            self.answered(event)
        self.pump()

    def answered(self, response: Response) -> None:
        command = self.last
        if isinstance(response, NegotiateReply | Progress | AddHeader | ReplaceBody):
            return
        if isinstance(command, EndOfMessage):
            if isinstance(response, Continue):
                self.delivered += 1
            else:
                self.bad.append(f"end of message answered {response!r}")
            return
        if isinstance(response, Continue | Skip):
            if isinstance(response, Skip):
                self._drop_until(EndOfMessage)
            return
        if isinstance(response, Reject) and isinstance(command, _MESSAGE_LEVEL):
            self.rejected += 1
            self._drop_until(Abort)
            return
        self.bad.append(f"{command!r} answered {response!r}")

    def _drop_until(self, kind: type) -> None:
        while self.queue and not isinstance(self.queue[0], kind):
            self.queue.popleft()


def drive(
    address: tuple[str, int], connections: int, quota: int, per_connection: int, first: int,
    progress: Any, stop: Any,
) -> None:
    """One load-generator process: ``connections`` busy connections until ``quota`` messages are done."""
    selector = selectors.DefaultSelector()
    started = 0
    number = first
    finished = {"messages": 0}
    errors: list[str] = []

    def open_one() -> None:
        nonlocal started, number
        count = min(per_connection, quota - started)
        if count <= 0:
            return
        started += count
        conn = Connection(address, count, number)
        number += count
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        conn.pump()

    for _ in range(connections):
        open_one()
    while selector.get_map() and not stop.value:
        for key, _ in selector.select(timeout=1.0):
            conn: Connection = key.data
            conn.readable()
            if conn.done:
                selector.unregister(conn.sock)
                conn.sock.close()
                done = conn.delivered + conn.rejected
                errors.extend(conn.bad)
                finished["messages"] += done
                with progress.get_lock():
                    progress.value += done
                open_one()
    if errors:
        print(f"driver {os.getpid()}: {len(errors)} problems, first: {errors[:3]}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- the milter


def start_milter(directory: Path, connections: int) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = directory / "soak.toml"
    config.write_text(CONFIG.format(port=port, max_connections=connections * 4 + 100))
    log = (directory / "twistd.log").open("wb")
    process = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", f"--logfile={directory / 'twistd.log'}", "milter", "--config", str(config)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"twistd exited:\n{(directory / 'twistd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("twistd did not start listening within 30 s")


@dataclass
class Sample:
    seconds: float
    messages: int
    rss_kib: int
    fds: int


def sample(pid: int, started: float, messages: int) -> Sample:
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Sample(time.monotonic() - started, messages, rss, len(os.listdir(f"/proc/{pid}/fd")))


def at(samples: list[Sample], messages: float) -> Sample:
    """The first sample taken once ``messages`` were done."""
    return next((s for s in samples if s.messages >= messages), samples[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=32, help="connections kept busy at once")
    parser.add_argument("--per-connection", type=int, default=20, help="messages per connection")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the messages counted as warm-up")
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="txmilt-soak-"))
    process, port = start_milter(directory, args.connections)
    progress = multiprocessing.Value("q", 0)
    stop = multiprocessing.Value("b", 0)
    workers = []
    share = args.messages // args.workers
    for number in range(args.workers):
        quota = share + (args.messages - share * args.workers if number == 0 else 0)
        conns = args.connections // args.workers + (1 if number < args.connections % args.workers else 0)
        worker = multiprocessing.Process(
            target=drive,
            args=(("127.0.0.1", port), conns, quota, args.per_connection, number * 10**9, progress, stop),
        )
        workers.append(worker)
    started = time.monotonic()
    samples = [sample(process.pid, started, 0)]
    print(f"milter pid {process.pid} on 127.0.0.1:{port}; logs in {directory}", flush=True)
    print(f"{'seconds':>8} {'messages':>10} {'msg/s':>7} {'RSS MiB':>8} {'fds':>5}", flush=True)
    print(f"{0:>8.0f} {0:>10} {0:>7} {samples[0].rss_kib / 1024:>8.1f} {samples[0].fds:>5}", flush=True)
    for worker in workers:
        worker.start()
    try:
        while any(worker.is_alive() for worker in workers):
            time.sleep(args.sample)
            now = sample(process.pid, started, progress.value)
            previous = samples[-1]
            rate = (now.messages - previous.messages) / max(now.seconds - previous.seconds, 1e-9)
            samples.append(now)
            print(f"{now.seconds:>8.0f} {now.messages:>10} {rate:>7.0f} {now.rss_kib / 1024:>8.1f} {now.fds:>5}",
                  flush=True)
            if process.poll() is not None:
                print("the milter died!", file=sys.stderr)
                stop.value = 1
    except KeyboardInterrupt:
        stop.value = 1
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # let the milter close the last connections
    final = sample(process.pid, started, progress.value)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log = "".join(path.read_text(errors="replace") for path in sorted(directory.glob("twistd.log*")))  # rotated
    problems = [line for line in log.splitlines() if "Traceback" in line or "internal error" in line]
    served = log.count("] connection from ")

    done = progress.value
    warm = at(samples, done * args.warmup)
    middle = at(samples, done / 2)
    end = samples[-1]
    print(f"\n{done} messages in {elapsed:.0f}s ({done / elapsed:.0f}/s) over {args.connections} connections,"
          f" {args.per_connection} messages each, {args.workers} driver processes")
    print(f"{'':>12} {'seconds':>8} {'messages':>10} {'RSS MiB':>8} {'fds':>5}")
    for name, one in (("start", samples[0]), ("warm-up", warm), ("middle", middle), ("end", end),
                      ("idle after", final)):
        print(f"{name:>12} {one.seconds:>8.0f} {one.messages:>10} {one.rss_kib / 1024:>8.1f} {one.fds:>5}")
    growth = (end.rss_kib - warm.rss_kib) / warm.rss_kib * 100 if warm.rss_kib else 0.0
    peak = max(s.rss_kib for s in samples[samples.index(warm):])
    print(f"RSS growth after warm-up: {growth:+.1f}% (peak {peak / 1024:.1f} MiB);"
          f" fds at end {end.fds}, idle after {final.fds} (start {samples[0].fds})")
    print(f"connections served: {served}; log lines with tracebacks or internal errors: {len(problems)}")
    return 0 if done >= args.messages and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
