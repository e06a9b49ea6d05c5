"""A loopback TCP proxy between an MTA and a milter that records every packet both ways.

Put it between Postfix and the milter daemon to see on the wire what
Postfix sent (ABORT after each message, how many BODY chunks after SKIP)
and what the milter answered.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = ["Packet", "WireTap"]

#: Body payloads longer than this are kept cut short (a 5 MiB message need not be stored twice).
_KEEP = 256


@dataclass(frozen=True)
class Packet:
    """One milter packet: who sent it, its command or response letter, and (the start of) its payload."""

    sender: str  # "mta" or "milter"
    letter: str
    payload: bytes
    size: int


@dataclass
class Session:
    """The packets of one MTA connection, in the order each side sent them."""

    packets: list[Packet] = field(default_factory=list)
    closed: bool = False

    def letters(self, sender: str) -> str:
        """The letters one side sent, as a string (macro packets 'D' included)."""
        return "".join(p.letter for p in self.packets if p.sender == sender)


class _Framer:
    def __init__(self, sender: str, session: Session, lock: threading.Lock) -> None:
        self.sender = sender
        self.session = session
        self.lock = lock
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            length = int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < 4 + length:
                return
            frame = bytes(self.buffer[4:4 + length])
            del self.buffer[:4 + length]
            letter = chr(frame[0]) if frame else ""
            with self.lock:
                self.session.packets.append(Packet(self.sender, letter, frame[1:_KEEP], len(frame) - 1))


class WireTap:
    """Listens on a free 127.0.0.1 port and relays each connection to ``target``, recording packets."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sessions: list[Session] = []
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept, name=f"wiretap-{self.port}", daemon=True)

    @property
    def spec(self) -> str:
        """The tap's address in Postfix's notation, for ``smtpd_milters``."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def sessions(self) -> list[Session]:
        """The connections seen so far (the live objects; read them once the MTA is done)."""
        with self._lock:
            return list(self._sessions)

    def clear(self) -> None:
        """Forget the sessions recorded so far."""
        with self._lock:
            self._sessions.clear()

    def wait_closed(self, count: int, timeout: float = 10.0) -> list[Session]:
        """Wait until ``count`` sessions were recorded and all of them have ended."""
        deadline = time.monotonic() + timeout
        while True:
            sessions = self.sessions
            if len(sessions) >= count and all(s.closed for s in sessions):
                return sessions
            if time.monotonic() > deadline:
                raise TimeoutError(f"wiretap: {len(sessions)} session(s), expected {count} closed ones")
            time.sleep(0.02)

    def start(self) -> Self:
        """Start accepting in a daemon thread."""
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting and cut every relayed connection."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in [self._acceptor, *self._threads]:
            if thread.is_alive():
                thread.join(5)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket) -> None:
        session = Session()
        with self._lock:
            self._sessions.append(session)
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            session.closed = True
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets.update((client, server))
        peers = {client: (server, _Framer("mta", session, self._lock)),
                 server: (client, _Framer("milter", session, self._lock))}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select():
                        ready = key.fileobj
                        assert isinstance(ready, socket.socket)
                        data = ready.recv(262144)
                        if not data:
                            return
                        other, framer = peers[ready]
                        framer.feed(data)
                        other.sendall(data)
            except OSError:
                return
            finally:
                with self._lock:
                    self._sockets.difference_update((client, server))
                for sock in (client, server):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                session.closed = True

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
