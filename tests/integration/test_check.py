"""The ``txmilt-check`` command against milters on loopback: the example daemon, refusals, failures, load."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.checkcmd import RUN_TIMEOUT, one_line, txmilt_check
from tests.e2e.milterd import MilterDaemon

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = tomllib.loads((ROOT / "examples" / "milter.toml").read_text(encoding="utf-8"))

MESSAGE = (
    b"From: Alice <alice@suspicious.example>\r\n"
    b"To: Sales <sales@example.com>\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Date: Sat, 21 Nov 2026 08:00:00 +0000\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Please find the figures below.\r\n"
)


@pytest.fixture(scope="module")
def examples() -> Iterator[str]:
    """``twistd milter`` with the filters of examples/milter.toml; its address."""
    with MilterDaemon(EXAMPLES["filter"], name="examples") as daemon:
        yield f"inet:{daemon.port}@127.0.0.1"


@pytest.fixture
def message_file(tmp_path: Path) -> Callable[[bytes], str]:
    """Write a message file; its path."""

    def write(data: bytes = MESSAGE) -> str:
        path = tmp_path / "message.eml"
        path.write_bytes(data)
        return str(path)

    return write


# ------------------------------------------------------------- the examples


def test_examples_text(examples: str, message_file: Callable[[bytes], str]) -> None:
    """Every example's effect shows in the text report: stamp, aliases, quarantine, disclaimer."""
    run = txmilt_check(examples, "--client-address", "198.51.100.7", message_file(MESSAGE))
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    out = run.stdout
    assert "verdict   continue: the message would be delivered (exit status 0)" in out
    assert "add header X-Filtered-By: txmilt on mx.example.net (client 198.51.100.7)" in out
    assert "delete recipient <sales@example.com>" in out
    assert "add recipient <alice@example.com>" in out and "add recipient <bob@example.com>" in out
    assert "quarantine: sender domain suspicious.example is quarantined" in out
    assert "replace body" in out
    assert "+X-Filtered-By: txmilt on mx.example.net (client 198.51.100.7)" in out
    assert "+This message was checked by txmilt." in out
    assert "result    from <alice@suspicious.example> to <alice@example.com> <bob@example.com>" in out
    assert "  1  CONNECT    mail.example.com [198.51.100.7]" in out


def _without_times(text: str, address: str) -> list[str]:
    """Report lines with the milliseconds blanked and the daemon's address spelt as in the README."""
    text = text.replace(address, "inet:8891@127.0.0.1")
    times = re.compile(r" +\d+\.\d\d(?=(  \d+ changes?)?$| ms in the milters$)")
    return [times.sub(" T", line).rstrip() for line in text.splitlines()]


def test_readme_run(examples: str) -> None:
    """The README's run of examples/message.eml is what txmilt-check prints today (times aside)."""
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    command = "    $ txmilt-check inet:8891@127.0.0.1 examples/message.eml\n"
    block = readme.partition(command)[2].partition("\n\nThe report lists")[0]
    shown = [line.removeprefix("    ") for line in block.splitlines()]
    run = txmilt_check(examples, str(ROOT / "examples" / "message.eml"))
    assert run.returncode == 0, run.stderr
    assert _without_times(run.stdout, examples) == _without_times("\n".join(shown), examples)


def test_examples_json(examples: str, message_file: Callable[[bytes], str]) -> None:
    """The JSON report holds the same: each change, the result, every stage with its macros."""
    run = txmilt_check("--json", examples, message_file(MESSAGE))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["exit_status"] == 0 and report["verdict"]["reply"] == "continue"
    changes = {change["change"]: change for change in report["changes"]}
    assert changes["add_header"]["header"] == "X-Filtered-By: txmilt on mx.example.net (client 192.0.2.10)"
    assert changes["delete_recipient"]["address"] == "<sales@example.com>"
    assert changes["quarantine"]["reason"] == "sender domain suspicious.example is quarantined"
    assert changes["replace_body"]["bytes"] > len(b"Please find the figures below.\r\n")
    result = report["result"]
    assert result["recipients"] == ["<alice@example.com>", "<bob@example.com>"]
    assert result["quarantine"] == "sender domain suspicious.example is quarantined"
    assert "\r\nX-Filtered-By: txmilt on mx.example.net (client 192.0.2.10)\r\n\r\n" in result["message"]
    assert result["message"].endswith("-- \r\nThis message was checked by txmilt.\r\n")
    # The milter's names, then the MTAs' defaults, which a requested list would otherwise replace.
    assert report["milters"][0]["macros"] == {"connect": [
        "{client_addr}", "j", "{daemon_name}", "{daemon_addr}", "v", "_", "{if_name}", "{if_addr}",
    ]}
    connect = report["stages"][0]
    assert connect["command"] == "CONNECT" and connect["macros"]["{client_addr}"] == "192.0.2.10"
    assert all(stage["ms"] >= 0 for stage in report["stages"])


