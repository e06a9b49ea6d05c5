"""``twistd milter`` as a real process: listening, serving, metrics, config errors and draining on SIGTERM."""

from __future__ import annotations

import errno
import grp
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from txmilt.messages import (
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
    Response,
)
from txmilt.session import NEED_DATA, Disconnected, MTASession

ROOT = Path(__file__).resolve().parents[2]
#: Runs twistd with this interpreter (the ``twistd`` script may belong to another Python).
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
STARTUP_TIMEOUT = 15.0
#: twistd with prometheus_client unimportable, as after ``pip install .`` without the metrics extra.
TWISTD_WITHOUT_METRICS = [
    sys.executable, "-c",
    "import sys; sys.modules['prometheus_client'] = None; sys.argv[0] = 'twistd';"
    " from twisted.scripts.twistd import run; run()",
]
IO_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def tcp_connect(port: int) -> socket.socket:
    """A blocking connection to 127.0.0.1:port."""
    return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)


def unix_connect(path: Path) -> socket.socket:
    """A blocking connection to a unix socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def accepts(connect: Callable[[], socket.socket]) -> bool:
    """Whether a connection is accepted now (closed again at once)."""
    try:
        connect().close()
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    return True


class MTA:
    """A small blocking MTA: sends commands over a socket and reads the milter's replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session = MTASession()

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def send(self, command: Command) -> list[Response]:
        """Send ``command``; every response up to its final reply (none if no reply is due)."""
        if not self.session.wants(type(command)):
            return []  # negotiated away (SMFIP_NO*)
        self.sock.sendall(self.session.send(command))
        responses: list[Response] = []
        while self.session.reply_due:
            event = self.session.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(65536)
                self.session.receive_data(data)
                continue
            if isinstance(event, Disconnected):
                raise ConnectionError(f"the milter closed the connection awaiting a reply to {command!r}")
            if not isinstance(event, Progress):
                responses.append(event)
        return responses

    def negotiate(self) -> NegotiateReply:
        """Offer everything; the milter's reply."""
        (reply,) = self.send(Negotiate())
        assert isinstance(reply, NegotiateReply)
        return reply

    def start_message(self, client: str = "192.0.2.7", mta_name: str = "mx.example") -> None:
        """Negotiate, connect (with macros), HELO, MAIL and RCPT, each answered Continue."""
        self.negotiate()
        self.send(Macros("C", (("j", mta_name), ("{client_addr}", client))))
        for command in (
            Connect("client.example", Family.INET, 40000, client),
            Helo("client.example"),
            MailFrom("<sender@example.org>"),
            RcptTo("<rcpt@example.com>"),
        ):
            assert self.send(command) in ([], [Continue()]), command

    def finish_message(self, subject: str = "hello") -> list[Response]:
        """Send headers, body and end of message; the end-of-message responses."""
        for command in (
            Data(),
            Header("From", "sender@example.org"),
            Header("Subject", subject),
            EndOfHeaders(),
            BodyChunk(b"Just a friendly note.\r\n"),
        ):
            replies = self.send(command)
            if replies != [] and replies != [Continue()]:
                return replies
        return self.send(EndOfMessage())


class Daemon:
    """A ``twistd -n milter`` process started for one test."""

    def __init__(self, directory: Path, config: str) -> None:
        self.directory = directory
        self.config = directory / "milter.toml"
        self.config.write_text(config)
        self.stdout = directory / "twistd.out"
        self.stderr = directory / "twistd.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.twistd = TWISTD

    def start(self, *arguments: str) -> subprocess.Popen[bytes]:
        """Start twistd with the config file and ``arguments``."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [*self.twistd, "-n", "--pidfile=", "milter", "--config", str(self.config), *arguments],
                cwd=ROOT, env=env, stdout=out, stderr=err,
            )
        return self.process

    def output(self) -> str:
        """What twistd wrote so far, stdout then stderr."""
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process is not None and self.process.poll() is None

    def wait_listening(self, *connects: Callable[[], socket.socket]) -> None:
        """Wait until every one of ``connects`` is accepted; fail with twistd's output if it died."""

        def ready() -> bool:
            if not self.alive():
                pytest.fail(f"twistd exited early:\n{self.output()}")
            return all(accepts(connect) for connect in connects)

        wait_until(ready, STARTUP_TIMEOUT, "twistd to listen")

    def terminate(self) -> None:
        """Send SIGTERM."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """The exit status (a negative signal number if killed), waiting at most ``timeout`` seconds."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"twistd still running after {timeout}s:\n{self.output()}")

    def wait_stopped(self, timeout: float) -> None:
        """Wait for a clean exit after SIGTERM.

        twistd shuts down, then re-raises the signal that stopped it, so the
        status is "killed by SIGTERM" (which systemd counts as success), not 0.
        """
        status = self.wait(timeout)
        output = self.output()
        assert status in (0, -signal.SIGTERM), output
        assert "Server Shut Down." in output, output
        assert "Traceback" not in output, output

    def kill(self) -> None:
        """Make sure the process is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


FILTERS = """
[[filter]]
name = "words"
class = "examples.word_rejecter:WordRejecter"
options = { patterns = ["casino"] }

