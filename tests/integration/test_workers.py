"""``twistd milter --workers N`` and SIGHUP as real processes: shared sockets, replaced workers, drain, reload."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typing_extensions import override

from tests.repeating import Repeating
from txmilt.messages import AddHeader, Continue, Quit, Response

from .filters import HEADER
from .test_daemon import (
    MTA,
    ROOT,
    TWISTD,
    Daemon,
    accepts,
    free_port,
    metric,
    scrape,
    tcp_connect,
    unix_connect,
    wait_until,
)

STAMP = "tests.integration.filters:PidStamp"


def config(port: int, generation: str = "1", *, workers: int = 2, sock: Path | None = None,
           metrics: int | None = None, drain: float = 10) -> str:
    """A config with one PidStamp filter of ``generation``."""
    listen = [f'"inet:{port}@127.0.0.1"'] + ([f'"unix:{sock}"'] if sock else [])
    lines = ["[daemon]", f"listen = [{', '.join(listen)}]", f"workers = {workers}", f"drain_timeout = {drain}"]
    if metrics is not None:
        lines.append(f'metrics = "tcp:{metrics}:interface=127.0.0.1"')
    lines += ["[[filter]]", 'name = "stamp"', f'class = "{STAMP}"', f'options = {{ generation = "{generation}" }}']
    return "\n".join(lines) + "\n"


def added_headers(responses: list[Response]) -> dict[str, str]:
    """The headers added at end of message (its responses, which must end in Continue), by name."""
    assert responses[-1] == Continue(), responses
    return {r.name: r.value.strip() for r in responses if isinstance(r, AddHeader)}


def served_by(responses: list[Response]) -> tuple[str, int]:
    """The generation and process id that stamped a message (its end-of-message responses)."""
    generation, _, pid = added_headers(responses)[HEADER].partition(" pid ")
    return generation, int(pid)


def one_message(connect: Callable[[], socket.socket]) -> list[Response]:
    """Run one message on a new connection; the responses to its end."""
    mta = MTA(connect())
    try:
        mta.start_message()
        responses = mta.finish_message()
        mta.send(Quit())
        return responses
    finally:
        mta.close()


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def worker_pids(milter: Daemon, count: int) -> list[int]:
    """Wait until the daemon serves with ``count`` workers; their process ids."""
    wait_until(lambda: f"serving with {count} workers" in milter.output(), 30, "the workers to serve")
    match = re.search(rf"serving with {count} workers \(pids ([\d, ]+)\)", milter.output())
    assert match is not None
    return [int(pid) for pid in match[1].split(", ")]


@contextlib.contextmanager
def only(pid: int, pids: list[int]) -> Iterator[None]:
    """New connections are accepted by ``pid`` alone: the other workers are stopped (SIGSTOP) meanwhile."""
    others = [other for other in pids if other != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


class Load(Repeating):
    """Threads running one message per connection against the daemon until stopped; who served, what failed."""

    def __init__(self, connect: Callable[[], socket.socket], threads: int = 4, pause: float = 0.005) -> None:
        super().__init__(threads)
        self.connect = connect
        self.pause = pause
        self.served: Counter[str] = Counter()
        self.errors: list[str] = []
        #: When each error happened (time.monotonic()).
        self.error_times: list[float] = []

    @property
    def messages(self) -> int:
        """Messages served so far."""
        with self.lock:
            return sum(self.served.values())

    @override
    def once(self) -> None:
        try:
            generation, _ = served_by(one_message(self.connect))
        except Exception as e:
            with self.lock:
                self.errors.append(repr(e))
                self.error_times.append(time.monotonic())
        else:
            with self.lock:
                self.served[generation] += 1
        time.sleep(self.pause)

    def wait_for(self, generation: str, timeout: float = 20) -> None:
        """Wait until a message of ``generation`` has been served."""
        wait_until(lambda: self.served[generation] > 0, timeout, f"a message served by generation {generation}")


def test_workers_share_tcp_and_unix_sockets(daemon: Callable[[str], Daemon], sock_dir: Path) -> None:
    """Each of two workers accepts from the same TCP and unix sockets; metrics add up over both."""
    port, metrics_port, sock = free_port(), free_port(), sock_dir / "milter.sock"
    milter = daemon(config(port, sock=sock, metrics=metrics_port))
    milter.start()
    pids = worker_pids(milter, 2)
    assert children(milter.process.pid) == sorted(pids)  # type: ignore[union-attr]
    assert os.stat(sock).st_mode & 0o777 == 0o660
    for pid in pids:
        with only(pid, pids):
            assert served_by(one_message(lambda: tcp_connect(port))) == ("1", pid)
            assert served_by(one_message(lambda: unix_connect(sock))) == ("1", pid)
    assert os.stat(sock).st_mode & 0o777 == 0o660  # a worker never chmods the daemon's socket
    wait_until(lambda: metric(scrape(metrics_port), "txmilt_connections_total") == 4, 5, "the counts of both")
    text = scrape(metrics_port)
    assert metric(text, "txmilt_filter_changes_total", filter="stamp", kind="AddHeader") == 4
    wait_until(lambda: metric(scrape(metrics_port), "txmilt_connections_open") == 0, 5, "the open gauge to settle")
    milter.terminate()
    milter.wait_stopped(15)
    assert not sock.exists()


def test_killed_worker_is_replaced(daemon: Callable[[str], Daemon]) -> None:
    """A worker killed under load is replaced with one log line; the other serves meanwhile, nothing fails."""
    port = free_port()
    milter = daemon(config(port))
    milter.start()
    first, second = worker_pids(milter, 2)
    with Load(lambda: tcp_connect(port), threads=2) as load:
        wait_until(lambda: load.messages >= 10, 20, "some load")
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: "SIGKILL" in milter.output(), 20, "the worker's end to be logged")
        wait_until(lambda: "worker 1 pid" in milter.output().split("SIGKILL")[1], 20, "a new worker")
        served = load.messages
        wait_until(lambda: load.messages >= served + 10, 20, "more load")
    (new,) = set(children(milter.process.pid)) - {second}  # type: ignore[union-attr]
    lines = [line for line in milter.output().splitlines() if f"(pid {first})" in line]
    assert len(lines) == 1
    assert re.search(rf"worker 1 \(pid {first}\) was killed by SIGKILL; starting another in", lines[0])
    # Only the messages in flight on the killed worker fail (the MTA applies its default action to them).
    assert len(load.errors) <= 2 and all(when - killed < 1 for when in load.error_times), load.errors
    wait_until(lambda: accepts(lambda: tcp_connect(port)), 5, "the port")
    with only(new, [new, second]):
        stamp = served_by(one_message(lambda: tcp_connect(port)))
        assert stamp == ("1", new), stamp
    milter.terminate()
    milter.wait_stopped(15)


def test_sigterm_drains_every_worker(daemon: Callable[[str], Daemon]) -> None:
    """SIGTERM closes the socket at once; each worker finishes its open message, then everything exits."""
    port = free_port()
    milter = daemon(config(port, drain=10))
    milter.start()
    pids = worker_pids(milter, 2)
    held: dict[int, MTA] = {}
    try:
        for pid in pids:
            with only(pid, pids):
                held[pid] = MTA(tcp_connect(port))
                held[pid].start_message()
        milter.terminate()
        wait_until(lambda: not accepts(lambda: tcp_connect(port)), 5, "the port to close")
        time.sleep(0.5)
        for pid, mta in held.items():
            assert pid in children(milter.process.pid)  # type: ignore[union-attr]
            assert served_by(mta.finish_message()) == ("1", pid)
            mta.send(Quit())
            assert mta.sock.recv(1) == b""
        milter.wait_stopped(15)
        assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)
        output = milter.output()
        # (A probe for the closed port may have been accepted in the instant before it closed.)
        drains = re.findall(r"worker \d pid \d+: txmilt\.daemon#info\] draining \d+ open connections", output)
        assert len(drains) == 2, output
    finally:
        for mta in held.values():
            mta.close()


def test_systemd_socket_activation_with_workers(daemon: Callable[[str], Daemon]) -> None:
    """A socket passed the way systemd does (LISTEN_FDS, fd 3) is served by the workers, not the daemon."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    milter = daemon(config(port).replace(f'"inet:{port}@127.0.0.1"', '"systemd:domain=INET:index=0"'))
    activate = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1';"
        " os.environ['LISTEN_FDNAMES'] = 'milter'; os.environ['LISTEN_PID'] = str(os.getpid());"
        " os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    with milter.stdout.open("wb") as out, milter.stderr.open("wb") as err:
        milter.process = subprocess.Popen(
            [sys.executable, "-c", activate, str(listener.fileno()), *TWISTD[1:], "-n", "--pidfile=", "milter",
             "--config", str(milter.config)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=err,
            pass_fds=(listener.fileno(),),
        )
    listener.close()
    pids = worker_pids(milter, 2)
    for pid in pids:
        with only(pid, pids):
            assert served_by(one_message(lambda: tcp_connect(port))) == ("1", pid)
    milter.terminate()
    milter.wait_stopped(15)


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_under_load(daemon: Callable[[str], Daemon], workers: int) -> None:
    """Five SIGHUPs (and one with a broken file) under load: no error, new configurations served, open ones kept."""
    port = free_port()
    milter = daemon(config(port, "gen1", workers=workers, drain=60))
    milter.start()
    if workers > 1:
        worker_pids(milter, workers)
    else:
        milter.wait_listening(lambda: tcp_connect(port))
    held = MTA(tcp_connect(port))
    held.start_message()  # mid-message on the first configuration
    try:
        with Load(lambda: tcp_connect(port)) as load:
            load.wait_for("gen1")
            for number in range(2, 7):
                if number == 4:
                    milter.config.write_text("[daemon\nworkers = ")
                    milter.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                    wait_until(lambda: "reload refused" in milter.output(), 20, "the broken file to be refused")
                    before = load.served["gen3"]
                    wait_until(lambda: load.served["gen3"] > before + 5, 20, "generation 3 to go on serving")  # noqa: B023
                reloads = milter.output().count("] reloaded ")
                milter.config.write_text(config(port, f"gen{number}", workers=workers, drain=60))
                milter.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                wait_until(lambda: milter.output().count("] reloaded ") > reloads, 40, f"reload {number}")  # noqa: B023
                assert served_by(one_message(lambda: tcp_connect(port)))[0] == f"gen{number}"
                load.wait_for(f"gen{number}")
        assert load.errors == [], load.errors
        assert served_by(held.finish_message())[0] == "gen1"
        held.send(Quit())
    finally:
        held.close()
    output = milter.output()
    refused = [line for line in output.splitlines() if "reload refused" in line]
    assert len(refused) == 1 and "is not valid TOML" in refused[0], refused
    assert "Traceback" not in output, output
    milter.terminate()
    milter.wait_stopped(70)