def test_word_rejecter(examples: str, message_file: Callable[[bytes], str]) -> None:
    """A milter that rejects: exit status 1, the refusal and its SMTP reply shown, in text and JSON."""
    path = message_file(MESSAGE.replace(b"Quarterly figures", b"Casino night"))
    run = txmilt_check(examples, path)
    assert run.returncode == 1, run.stderr
    assert "verdict   reject by milter 1 at HEADER (Subject: Casino night)" in run.stdout
    assert "550-5.7.1 Rejected: the subject contains 'Casino'." in run.stdout
    assert "550 5.7.1 Contact postmaster if this is wrong." in run.stdout
    report = json.loads(txmilt_check("--json", examples, path).stdout)
    assert report["verdict"]["smtp_reply"][-1] == "550 5.7.1 Contact postmaster if this is wrong."
    assert report["exit_status"] == 1 and report["result"]["diff"] == ""


def test_milters_in_turn(examples: str) -> None:
    """Two milters in turn, as smtpd_milters = a, b: the second sees the first one's header."""
    report = json.loads(txmilt_check("--json", examples, examples, "--to", "x@example.net").stdout)
    seen = [s["argument"] for s in report["stages"] if s["milter"] == 2 and s["command"] == "HEADER"]
    assert seen[-1].startswith("X-Filtered-By: txmilt on mx.example.net")
    assert report["result"]["message"].count("X-Filtered-By:") == 2


def test_sendmail_profile_and_macros(examples: str) -> None:
    """--profile sendmail and --macro reach the milter: the stamp names the overridden host."""
    report = json.loads(txmilt_check("--json", "--profile", "sendmail", "--macro", "j=mx.test", examples).stdout)
    assert report["profile"] == "Sendmail"
    assert "X-Filtered-By: txmilt on mx.test (client 192.0.2.10)" in report["result"]["message"]
    assert "ABORT" not in [stage["command"] for stage in report["stages"]]


def test_message_on_stdin(examples: str) -> None:
    """``-`` reads the message from standard input."""
    run = txmilt_check(examples, "-", stdin=MESSAGE)
    assert run.returncode == 0, run.stderr
    assert "envelope  from <alice@suspicious.example> to <sales@example.com>" in run.stdout


# ------------------------------------------------------------------ verdicts


@pytest.fixture(scope="module")
def verdicts() -> Iterator[str]:
    """A milter that refuses by sender, recipient or subject (tests.e2e.filters:Verdicts); its address."""
    rules = [
        {"stage": "mail", "match": "tempfail", "verdict": "tempfail", "code": 451, "status": "4.7.0",
         "text": ["greylisted", "try again"]},
        {"stage": "mail", "match": "discard", "verdict": "discard"},
        {"stage": "rcpt", "match": "nobody", "verdict": "reject", "code": 550, "status": "5.1.1",
         "text": "no such user"},
        {"stage": "eom", "match": "reject me", "verdict": "reject"},
    ]
    filters = [{"name": "verdicts", "class": "tests.e2e.filters:Verdicts", "options": {"rules": rules}}]
    with MilterDaemon(filters, name="verdicts") as daemon:
        yield f"inet:{daemon.port}@127.0.0.1"


@pytest.mark.parametrize(("args", "status", "shown"), [
    (["--from", "tempfail@example.org"], 2, "451-4.7.0 greylisted"),
    (["--from", "discard@example.org"], 3, "verdict   discard by milter 1 at MAIL (<discard@example.org>)"),
    (["--to", "nobody@example.net"], 1, "refused   <nobody@example.net>: 550 5.1.1 no such user"),
    (["--to", "nobody@example.net", "--to", "b@example.net"], 0, "refused   <nobody@example.net>"),
])
def test_verdict_exit_status(verdicts: str, args: list[str], status: int, shown: str) -> None:
    """Reject 1, tempfail 2, discard 3; a refused recipient among others still delivers (0)."""
    run = txmilt_check(verdicts, *args)
    assert run.returncode == status, run.stdout + run.stderr
    assert shown in run.stdout


