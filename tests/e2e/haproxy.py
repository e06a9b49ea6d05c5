"""A private HAProxy on loopback in TCP mode, balancing milter connections over daemons it health-checks."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .milterd import is_listening
from .postfix import free_port

__all__ = ["OPTNEG_CHECK", "HAProxy", "haproxy", "haproxy_available"]

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
#: The health check: send an option negotiation (version 6, every action and protocol bit) and expect an
#: option negotiation back (its fifth byte is 'O'), so a server is up only while a milter answers there.
OPTNEG_CHECK = (
    "    option tcp-check\n"
    "    tcp-check connect\n"
    "    tcp-check send-binary 0000000d4f00000006000001ff001fffff\n"
    "    tcp-check expect rbinary ^[0-9A-F]{8}4F\n"
)


def haproxy_available() -> str | None:
    """A reason to skip the HAProxy tests, or None if they can run."""
    if shutil.which("haproxy", path=_SEARCH_PATH) is None:
        return "HAProxy is not installed; run .ci/install-postfix.sh"
    return None


class HAProxy:
    """``haproxy -db -f CONF``: a TCP frontend on 127.0.0.1 and a round-robin backend of milter daemons.

    A server is checked every ``interval`` milliseconds and marked down after one failed check;
    a connection that cannot reach its server is tried on another one (``option redispatch``).
    """

    def __init__(self, servers: Sequence[tuple[str, int]], *, interval: int = 200) -> None:
        self.servers = list(servers)
        self.interval = interval
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="txmilt-haproxy-"))
        self.config_path = self.directory / "haproxy.cfg"
        self.stats_path = self.directory / "admin.sock"
        self.log_path = self.directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        """Its address in Postfix's notation, for ``smtpd_milters``."""
        return f"inet:127.0.0.1:{self.port}"

    def config_text(self) -> str:
        """haproxy.cfg."""
        servers = "".join(
            f"    server {string.ascii_lowercase[index]} {host}:{port} check\n"
            for index, (host, port) in enumerate(self.servers)
        )
        return (
            "global\n"
            "    log stdout format raw local0 info\n"
            f"    stats socket {self.stats_path} mode 600 level admin\n"
            "defaults\n"
            "    mode tcp\n"
            "    log global\n"
            "    option tcplog\n"
            "    timeout connect 1s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    retries 2\n"
            "    option redispatch 1\n"
            "frontend milter\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    default_backend txmilt\n"
            "backend txmilt\n"
            "    balance roundrobin\n"
            f"{OPTNEG_CHECK}"
            f"    default-server inter {self.interval}ms fall 1 rise 1\n"
            f"{servers}"
        )

    def start(self, timeout: float = 15.0) -> HAProxy:
        """Start HAProxy and wait until it listens and every server is up."""
        self.config_path.write_text(self.config_text(), encoding="ascii")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(shutil.which("haproxy", path=_SEARCH_PATH)), "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not (is_listening(self.port) and self.stats_path.exists() and set(self.states().values()) == {"UP"}):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"HAProxy did not start with every server up:\n{self.output()}")
            time.sleep(0.05)
        return self

    def states(self) -> dict[str, str]:
        """Each server's state ("UP", "DOWN", ...), from the stats socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stats:
            stats.settimeout(5)
            stats.connect(str(self.stats_path))
            stats.sendall(b"show stat\n")
            data = b""
            while chunk := stats.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "txmilt"
                and row["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_for(self, server: str, state: str, timeout: float = 10.0) -> None:
        """Wait until ``server`` ("a", "b") is in ``state``."""
        deadline = time.monotonic() + timeout
        while self.states().get(server) != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {server} is not {state}: {self.states()}\n{self.output()[-2000:]}")
            time.sleep(0.05)

    def output(self) -> str:
        """What HAProxy logged."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop HAProxy (it exits at once on SIGTERM) and remove its files (unless $TXMILT_E2E_KEEP is set)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        if not os.environ.get("TXMILT_E2E_KEEP"):
            shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def haproxy(servers: Sequence[tuple[str, int]]) -> Iterator[HAProxy]:
    """A started HAProxy in front of ``servers``, stopped afterwards."""
    proxy = HAProxy(servers)
    try:
        yield proxy.start()
    finally:
        proxy.stop()
