"""The installed ``txmilt-check`` command, run as a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["RUN_TIMEOUT", "one_line", "txmilt_check"]

#: Seconds a txmilt-check run may take in the tests.
RUN_TIMEOUT = 60


def _command() -> str:
    """The txmilt-check console script (next to this Python, or on PATH)."""
    beside = Path(sys.executable).with_name("txmilt-check")
    found = str(beside) if beside.exists() else shutil.which("txmilt-check")
    if found is None:
        pytest.fail("the txmilt-check command is not installed; run pip install -e .")
    return found


def txmilt_check(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run txmilt-check with ``args``; its status, stdout and stderr."""
    return subprocess.run(
        [_command(), *args], input=None if stdin is None else stdin.decode(), capture_output=True, text=True,
        timeout=RUN_TIMEOUT, check=False,
    )


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed run wrote to stderr, having written nothing else (no traceback)."""
    assert run.stdout == "", run.stdout
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("txmilt-check: "), run.stderr
    return lines[0]