[[filter]]
name = "stamp"
class = "examples.header_stamp:HeaderStamp"
"""


def socket_group() -> grp.struct_group:
    """A group this process may give its sockets: another one if it can, else its own."""
    mine = grp.getgrgid(os.getegid())
    if os.geteuid() == 0:
        return next((group for group in grp.getgrall() if group.gr_gid != mine.gr_gid), mine)
    return next((grp.getgrgid(gid) for gid in os.getgroups() if gid != mine.gr_gid), mine)


def daemon_config(
    port: int, sock: Path, metrics: int | None = None, drain: float = 10, group: str | None = None
) -> str:
    """A config listening on 127.0.0.1:port and ``sock`` with the example filters."""
    lines = [
        "[daemon]",
        f'listen = ["inet:{port}@127.0.0.1", "unix:{sock}"]',
        f"drain_timeout = {drain}",
    ]
    if metrics is not None:
        lines.append(f'metrics = "tcp:{metrics}:interface=127.0.0.1"')
    if group is not None:
        lines.append(f'socket_group = "{group}"')
    return "\n".join(lines) + "\n" + FILTERS


def stamp(responses: list[Response]) -> str:
    """The X-Filtered-By value among ``responses`` (which must end in Continue)."""
    assert responses[-1] == Continue(), responses
    added = [r for r in responses if isinstance(r, AddHeader) and r.name == "X-Filtered-By"]
    assert len(added) == 1, responses
    return added[0].value.strip()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with ``labels`` in Prometheus text format (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match[3])
    return total


def scrape(port: int) -> str:
    """The metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=IO_TIMEOUT) as page:
        text: str = page.read().decode()
        return text


def test_serves_tcp_and_unix_and_counts(daemon: Callable[[str], Daemon], sock_dir: Path) -> None:
    """The daemon filters over TCP and a unix socket (mode 660, its group set) and reports metrics."""
    port, metrics_port, sock, group = free_port(), free_port(), sock_dir / "milter.sock", socket_group()
    milter = daemon(daemon_config(port, sock, metrics_port, group=group.gr_name))
    milter.start()
    milter.wait_listening(lambda: tcp_connect(port), lambda: unix_connect(sock), lambda: tcp_connect(metrics_port))
    assert os.stat(sock).st_mode & 0o777 == 0o660
    assert os.stat(sock).st_gid == group.gr_gid

    mta = MTA(tcp_connect(port))
    mta.start_message(client="192.0.2.7")
    assert stamp(mta.finish_message()) == "txmilt on mx.example (client 192.0.2.7)"
    mta.send(Quit())
    assert mta.sock.recv(1) == b""
    mta.close()

    mta = MTA(unix_connect(sock))
    mta.start_message(client="198.51.100.9")
    assert stamp(mta.finish_message()) == "txmilt on mx.example (client 198.51.100.9)"
    # A second message on the same connection, refused by the first filter.
    for command in (MailFrom("<other@example.org>"), RcptTo("<rcpt@example.com>")):
        mta.send(command)
    refused = mta.finish_message(subject="casino night")
    assert len(refused) == 1 and isinstance(refused[0], Reject), refused
    mta.send(Quit())
    assert mta.sock.recv(1) == b""
    mta.close()

    wait_until(lambda: metric(scrape(metrics_port), "txmilt_connections_open") == 0, 5, "connections to close")
    text = scrape(metrics_port)
    assert metric(text, "txmilt_filter_changes_total", filter="stamp", kind="AddHeader", dry_run="false") == 2
    assert metric(text, "txmilt_filter_changes_total", filter="words") == 0
    assert metric(text, "txmilt_filter_verdicts_total", filter="words", stage="header", verdict="Reject") == 1
    assert metric(text, "txmilt_filter_verdicts_total", filter="words", verdict="Reject") == 1
    assert metric(text, "txmilt_filter_verdicts_total", filter="stamp", stage="end_of_message") == 2
    assert metric(text, "txmilt_filter_verdicts_total", filter="stamp", verdict="Reject") == 0