def test_reject_at_end_of_message(verdicts: str, message_file: Callable[[bytes], str]) -> None:
    """A rejection at end of message: exit status 1, the stage named."""
    run = txmilt_check(verdicts, message_file(MESSAGE.replace(b"Quarterly figures", b"please reject me")))
    assert run.returncode == 1
    assert "verdict   reject by milter 1 at BODYEOB" in run.stdout


# ------------------------------------------------------------------ failures


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_nothing_listens() -> None:
    """A port nothing listens on: exit status 4 and one line on stderr."""
    run = txmilt_check(f"inet:{free_port()}@127.0.0.1")
    assert run.returncode == 4
    assert "cannot connect to milter at inet:" in one_line(run)


@pytest.fixture
def fake_milter() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A one-connection server on loopback that treats its client with the given function; its address."""
    servers: list[tuple[socket.socket, threading.Thread]] = []

    def start(handle: Callable[[socket.socket], None]) -> str:
        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(RUN_TIMEOUT)

        def serve() -> None:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection, contextlib.suppress(OSError):  # the client may reset the connection
                handle(connection)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"inet:{server.getsockname()[1]}@127.0.0.1"

    yield start
    for server, thread in servers:
        server.close()
        thread.join(RUN_TIMEOUT)


def _garble(connection: socket.socket) -> None:
    connection.recv(1024)
    connection.sendall(b"\x00\x00\x00\x01Z")  # no milter response has the letter Z
    connection.recv(1024)


def _stay_silent(connection: socket.socket) -> None:
    connection.settimeout(RUN_TIMEOUT)
    while connection.recv(1024):
        pass


def test_protocol_violation(fake_milter: Callable[[Callable[[socket.socket], None]], str]) -> None:
    """A 'milter' that answers with garbage: exit status 4 and one line saying what it sent."""
    address = fake_milter(_garble)
    run = txmilt_check(address)
    assert run.returncode == 4
    assert one_line(run) == f"txmilt-check: {address}: unknown response 'Z' (in stage before OPTNEG)"


def test_timeout(fake_milter: Callable[[Callable[[socket.socket], None]], str]) -> None:
    """A 'milter' that never answers: exit status 4 after --timeout, one line."""
    address = fake_milter(_stay_silent)
    run = txmilt_check("--timeout", "0.5", address)
    assert run.returncode == 4
    assert one_line(run) == f"txmilt-check: {address}: milter gave no reply to OPTNEG ('O') within 0.5s"


def test_malformed_message(examples: str, message_file: Callable[[bytes], str]) -> None:
    """A file that is no message: exit status 64 and one line naming the line at fault; no milter is asked."""
    path = message_file(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    run = txmilt_check(examples, path)
    assert run.returncode == 64
    assert one_line(run) == f"txmilt-check: {path}, line 1: '%PDF-1.4' is not a header field (Name: value);" \
                            " an empty line must come before the body"


def test_usage_errors() -> None:
    """Bad command lines: exit status 64, one line."""
    for args in ([], ["--count", "0", "inet:1@127.0.0.1"], ["nowhere:1"], ["message.eml"]):
        run = txmilt_check(*args)
        assert run.returncode == 64, (args, run)
        one_line(run)


def test_module_runs() -> None:
    """``python -m txmilt.check --help`` documents the exit statuses."""
    run = subprocess.run(
        [sys.executable, "-m", "txmilt.check", "--help"], capture_output=True, text=True, timeout=RUN_TIMEOUT,
        check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0
    assert "exit status: 0 accepted" in run.stdout


# ---------------------------------------------------------------------- load


def test_load(examples: str) -> None:
    """The load mode reports a rate and no errors; --json parses."""
    run = txmilt_check(examples, "--count", "60", "--concurrency", "4", "--messages-per-connection", "5")
    assert run.returncode == 0, run.stderr
    assert "messages/s (60 answered)" in run.stdout
    assert "errors      none" in run.stdout
    assert run.stderr == ""  # no progress bar when stderr is not a terminal
    report: dict[str, Any] = json.loads(txmilt_check("--json", "--count", "20", "--concurrency", "2", examples).stdout)
    assert report["mode"] == "load" and report["answered"] == 20
    assert report["errors"] == {} and report["verdicts"] == {"continue": 20}
    assert report["messages_per_second"] > 0
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p90"] <= report["latency_ms"]["p99"]


def test_load_errors() -> None:
    """Load against a port nothing listens on: every message an error of kind connect, exit status 4."""
    run = txmilt_check("--json", "--count", "3", f"inet:{free_port()}@127.0.0.1")
    assert run.returncode == 4
    report = json.loads(run.stdout)
    assert report["errors"] == {"connect": 3} and report["answered"] == 0
