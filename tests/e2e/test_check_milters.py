"""``txmilt-check`` against milters that are not txmilt: OpenDKIM signing, and a pymilter (libmilter) milter."""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .checkcmd import txmilt_check
from .milterd import is_listening
from .opendkim import OpenDKIM
from .postfix import free_port

HERE = Path(__file__).resolve().parent
LIBMILTER_HEADER = Path("/usr/include/libmilter/mfapi.h")
STARTUP_TIMEOUT = 15.0

SIGNED_MESSAGE = (
    b"From:Alice <alice@example.org>\r\n"
    b"To:\tBob <bob@example.net>\r\n"
    b"Subject:   signed by OpenDKIM, checked by txmilt-check\r\n"
    b"Date: Sat, 21 Nov 2026 08:00:00 +0000\r\n"
    b"Message-ID: <check-dkim@txmilt.test>\r\n"
    b"\r\n"
    b"Hello DKIM.\r\n\r\n  Indented line with trailing space \r\n"
)


@pytest.fixture
def message_file(tmp_path: Path) -> Callable[[bytes], str]:
    def write(data: bytes) -> str:
        path = tmp_path / "message.eml"
        path.write_bytes(data)
        return str(path)

    return write


# ------------------------------------------------------------------ OpenDKIM (the opendkim fixture: conftest.py)


def test_opendkim_signs(opendkim: OpenDKIM, message_file: Callable[[bytes], str]) -> None:
    """OpenDKIM in signing mode: the resulting message's DKIM-Signature verifies with dkimpy.

    The client must be 127.0.0.1, which OpenDKIM trusts (InternalHosts) and signs for. With
    simple canonicalization the headers must reach OpenDKIM exactly as they stand in the output.
    """
    dkim: Any = importlib.import_module("dkim")
    path = message_file(SIGNED_MESSAGE)
    run = txmilt_check("--json", "--client-address", "127.0.0.1", opendkim.spec, path)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    [change] = report["changes"]
    assert change["change"] in ("add_header", "insert_header") and change["name"] == "DKIM-Signature"
    signed = base64.b64decode(report["result"]["message_base64"])
    assert b"\r\nDKIM-Signature:" in b"\r\n" + signed
    assert signed.endswith(SIGNED_MESSAGE.partition(b"\r\n\r\n")[2])
    assert dkim.verify(signed, dnsfunc=opendkim.dnsfunc) is True
    assert dkim.verify(signed.replace(b"Hello DKIM.", b"Hello DKIM!"), dnsfunc=opendkim.dnsfunc) is False
    text = txmilt_check("--client-address", "127.0.0.1", opendkim.spec, path).stdout
    assert "header at 0: DKIM-Signature: v=1;" in text and "\n+DKIM-Signature: v=1;" in text


def test_opendkim_does_not_sign_for_outsiders(opendkim: OpenDKIM, message_file: Callable[[bytes], str]) -> None:
    """From a client OpenDKIM does not trust, nothing is signed: the check shows no change."""
    report = json.loads(txmilt_check("--json", opendkim.spec, message_file(SIGNED_MESSAGE)).stdout)
    assert report["exit_status"] == 0 and report["changes"] == []


# ------------------------------------------------------------------ pymilter


def _imports_milter(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import Milter"], capture_output=True, check=False, timeout=60)
    return probe.returncode == 0


def _pymilter_python() -> str:
    """A Python that can import pymilter: this one, or a private virtualenv it is installed into.

    The virtualenv is kept in the temporary directory between runs; it is built
    beside it and renamed into place, so two runs at once do not trip over each other.
    """
    if _imports_milter(sys.executable):
        return sys.executable
    if not LIBMILTER_HEADER.exists():
        pytest.skip("pymilter builds against libmilter: install libmilter-dev (.ci/install-postfix.sh does)")
    venv = Path(tempfile.gettempdir()) / f"txmilt-pymilter-py{sys.version_info.major}{sys.version_info.minor}"
    python = venv / "bin" / "python"
    if python.exists() and _imports_milter(str(python)):
        return str(python)
    building = Path(tempfile.mkdtemp(prefix="txmilt-pymilter-build-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True, timeout=120)
        install = subprocess.run(
            [str(building / "bin" / "python"), "-m", "pip", "install", "-q", "pymilter"],
            capture_output=True, text=True, check=False, timeout=600,
        )
        if install.returncode != 0:
            pytest.skip(f"pip could not install pymilter: {install.stderr.strip()[-300:]}")
        shutil.rmtree(venv, ignore_errors=True)
        with contextlib.suppress(OSError):  # another run got there first
            os.rename(building, venv)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    # A virtualenv's scripts name their own path, so the moved one is used only through its python.
    if not _imports_milter(str(python)):
        pytest.skip(f"pymilter was installed but {python} cannot import it")
    return str(python)


@pytest.fixture(scope="module")
def pymilter() -> Iterator[str]:
    """tests/e2e/pymilter_milter.py on a free loopback port; its address."""
    python = _pymilter_python()
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [python, str(HERE / "pymilter_milter.py"), str(port)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not is_listening(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the pymilter milter did not start:\n{log.read().decode(errors='replace')}")
                time.sleep(0.05)
            yield f"inet:{port}@127.0.0.1"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def test_pymilter_adds_a_header(pymilter: str) -> None:
    """A libmilter milter's change shows in text and JSON; the events it switched off are listed."""
    run = txmilt_check("--client-address", "198.51.100.9", pymilter)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "add header X-Pymilter: 7 headers from 198.51.100.9" in run.stdout
    assert "+X-Pymilter: 7 headers from 198.51.100.9" in run.stdout
    report = json.loads(txmilt_check("--json", pymilter).stdout)
    assert report["changes"] == [{
        "milter": 1, "change": "add_header", "name": "X-Pymilter", "value": "7 headers from 192.0.2.10",
        "header": "X-Pymilter: 7 headers from 192.0.2.10",
    }]
    assert "RCPT" not in report["milters"][0]["events"]  # pymilter switches off what Stamp does not implement
    assert [s["sent"] for s in report["stages"] if s["command"] == "RCPT"] == [False]


def test_pymilter_rejects(pymilter: str, message_file: Callable[[bytes], str]) -> None:
    """A libmilter milter's rejection with setreply: exit status 1, its reply shown."""
    message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: reject me\r\n\r\nx\r\n"
    run = txmilt_check(pymilter, message_file(message))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "verdict   reject by milter 1 at BODYEOB" in run.stdout
    assert "          550 5.7.1 pymilter says no" in run.stdout
