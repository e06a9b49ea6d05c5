"""A remote filter's ``command``: the daemon runs that milter, waits for it, restarts it, stops it last."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.postfix import pid_alive as alive
from txmilt.messages import Quit

from .fake_milter import HEADER as FAKE
from .filters import HEADER as STAMP
from .test_daemon import MTA, ROOT, Daemon, free_port, tcp_connect, wait_until
from .test_workers import added_headers, children, one_message, only, worker_pids

FAKE_MILTER = ROOT / "tests" / "integration" / "fake_milter.py"


def config(port: int, fake_port: int, *, workers: int = 1, delay: float = 0.0) -> str:
    """The fake milter, supervised, then a PidStamp; the fake's fallback is accept, so a message goes on without it."""
    command = [sys.executable, str(FAKE_MILTER), str(fake_port), "--delay", str(delay)]
    return "\n".join([
        "[daemon]",
        f'listen = ["inet:{port}@127.0.0.1"]',
        f"workers = {workers}",
        "drain_timeout = 10",
        "[[filter]]",
        'name = "fake"',
        f'remote = "inet:{fake_port}@127.0.0.1"',
        f"command = [{', '.join(f'{part!r}' for part in command)}]",
        f'env = {{ PYTHONPATH = "{ROOT}" }}',
        "restart_delay = 0.5",
        'fallback = "accept"',
        "timeout = 5",
        "[[filter]]",
        'name = "stamp"',
        'class = "tests.integration.filters:PidStamp"',
    ]) + "\n"


def message(port: int) -> dict[str, str]:
    """The headers the chain adds to one message on a new connection."""
    return added_headers(one_message(lambda: tcp_connect(port)))


def supervised_pid(milter: Daemon, since: int = 0) -> int:
    """The pid of the supervised milter the daemon started (first start logged after offset ``since``)."""
    wait_until(lambda: "started supervised milter fake" in milter.output()[since:], 20, "the supervised milter")
    match = re.search(r"started supervised milter fake \(pid (\d+)\)", milter.output()[since:])
    assert match is not None
    return int(match[1])


def test_supervised_milter_waited_for_restarted_and_stopped_last(daemon: Callable[[str], Daemon]) -> None:
    """Started and waited for before serving; killed, restarted after its delay; stopped after the drain."""
    port, fake_port = free_port(), free_port()
    milter = daemon(config(port, fake_port, delay=1.5))
    milter.start()
    pid = supervised_pid(milter)
    assert pid in children(milter.process.pid)  # type: ignore[union-attr]
    wait_until(lambda: alive(pid) and os.path.exists(f"/proc/{pid}"), 5, "the milter process")
    # The daemon's socket is bound at once, but nothing is served until the milter accepts connections:
    # the first message already goes through it.
    wait_until(lambda: _connectable(port), 10, "the daemon's socket")
    first = message(port)
    assert "accepts connections at inet:" in milter.output()
    assert first[FAKE] == f"pid {pid}" and first[STAMP].startswith("1 pid ")

    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: f"(pid {pid}) was killed by SIGKILL" in milter.output(), 10, "the death to be logged")
    lines = [line for line in milter.output().splitlines() if f"pid {pid})" in line and "started" not in line]
    assert len(lines) == 1 and "restarting it in 0.5s" in lines[0], lines
    assert FAKE not in message(port)  # meanwhile: its fallback (accept), the next filter still runs
    wait_until(lambda: FAKE in message(port), 20, "the restarted milter to serve")
    (restarted,) = [child for child in children(milter.process.pid) if child != pid]  # type: ignore[union-attr]
    assert message(port)[FAKE] == f"pid {restarted}"

    held = MTA(tcp_connect(port))
    try:
        held.start_message()
        milter.terminate()
        wait_until(lambda: "draining 1 open connections" in milter.output(), 5, "the drain")
        assert alive(restarted)  # still serving during the drain
        assert added_headers(held.finish_message())[FAKE] == f"pid {restarted}"
        held.send(Quit())
    finally:
        held.close()
    # Not wait_stopped: each connection the milter missed logged its failure with a traceback.
    assert milter.wait(20) in (0, -signal.SIGTERM)
    assert "Server Shut Down." in milter.output()
    assert not alive(restarted)
    assert re.search(rf"supervised milter fake \(pid {restarted}\) stopped: it exited with status 0", milter.output())


def _connectable(port: int) -> bool:
    try:
        tcp_connect(port).close()
    except OSError:
        return False
    return True


def test_supervised_milter_runs_once_with_workers(daemon: Callable[[str], Daemon]) -> None:
    """With two workers the daemon runs the milter once, in its own process, and both workers use it."""
    port, fake_port = free_port(), free_port()
    milter = daemon(config(port, fake_port, workers=2))
    milter.start()
    pid = supervised_pid(milter)
    pids = worker_pids(milter, 2)
    assert children(milter.process.pid) == sorted([pid, *pids])  # type: ignore[union-attr]
    for worker in pids:
        with only(worker, pids):
            added = message(port)
            assert (added[FAKE], added[STAMP]) == (f"pid {pid}", f"1 pid {worker}")
    milter.terminate()
    milter.wait_stopped(20)
    assert not alive(pid)


@pytest.mark.parametrize(
    ("command", "error"),
    [('["no-such-milter-program", "-f"]', "command 'no-such-milter-program' is not an executable in PATH"),
     ("[]", "command must be a list of words")],
)
def test_bad_command_exits_before_listening(daemon: Callable[[str], Daemon], tmp_path: Path, command: str,
                                            error: str) -> None:
    """A command that cannot run is reported on stderr, and nothing listens or starts."""
    port = free_port()
    milter = daemon(
        f'[daemon]\nlisten = ["inet:{port}@127.0.0.1"]\n[[filter]]\nremote = "inet:{free_port()}@127.0.0.1"\n'
        f"command = {command}\n"
    )
    milter.start()
    assert milter.wait(30) == 1
    assert error in milter.stderr.read_text()
    assert not _connectable(port)
