"""The end-to-end workload: smtp-source → a real Postfix → smtp-sink, with each milter in ``smtpd_milters``.

Postfix is the private instance the e2e tests start (``tests/e2e/postfix.py``),
with the tests' milter settings (``tests/e2e/bench.py``); smtp-source and
smtp-sink are Postfix's own test programs. Every message is the W1 message
(10 headers, 2 KiB body, one recipient), one per SMTP session. The sink appends
what it receives to a dump file, so every message is checked: delivered, and
carrying the header each milter of the chain adds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.bench import MILTER_MAIN_CF  # noqa: E402
from tests.e2e.postfix import PostfixError, PostfixInstance, free_port, postfix_available  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
#: Marks each benchmark message in the sink's dump.
SUBJECT = "txmilt end-to-end benchmark"
HEADER_NAMES = (
    "From", "To", "Date", "Message-ID", "MIME-Version", "Content-Type",
    "Content-Transfer-Encoding", "X-Mailer", "Reply-To",
)


def unavailable() -> str | None:
    """Why the end-to-end workload cannot run here, or None."""
    reason = postfix_available()
    if reason:
        return reason
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not Path(tool).exists():
            return f"{tool} is missing (Debian's postfix package has it)"
    return None


def message_text(body_size: int = 2048) -> bytes:
    """The W1 message: Subject and nine more headers, then ``body_size`` bytes of 76-character lines."""
    lines = [f"Subject: {SUBJECT}"]
    lines += [f"{name}: value of header {n} for the benchmark <x{n}@example.com>"
              for n, name in enumerate(HEADER_NAMES)]
    lines.append("")
    body = []
    size = 0
    row = 0
    while size < body_size:
        line = "".join(chr(ord("a") + (row + column) % 26) for column in range(76))[: body_size - size]
        body.append(line)
        size += len(line) + 2
        row += 1
    return ("\n".join(lines + body) + "\n").encode("ascii")


@dataclass
class Delivery:
    """One smtp-source run: how long it took and what reached the sink."""

    sessions: int
    messages: int
    seconds: float
    delivered: int
    stamped: int
    source_status: int
    source_error: str


class PostfixRig:
    """A private Postfix in front of smtp-sink, and smtp-source to drive it."""

    def __init__(self, workdir: Path, process_limit: int = 40) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.message = workdir / "message.txt"
        self.message.write_bytes(message_text())
        self.dumps = workdir / "sink"  # smtp-sink writes its dump files here, as the postfix user
        shutil.rmtree(self.dumps, ignore_errors=True)
        self.dumps.mkdir()
        shutil.chown(self.dumps, "postfix")
        self.sink_port = free_port()
        self.sink_log = workdir / "sink.log"
        with open(self.sink_log, "wb") as log:
            self.sink = subprocess.Popen(
                [SMTP_SINK, "-u", "postfix", "-D", str(self.dumps / "dump"), f"127.0.0.1:{self.sink_port}", "256"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        settings = dict(MILTER_MAIN_CF)
        settings.update({
            "default_process_limit": str(process_limit),
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtp_connection_cache_on_demand": "yes",
        })
        self.postfix = PostfixInstance(free_port(), ("127.0.0.1", self.sink_port), main_cf=settings)
        self._read = 0  # how much of the sink's dump file has been counted
        try:
            self.postfix.start()
        except PostfixError:
            self.stop()
            raise

    @property
    def version(self) -> str:
        """The Postfix version."""
        return self.postfix.version

    def use(self, ports: Sequence[int]) -> None:
        """Point ``smtpd_milters`` at these milters, in order (none: no milter)."""
        milters = ", ".join(f"inet:127.0.0.1:{port}" for port in ports)
        self.postfix.set_main_cf({"smtpd_milters": milters})
        time.sleep(0.5)  # let the old smtpd processes go; new ones read the new list

    def source(self, sessions: int, messages: int, within: float = 300.0) -> tuple[float, int, str]:
        """Send ``messages`` over ``sessions`` parallel SMTP sessions: seconds taken, exit status, complaint."""
        command = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-F", str(self.message),
                   "-f", "sender@example.com", "-t", "rcpt@example.net", "-M", "client.example.com",
                   f"127.0.0.1:{self.postfix.smtp_port}"]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=within, stdin=subprocess.DEVNULL)
        return time.monotonic() - started, done.returncode, (done.stderr or done.stdout).strip()[-300:]

    def send(self, sessions: int, messages: int, stamp: str | None, within: float = 120.0) -> Delivery:
        """Send ``messages`` over ``sessions`` parallel SMTP sessions; wait for the sink to have them all."""
        seconds, status, complaint = self.source(sessions, messages, within)
        delivered, stamped = self.collect(messages if status == 0 else None, stamp, within)
        return Delivery(sessions, messages, seconds, delivered, stamped, status, complaint)

    def collect(self, expected: int | None, stamp: str | None, within: float = 120.0) -> tuple[int, int]:
        """Messages, and messages carrying ``stamp: 1``, the sink received since the last call.

        Waits until ``expected`` messages are in (or ``within`` seconds passed).
        """
        deadline = time.monotonic() + within
        marker = f"Subject: {SUBJECT}".encode()
        pattern = re.compile(rb"^" + re.escape(stamp.encode()) + rb": 1\r?$", re.MULTILINE) if stamp else None
        while expected is not None and time.monotonic() < deadline and self._fresh().count(marker) < expected:
            time.sleep(0.05)
        time.sleep(0.2)  # the sink appends a transaction after its reply to the final dot
        fresh = self._fresh()
        self._read += len(fresh)
        delivered = fresh.count(marker)
        stamped = len(pattern.findall(fresh)) if pattern else delivered
        return delivered, stamped

    def _fresh(self) -> bytes:
        """What the sink appended to its dump file since the last collect.

        smtp-sink writes each transaction to a file of its own while it lasts
        and appends it to the dump file (``dump``) when it is over.
        """
        try:
            with open(self.dumps / "dump", "rb") as dump:
                dump.seek(self._read)
                return dump.read()
        except FileNotFoundError:
            return b""

    def idle(self, within: float = 60.0) -> None:
        """Wait until Postfix's queue is empty (the last run's deliveries done)."""
        deadline = time.monotonic() + within
        while self.postfix.queue() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop Postfix and the sink; remove Postfix's directory."""
        try:
            if self.postfix.is_running():
                self.postfix.stop()
            self.postfix.cleanup()
        finally:
            if self.sink.poll() is None:
                self.sink.terminate()
                self.sink.wait(timeout=10)
