"""Listening sockets bound once by the daemon, then served by it or handed to its worker processes.

The daemon binds every listen address itself, with its privileges, before it
knows whether it serves in this process or in workers; the ports accept only
once the daemon says so. A worker is handed the bound sockets as inherited
file descriptors (``spawnProcess(childFDs=...)``) and serves them with
``adopt``: all workers accept from the same kernel queue, so a worker that
stops (a reload, a crash) refuses nothing while another one accepts.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.python.failure import Failure
from typing_extensions import override

from txmilt.errors import ConfigurationError


class BoundSockets:
    """The daemon's listening ports: bound at start, accepting only when told, closed at stop."""

    def __init__(self, descriptions: Sequence[str], reactor: Any) -> None:
        self.descriptions = tuple(descriptions)
        self._reactor = reactor
        self._ports: list[Any] = []
        self._accepting = False

    def bind(self, factory: IProtocolFactory) -> None:
        """Listen on every description for ``factory``, not accepting yet; raises what listening raised."""
        for description in self.descriptions:
            results: list[object] = []
            serverFromString(self._reactor, description).listen(factory).addBoth(results.append)
            if not results:
                raise ConfigurationError(f"listen address {description!r} did not listen at once")
            if isinstance(results[0], Failure):
                results[0].raiseException()
            port = results[0]
            if not isinstance(port, tcp.Port):  # unix.Port is one too
                raise ConfigurationError(f"listen address {description!r} is not a stream socket")
            port.stopReading()
            self._ports.append(port)

    def accept(self) -> None:
        """Start accepting connections here."""
        self._accepting = True
        for port in self._ports:
            port.startReading()

    def handed(self) -> list[tuple[int, int]]:
        """The file descriptor and address family of every bound socket, to hand to workers.

        A shared socket is only closed here at the end, never shut down:
        shutdown() would end listening in every process at once.
        """
        for port in self._ports:
            port._shouldShutdown = False  # what Twisted sets for an adopted socket
        return [(port.fileno(), port.socket.family) for port in self._ports]

    def close(self) -> Deferred[None]:
        """Stop listening (a unix socket's file is removed); fires when every port is closed."""
        ports, self._ports = self._ports, []
        return close_ports(ports, take_queued=self._accepting)  # workers take their own queued connections


def close_ports(ports: Sequence[IListeningPort], *, take_queued: bool = True) -> Deferred[None]:
    """Stop listening on ``ports``, after taking the connections the kernel already queued for them.

    Closing a listening socket resets the connections queued on it, which the
    client (an MTA, a load balancer) already counts as accepted; taking them
    first lets the drain serve them instead.
    """
    for port in ports if take_queued else ():
        if isinstance(port, tcp.Port) and port.connected and not port.disconnecting:
            for _ in range(_MOST_QUEUED_ROUNDS):
                before = port.sessionno
                port.doRead()  # accepts until the queue is empty (or its batch size)
                if port.sessionno == before:
                    break
    closing: list[Deferred[None]] = [port.stopListening() or succeed(None) for port in ports]
    done: Deferred[None] = gatherResults(closing).addCallback(lambda _: None)
    return done


#: At most this many batches of queued connections are taken when a port closes.
_MOST_QUEUED_ROUNDS = 100


class _HandedUnixPort(unix.Port):
    """A unix socket a worker serves but does not own.

    Twisted's adopted unix port would chmod the file to 666 when it starts and
    shut the shared socket down and remove the file when it stops; the daemon
    set the file's mode and group and removes it itself.
    """

    _shouldShutdown = False  # noqa: N815 (Twisted's name)

    def __init__(self, handed: socket.socket, factory: IProtocolFactory, reactor: Any) -> None:
        super().__init__(handed.getsockname(), factory, reactor=reactor)
        self._handed = handed

    @override
    def startListening(self) -> None:
        factory: Any = self.factory
        factory.doStart()
        self.connected = True
        self.socket = self._handed
        self.fileno = self.socket.fileno  # type: ignore[method-assign]
        self.numberAccepts = 100
        self.startReading()  # type: ignore[no-untyped-call]

    @override
    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)  # not unix.Port's: the daemon removes the file


def adopt(reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> IListeningPort:
    """Serve the listening socket the daemon handed over as ``fd`` (which the caller may then close)."""
    if family == socket.AF_UNIX:
        port = _HandedUnixPort(socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM), factory, reactor)
        port.startListening()
        return port
    adopted: IListeningPort = reactor.adoptStreamPort(fd, family, factory)
    return adopted