def test_sigterm_drains_open_connections(daemon: Callable[[str], Daemon], sock_dir: Path) -> None:
    """SIGTERM stops listening at once, lets a message in progress finish, then shuts down cleanly."""
    port, sock = free_port(), sock_dir / "milter.sock"
    milter = daemon(daemon_config(port, sock, drain=10))
    milter.start()
    milter.wait_listening(lambda: tcp_connect(port), lambda: unix_connect(sock))
    mta = MTA(tcp_connect(port))
    try:
        mta.start_message()
        milter.terminate()
        wait_until(lambda: not accepts(lambda: tcp_connect(port)), 2, "the TCP port to close")
        wait_until(lambda: not accepts(lambda: unix_connect(sock)), 2, "the unix socket to close")
        assert milter.alive(), milter.output()

        assert stamp(mta.finish_message()) == "txmilt on mx.example (client 192.0.2.7)"
        mta.send(Quit())
        assert mta.sock.recv(1) == b""
        milter.wait_stopped(5)
        # A probe for the closed port may have been accepted in the instant before it closed.
        assert re.search(r"draining \d+ open connections for up to 10.0s", milter.output())
        assert not sock.exists()
    finally:
        mta.close()
        milter.kill()


def test_drain_deadline_closes_connections(daemon: Callable[[str], Daemon], sock_dir: Path) -> None:
    """A connection still open at the drain deadline is closed, and the daemon shuts down cleanly."""
    port, sock = free_port(), sock_dir / "milter.sock"
    milter = daemon(daemon_config(port, sock, drain=1))
    milter.start()
    milter.wait_listening(lambda: tcp_connect(port))
    mta = MTA(tcp_connect(port))
    try:
        mta.start_message()
        signalled = time.monotonic()
        milter.terminate()
        assert mta.sock.recv(1) == b""
        closed = time.monotonic() - signalled
        assert 0.8 <= closed < 5, closed
        milter.wait_stopped(5)
        assert re.search(r"drain deadline passed; closing \d+ connections", milter.output())
    finally:
        mta.close()
        milter.kill()


def test_help_lists_every_option() -> None:
    """``twistd milter --help`` describes every option."""
    result = subprocess.run(
        [*TWISTD, "milter", "--help"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    for option in (
        "--listen", "--filter", "--config", "--metrics", "--frame-limit", "--idle-timeout", "--max-connections",
        "--drain-timeout", "--progress-interval", "--timeout", "--fallback", "--socket-group",
        "--negotiation-timeout", "--max-headers", "--max-header-bytes", "--max-body-size", "--body-spool-threshold",
        "--workers",
    ):
        assert option in result.stdout


def test_config_error_exits_before_listening(daemon: Callable[[str], Daemon]) -> None:
    """A filter that cannot be imported makes twistd exit 1 with the reason on stderr, listening nowhere."""
    port = free_port()
    milter = daemon(f'[daemon]\nlisten = ["inet:{port}@127.0.0.1"]\n[[filter]]\nclass = "no_such_module:Filter"\n')
    milter.start()
    assert milter.wait(30) == 1
    stderr = milter.stderr.read_text()
    assert "cannot import module 'no_such_module'" in stderr
    assert "twistd milter:" in stderr
    assert "starting on" not in milter.output()


def test_runs_without_prometheus_client(daemon: Callable[[str], Daemon], sock_dir: Path) -> None:
    """Without prometheus_client (no metrics extra) the daemon serves as usual when metrics are off."""
    port, sock = free_port(), sock_dir / "milter.sock"
    milter = daemon(daemon_config(port, sock))
    milter.twistd = TWISTD_WITHOUT_METRICS
    milter.start()
    milter.wait_listening(lambda: tcp_connect(port))
    mta = MTA(tcp_connect(port))
    try:
        mta.start_message()
        assert stamp(mta.finish_message()) == "txmilt on mx.example (client 192.0.2.7)"
    finally:
        mta.close()


@pytest.mark.parametrize("where", ["config", "option"])
def test_metrics_need_prometheus_client(daemon: Callable[[str], Daemon], sock_dir: Path, where: str) -> None:
    """Metrics without prometheus_client: exit 1 before listening, with one line saying what to install."""
    port, sock, metrics_port = free_port(), sock_dir / "milter.sock", free_port()
    in_config = metrics_port if where == "config" else None
    milter = daemon(daemon_config(port, sock, metrics=in_config))
    milter.twistd = TWISTD_WITHOUT_METRICS
    milter.start(*([] if in_config else ["--metrics", f"inet:{metrics_port}@127.0.0.1"]))
    assert milter.wait(30) == 1, milter.output()
    assert milter.stderr.read_text() == (
        "twistd milter: metrics need the prometheus_client package, which is not installed:"
        " pip install prometheus_client (txmilt's 'metrics' extra)\n"
    )
    assert not accepts(lambda: tcp_connect(port))
    assert not sock.exists()
