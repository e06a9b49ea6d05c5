"""``twistd --reactor=asyncio milter``: callbacks awaiting asyncio over a real socket; the advice elsewhere."""

from __future__ import annotations

import contextlib
import socketserver
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.integration import test_daemon
from tests.integration.test_daemon import MTA, Daemon, free_port, tcp_connect
from txmilt.messages import AddHeader, Connect, Continue, Family, Helo, Macros, MailFrom, RcptTo, Reject, TempFail

ANSWERS = {"spam@example.net": "REJECT No spam here"}


class PolicyServer(socketserver.ThreadingTCPServer):
    """A Postfix policy service on 127.0.0.1 answering by recipient; ``requests`` holds what it was asked."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), PolicyHandler)
        self.requests: list[dict[str, str]] = []


class PolicyHandler(socketserver.StreamRequestHandler):
    """Answers one policy request."""

    def handle(self) -> None:
        request = {}
        while line := self.rfile.readline().decode().strip():
            name, _, value = line.partition("=")
            request[name] = value
        assert isinstance(self.server, PolicyServer)
        self.server.requests.append(request)
        self.wfile.write(f"action={ANSWERS.get(request.get('recipient', ''), 'DUNNO')}\n\n".encode())


@contextlib.contextmanager
def running_policy_server() -> Iterator[PolicyServer]:
    """A PolicyServer serving in a thread while the block runs."""
    server = PolicyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def policy_service() -> Iterator[PolicyServer]:
    """A PolicyServer for the test."""
    with running_policy_server() as server:
        yield server


def config(port: int, policy_port: int) -> str:
    """The asyncio Sleeper and the policy_check example, listening on 127.0.0.1:port."""
    return f"""
[daemon]
listen = ["inet:{port}@127.0.0.1"]
timeout = 5
drain_timeout = 1

[[filter]]
name = "sleeper"
class = "tests.integration.asyncio_filters:Sleeper"

[[filter]]
name = "policy"
class = "examples.policy_check:PolicyCheck"
options = {{ port = {policy_port} }}
"""


def start_envelope(mta: MTA) -> None:
    """Negotiate, connect, HELO and MAIL, each answered Continue."""
    mta.negotiate()
    mta.send(Macros("C", (("j", "mx.example"), ("{client_addr}", "192.0.2.7"))))
    for command in (Connect("client.example", Family.INET, 40000, "192.0.2.7"), Helo("client.example"),
                    MailFrom("<Alice@example.org>")):
        assert mta.send(command) in ([], [Continue()]), command


def start_message(daemon: Callable[[str], Daemon], policy_service: PolicyServer) -> tuple[Daemon, MTA]:
    """Start twistd with the Sleeper and the policy example; an MTA connected to it, its message begun."""
    port = free_port()
    milter = daemon(config(port, policy_service.server_address[1]))
    milter.start()
    milter.wait_listening(lambda: tcp_connect(port))
    mta = MTA(tcp_connect(port))
    start_envelope(mta)
    return milter, mta


def test_asyncio_reactor(
    daemon: Callable[[str], Daemon], policy_service: PolicyServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the asyncio reactor a callback awaits asyncio.sleep and an asyncio client (the policy example)."""
    monkeypatch.setattr(test_daemon, "TWISTD", [*test_daemon.TWISTD, "--reactor=asyncio"])
    milter, mta = start_message(daemon, policy_service)
    try:
        assert mta.send(RcptTo("<spam@example.net>")) == [Reject("No spam here")]
        assert mta.send(RcptTo("<bob@example.net>")) == [Continue()]
        responses = mta.finish_message()
        assert responses[-1] == Continue(), responses
        assert [r.value.strip() for r in responses if isinstance(r, AddHeader)] == ["_UnixSelectorEventLoop"]
    finally:
        mta.close()
    asked = [(r["sender"], r["recipient"], r["client_address"]) for r in policy_service.requests]
    assert asked == [("Alice@example.org", "spam@example.net", "192.0.2.7"),
                     ("Alice@example.org", "bob@example.net", "192.0.2.7")]
    milter.terminate()
    milter.wait_stopped(10)


def test_default_reactor_advice(
    daemon: Callable[[str], Daemon], policy_service: PolicyServer,
) -> None:
    """On the default reactor the asyncio callback gets its fallback, and the log says to use --reactor=asyncio."""
    milter, mta = start_message(daemon, policy_service)
    try:
        assert mta.send(RcptTo("<bob@example.net>")) == [TempFail()]
    finally:
        mta.close()
    milter.terminate()
    milter.wait(10)
    output = milter.output()
    assert output.count("--reactor=asyncio") == 1, output
    assert "filter policy failed in rcpt_to; using fallback TempFail" in output, output
    assert "PolicyCheck.rcpt_to awaited asyncio, which needs Twisted's asyncio reactor" in output, output
    assert policy_service.requests == []
