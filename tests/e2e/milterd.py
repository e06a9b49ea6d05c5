"""A ``twistd -n milter`` subprocess on a free loopback port, configured from Python data as TOML."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .postfix import pid_alive

__all__ = ["MilterDaemon", "MilterDaemonError", "is_listening", "start_daemons", "to_toml"]

ROOT = Path(__file__).resolve().parents[2]
#: twistd run by this interpreter (the ``twistd`` script on PATH may belong to another Python).
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
#: What Twisted logs once the daemon's port listens.
_LISTENING = re.compile(r" starting on (\d+)$", re.MULTILINE)


class MilterDaemonError(RuntimeError):
    """The daemon did not start, or did not stop cleanly."""


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(daemon: Mapping[str, Any], filters: Sequence[Mapping[str, Any]]) -> str:
    """A ``twistd milter`` config file: a ``[daemon]`` table and ``[[filter]]`` tables in order."""
    lines = ["[daemon]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in daemon.items())]
    for table in filters:
        lines += ["", "[[filter]]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def is_listening(port: int, host: str = "127.0.0.1", pid: int | None = None) -> bool:
    """Whether a socket listens on ``host:port`` (of process ``pid``, if given), read from /proc: nothing connects.

    With ``pid``, a port that another process took meanwhile does not count.
    """
    wanted = "{}:{:04X}".format("".join(f"{int(part):02X}" for part in reversed(host.split("."))), port)
    with open("/proc/net/tcp", encoding="ascii") as fh:
        next(fh, None)
        inodes = {fields[9] for fields in (line.split() for line in fh) if fields[1] == wanted and fields[3] == "0A"}
    if pid is None or not inodes:
        return bool(inodes)
    with contextlib.suppress(OSError):
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    return False


def start_daemons(daemons: Sequence[MilterDaemon]) -> None:
    """Start several daemons, a few at a time (each spends a second or so of CPU importing), and wait for them.

    As many start together as there are CPUs, so that a loaded machine does not
    push any of them past its startup timeout. If one fails, all are stopped and removed.
    """
    batch = max(2, os.cpu_count() or 2)
    try:
        for first in range(0, len(daemons), batch):
            started = [daemon.spawn() for daemon in daemons[first:first + batch]]
            for daemon in started:
                daemon.wait_listening()
    except BaseException:
        for daemon in daemons:
            daemon.stop()
            daemon.cleanup()
        raise


class MilterDaemon:
    """``twistd -n --pidfile= milter --config FILE`` with the given filters, listening on 127.0.0.1.

    The process runs from the repository root with PYTHONPATH set to it, so
    ``tests.e2e.filters:Editor`` and the like import. Output goes to a log file
    (:meth:`output`). Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        filters: Sequence[Mapping[str, Any]],
        daemon: Mapping[str, Any] | None = None,
        *,
        name: str = "milter",
        startup_timeout: float = 20.0,
    ) -> None:
        self.name = name
        #: The port it listens on, known once it does (it binds port 0: no race for a free port).
        self.port = 0
        self.startup_timeout = startup_timeout
        self.directory = Path(tempfile.mkdtemp(prefix=f"txmilt-e2e-{name}-"))
        settings: dict[str, Any] = {"listen": ["tcp:0:interface=127.0.0.1"], "drain_timeout": 2, "timeout": 20}
        settings.update(daemon or {})
        self.config_path = self.directory / "milter.toml"
        self.config_path.write_text(to_toml(settings, filters), encoding="utf-8")
        self.log_path = self.directory / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        """The address in Postfix's notation, for ``smtpd_milters``."""
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Start twistd and wait until it listens; MilterDaemonError with its output if it does not."""
        return self.spawn().wait_listening()

    def spawn(self) -> Self:
        """Start twistd without waiting for it (see :meth:`wait_listening` and :func:`start_daemons`)."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "milter", "--config", str(self.config_path)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def wait_listening(self) -> Self:
        """Wait until the spawned twistd listens; MilterDaemonError with its output if it does not."""
        assert self.process is not None, "spawn() first"
        deadline = time.monotonic() + self.startup_timeout
        while not self.port or not is_listening(self.port, pid=self.process.pid):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise MilterDaemonError(f"twistd milter ({self.name}) is not listening:\n{self.output()}")
            time.sleep(0.02)
            if found := _LISTENING.search(self.output()):
                self.port = int(found.group(1))
        return self

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        """Everything twistd logged so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """An offset into :meth:`output`, to look only at what comes after it."""
        return len(self.output())

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status (None if never started)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            if pid_alive(process.pid):
                os.kill(process.pid, signal.SIGKILL)
        return process.returncode

    def cleanup(self) -> None:
        """Remove the config and log directory (unless $TXMILT_E2E_KEEP is set)."""
        if not os.environ.get("TXMILT_E2E_KEEP"):
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()
