"""Sockets bound by the daemon and handed to workers: a worker that stops leaves the socket to the others."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory, Protocol

from txmilt.sockets import BoundSockets, adopt

from .test_daemon import free_port

#: Seconds any single wait may take before the test fails.
WAIT = 5.0


class Hello(Protocol):
    """Says hello and hangs up."""

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        assert self.transport is not None
        self.transport.write(b"hello")
        self.transport.loseConnection()


def greeting(family: int, address: Any) -> bytes:
    """What the server at ``address`` says to a new connection (blocking, in a thread)."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT)
        client.connect(address)
        return client.recv(16)


def still_listening(listener: socket.socket, family: int, address: Any) -> bool:
    """Whether ``listener`` (the daemon's copy) still accepts a new connection."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT)
        client.connect(address)
        listener.settimeout(WAIT)
        accepted, _ = listener.accept()
        accepted.close()
        return True


@pytest_twisted.ensureDeferred
async def test_handed_unix_socket_keeps_mode_and_file(reactor: Any, tmp_path: Path) -> None:
    """A worker's unix port serves, then stops without chmodding, shutting down or removing the socket."""
    path = str(tmp_path / "milter.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o640)
    listener.listen(8)
    listener.setblocking(False)
    port = adopt(reactor, listener.fileno(), socket.AF_UNIX, Factory.forProtocol(Hello))
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert await reactor_thread(reactor, greeting, socket.AF_UNIX, path) == b"hello"
    finally:
        await maybeDeferred(port.stopListening)
    assert os.path.exists(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o640
    listener.setblocking(True)
    assert still_listening(listener, socket.AF_UNIX, path)
    listener.close()


@pytest_twisted.ensureDeferred
async def test_handed_tcp_socket_survives_a_worker(reactor: Any) -> None:
    """A worker's TCP port stops without shutting the shared socket down."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    address = listener.getsockname()
    port = adopt(reactor, listener.fileno(), socket.AF_INET, Factory.forProtocol(Hello))
    try:
        assert await reactor_thread(reactor, greeting, socket.AF_INET, address) == b"hello"
    finally:
        await maybeDeferred(port.stopListening)
    listener.setblocking(True)
    assert still_listening(listener, socket.AF_INET, address)
    listener.close()


@pytest_twisted.ensureDeferred
async def test_daemon_copy_closes_without_shutdown(reactor: Any) -> None:
    """Once handed over, the daemon's own port closes its copy without ending listening for the workers."""
    port_number = free_port()
    sockets = BoundSockets([f"tcp:{port_number}:interface=127.0.0.1"], reactor)
    sockets.bind(Factory.forProtocol(Hello))
    ((fd, family),) = sockets.handed()
    worker_copy = socket.socket(family, socket.SOCK_STREAM, fileno=os.dup(fd))
    await sockets.close()
    worker_copy.setblocking(True)
    assert still_listening(worker_copy, socket.AF_INET, ("127.0.0.1", port_number))
    worker_copy.close()


def reactor_thread(reactor: Any, function: Any, *arguments: Any) -> Any:
    """Run a blocking ``function`` in a thread; a Deferred of its result."""
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, reactor.getThreadPool(), function, *arguments)


@pytest_twisted.ensureDeferred
async def test_closing_serves_what_the_kernel_queued(reactor: Any) -> None:
    """Connections already queued when the daemon stops listening are served, not reset.

    The kernel completes a client's handshake before the daemon accepts it; closing the
    listening socket then would reset it, which a load balancer cannot retry elsewhere.
    """
    port = free_port()
    sockets = BoundSockets([f"tcp:{port}:interface=127.0.0.1"], reactor)
    sockets.bind(Factory.forProtocol(Hello))
    sockets.accept()
    for listening in sockets._ports:
        listening.stopReading()  # as if the reactor had not got round to accepting yet
    clients = []
    for _ in range(3):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(WAIT)
        client.connect(("127.0.0.1", port))  # queued by the kernel, not yet accepted
        clients.append(client)
    await sockets.close()
    try:
        for client in clients:
            assert client.recv(16) == b"hello"
    finally:
        for client in clients:
            client.close()
