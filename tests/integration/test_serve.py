"""txmilt.serve: filters served from a Python program over real sockets, with errors visible on stderr."""

from __future__ import annotations

import os
import queue
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]

from tests.integration.test_asyncio import PolicyServer, running_policy_server, start_envelope
from tests.integration.test_daemon import MTA, ROOT, accepts, free_port, tcp_connect, wait_until
from tests.integration.test_sockets import port_number, stop
from tests.test_readme import readme_blocks
from txmilt import Action, Changes, Milter, serve
from txmilt.client import connect_milter
from txmilt.errors import ConfigurationError
from txmilt.messages import (
    AddHeader,
    BodyChunk,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    MailFrom,
    Quit,
    RcptTo,
    Reject,
    TempFail,
)

WAIT = 10.0

#: A program that serves a filter whose helo raises; with the argument "logging" it begins Twisted logging first.
PROGRAM = """
import sys
import tempfile
import threading
from twisted.internet import reactor
from txmilt import Milter, serve

class Broken(Milter):
    def helo(self, command):
        return 1 / 0

if sys.argv[1:] == ["logging"]:
    from twisted.logger import globalLogBeginner, textFileLogObserver
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
serve([Broken], "tcp:0:interface=127.0.0.1").addCallback(lambda port: print("port", port.getHost().port, flush=True))
reactor.run()
"""


class Stamp(Milter):
    """Adds ``X-Served: yes`` at end of message."""

    actions = Action.ADD_HEADERS

    def end_of_message(self, changes: Changes) -> None:
        changes.add_header("X-Served", "yes")


async def one_message(reactor: Any, address: str) -> tuple[object, ...]:
    """Send one message to the milter at ``address``; the end-of-message modifications and verdict."""
    client = await connect_milter(address, reactor, timeout=WAIT)
    for command in (Connect("client.example", Family.INET, 40000, "192.0.2.7"), Helo("client.example"),
                    MailFrom("<a@example.org>"), RcptTo("<b@example.com>"), Data(), Header("Subject", "hi"),
                    EndOfHeaders(), BodyChunk(b"Hi\r\n")):
        await client.send(command)
    reply = await client.send(EndOfMessage())
    await client.send(Quit())
    return (*reply.modifications, reply.verdict)


@pytest_twisted.ensureDeferred
async def test_serve_tcp(reactor: Any) -> None:
    """serve() listens on a strports description with the given limits; a message gets the filter's change."""
    port = await serve([Stamp], "tcp:0:interface=127.0.0.1", reactor=reactor, max_connections=7)
    try:
        assert port.factory.max_connections == 7  # type: ignore[attr-defined]
        answer = await one_message(reactor, f"inet:{port_number(port)}@127.0.0.1")
        assert answer == (AddHeader("X-Served", "yes"), Continue())
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_serve_unix_replaces_stale_socket(reactor: Any) -> None:
    """A libmilter unix address: a stale socket file is removed, the new socket gets mode 660."""
    with tempfile.TemporaryDirectory(prefix="txmilt-", dir="/tmp") as directory:  # short: sun_path is ~100 bytes
        path = Path(directory) / "milter.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()
        port = await serve([Stamp], f"unix:{path}", reactor=reactor)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            assert await one_message(reactor, f"unix:{path}") == (AddHeader("X-Served", "yes"), Continue())
        finally:
            await stop(port)


def test_bad_address_fails_at_the_call() -> None:
    """An address that is not understood raises ConfigurationError before anything listens."""
    with pytest.raises(ConfigurationError, match="not understood"):
        serve([Stamp], "8891")


def start_program(source: str, *arguments: str) -> subprocess.Popen[str]:
    """Run Python ``source`` from the repository root, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-c", source, *arguments], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def stop_program(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Terminate the program; what it wrote on stdout and stderr."""
    process.terminate()
    return process.communicate(timeout=WAIT)


def wait_listening(process: subprocess.Popen[str], port: int) -> None:
    """Wait until the program accepts connections on 127.0.0.1:port; fail with its output if it exits."""

    def ready() -> bool:
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the program exited with {process.returncode}:\n{out}{err}")
        return accepts(lambda: tcp_connect(port))

    wait_until(ready, WAIT, "the program to listen")


def run_program(*arguments: str) -> tuple[str, str]:
    """Run PROGRAM, have an MTA send HELO to it (answered TempFail), stop it; its stdout and stderr."""
    process = start_program(PROGRAM, *arguments)
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    before = ""
    try:
        while not before.endswith("\n") or not before.splitlines()[-1].startswith("port "):
            try:
                before += lines.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail(f"no port announced; output so far: {before!r}")
        mta = MTA(tcp_connect(int(before.splitlines()[-1].split()[1])))
        try:
            mta.negotiate()
            mta.send(Connect("client.example", Family.INET, 40000, "192.0.2.7"))
            assert mta.send(Helo("client.example")) == [TempFail()]
        finally:
            mta.close()
    finally:
        process.terminate()
        process.wait(WAIT)
        reader.join(WAIT)
    while not lines.empty():
        before += lines.get()
    return before, process.stderr.read() if process.stderr else ""


def test_errors_on_stderr_without_logging() -> None:
    """A program that never began logging still sees a filter's traceback on stderr, once."""
    _, err = run_program()
    assert err.count("filter Broken failed in helo; using fallback TempFail") == 1, err
    assert err.count("ZeroDivisionError") == 1, err


def test_no_copy_once_logging_began() -> None:
    """A program that began Twisted logging gets the traceback there only, not also on stderr."""
    out, err = run_program("logging")
    assert out.count("filter Broken failed in helo") == 1, out
    assert "ZeroDivisionError" not in err, err


def test_readme_serve() -> None:
    """The README's serve() program, with its NoCasino filter, refuses a casino subject over TCP."""
    blocks, port = readme_blocks(), free_port()
    serving = blocks["Serving from Python", 0]
    assert serving.count("8891") == 1
    process = start_program(blocks["A filter in ten lines", 0] + serving.replace("8891", str(port)))
    try:
        wait_listening(process, port)
        mta = MTA(tcp_connect(port))
        try:
            start_envelope(mta)
            for command in (RcptTo("<b@example.com>"), Data(), Header("From", "a@example.org")):
                assert mta.send(command) in ([], [Continue()])
            assert mta.send(Header("Subject", "Casino night")) == [
                Reject("No gambling, please.", code=550, status="5.7.1")
            ]
        finally:
            mta.close()
    finally:
        stop_program(process)


def test_readme_serve_on_asyncio() -> None:
    """The README's asyncio serve() program runs the policy example, which asks its service with asyncio."""
    with running_policy_server() as policy_service:
        serve_policy_check(policy_service)


def serve_policy_check(policy_service: PolicyServer) -> None:
    """Run the README's asyncio program against ``policy_service`` and send it two recipients."""
    source, port = readme_blocks()["Serving from Python", 1], free_port()
    assert source.count("8891") == 1 and source.count("serve([PolicyCheck]") == 1
    source = source.replace("8891", str(port)).replace(
        "serve([PolicyCheck]", f"serve([lambda: PolicyCheck(port={policy_service.server_address[1]})]"
    )
    process = start_program(source)
    try:
        wait_listening(process, port)
        mta = MTA(tcp_connect(port))
        try:
            start_envelope(mta)
            assert mta.send(RcptTo("<spam@example.net>")) == [Reject("No spam here")]
            assert mta.send(RcptTo("<bob@example.net>")) == [Continue()]
        finally:
            mta.close()
    finally:
        stop_program(process)
    assert [request["recipient"] for request in policy_service.requests] == ["spam@example.net", "bob@example.net"]
