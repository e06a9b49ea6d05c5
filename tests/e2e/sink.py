"""A tiny stdlib-only SMTP sink that records what it is sent.

It listens on 127.0.0.1 (an ephemeral port by default), speaks just enough
ESMTP for Postfix's smtp client (EHLO with 8BITMIME, SIZE, PIPELINING,
SMTPUTF8 and optionally DSN; MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT) and
keeps every accepted message in memory as a :class:`SinkMessage`.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from types import TracebackType
from typing import Self, cast

__all__ = ["SMTPSink", "SinkMessage"]

MAX_MESSAGE_SIZE = 64 * 1024 * 1024
MAX_LINE = 1024 * 1024


@dataclass
class SinkMessage:
    """One message accepted by the sink, with its SMTP envelope."""

    helo: str
    peer: tuple[str, int]
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    data: bytes
    received_at: float = field(default_factory=time.time)

    def parsed(self) -> EmailMessage:
        """Parse :attr:`data` as an RFC 5322 message."""
        parsed = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def header_block(self) -> bytes:
        """Return the raw header section (without the blank separator line)."""
        head, _sep, _body = self.data.partition(b"\r\n\r\n")
        return head

    def body(self) -> bytes:
        """Return the raw body (everything after the first blank line)."""
        _head, _sep, body = self.data.partition(b"\r\n\r\n")
        return body


def _split_path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """Parse ``FROM:<addr> PARAMS`` / ``TO:<addr> PARAMS``; None if malformed."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip()
    if not rest.startswith("<"):
        # Be lenient with a bare address, as some clients send it.
        parts = rest.split()
        if not parts:
            return None
        return parts[0], parts[1:]
    end = rest.find(">")
    if end < 0:
        return None
    return rest[1:end], rest[end + 1 :].split()


class _Handler(socketserver.StreamRequestHandler):
    """One SMTP session."""

    server: _Server

    def setup(self) -> None:
        """Register the connection so the sink can close it on stop."""
        super().setup()
        self.server.sink._track(self.connection, add=True)

    def finish(self) -> None:
        """Unregister the connection."""
        with contextlib.suppress(OSError):
            super().finish()
        self.server.sink._track(self.connection, add=False)

    def _reply(self, text: str) -> None:
        self.wfile.write(text.encode("utf-8") + b"\r\n")
        self.wfile.flush()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[list[str]] = []

    def handle(self) -> None:
        """Run the SMTP dialogue until QUIT or disconnect."""
        sink = self.server.sink
        self.helo = ""
        self._reset()
        try:
            self._reply(f"220 {sink.hostname} ESMTP txmilt test sink")
            while True:
                raw = self.rfile.readline(MAX_LINE)
                if not raw:
                    return
                line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                verb, _sp, arg = line.partition(" ")
                if not self._command(verb.upper(), arg):
                    return
        except (OSError, ValueError):
            return

    def _command(self, verb: str, arg: str) -> bool:
        """Handle one command; return False to close the session."""
        sink = self.server.sink
        if verb == "EHLO":
            self.helo = arg.strip()
            self._reset()
            self._reply(f"250-{sink.hostname} greets {self.helo}")
            self._reply("250-PIPELINING")
            self._reply(f"250-SIZE {MAX_MESSAGE_SIZE}")
            if sink.dsn:
                self._reply("250-DSN")
            self._reply("250-8BITMIME")
            self._reply("250 SMTPUTF8")
        elif verb == "HELO":
            self.helo = arg.strip()
            self._reset()
            self._reply(f"250 {sink.hostname}")
        elif verb == "MAIL":
            parsed = _split_path(arg, "FROM:")
            if parsed is None:
                self._reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            elif self.mail_from is not None:
                self._reply("503 5.5.1 Error: nested MAIL command")
            else:
                self.mail_from, self.mail_options = parsed
                self._reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            parsed = _split_path(arg, "TO:")
            if self.mail_from is None:
                self._reply("503 5.5.1 Error: need MAIL command")
            elif parsed is None:
                self._reply("501 5.5.4 Syntax: RCPT TO:<address>")
            else:
                self.rcpt_tos.append(parsed[0])
                self.rcpt_options.append(parsed[1])
                self._reply("250 2.1.5 Ok")
        elif verb == "DATA":
            if self.mail_from is None or not self.rcpt_tos:
                self._reply("503 5.5.1 Error: need RCPT command")
            else:
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return False
                sink._record(
                    SinkMessage(
                        helo=self.helo,
                        peer=cast(tuple[str, int], self.client_address),
                        mail_from=self.mail_from,
                        mail_options=self.mail_options,
                        rcpt_tos=self.rcpt_tos,
                        rcpt_options=self.rcpt_options,
                        data=data,
                    )
                )
                self._reset()
                self._reply("250 2.0.0 Ok: queued")
        elif verb == "RSET":
            self._reset()
            self._reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            self._reply("250 2.0.0 Ok")
        elif verb == "VRFY":
            self._reply("252 2.0.0 Cannot VRFY")
        elif verb == "QUIT":
            self._reply("221 2.0.0 Bye")
            return False
        else:
            self._reply("502 5.5.2 Error: command not recognized")
        return True

    def _read_data(self) -> bytes | None:
        """Read a dot-terminated DATA section and undo dot-stuffing."""
        chunks: list[bytes] = []
        line_start = True
        while True:
            raw = self.rfile.readline(MAX_LINE)
            if not raw:
                return None
            if line_start:
                if raw in (b".\r\n", b".\n"):
                    return b"".join(chunks)
                if raw.startswith(b"."):
                    raw = raw[1:]
            # A line longer than MAX_LINE arrives in pieces; only the first
            # piece can carry the terminator or a stuffed dot.
            line_start = raw.endswith(b"\n")
            chunks.append(raw)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], sink: SMTPSink) -> None:
        self.sink = sink
        super().__init__(address, _Handler)


class SMTPSink:
    """SMTP server on loopback, run in a background thread, storing messages.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, hostname: str = "sink.test", *, dsn: bool = False
    ) -> None:
        self.hostname = hostname
        #: Announce DSN (RFC 3461), so that Postfix passes NOTIFY, ORCPT, RET and ENVID on.
        self.dsn = dsn
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._messages: list[SinkMessage] = []
        self._conns: set[socket.socket] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the sink listens on (valid after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("sink is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        """The listening TCP port."""
        return self.address[1]

    @property
    def messages(self) -> list[SinkMessage]:
        """A snapshot of the messages received so far."""
        with self._cond:
            return list(self._messages)

    def start(self) -> Self:
        """Bind and start serving in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("sink already started")
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"smtp-sink-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, drop open sessions and close the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._cond:
            self._messages.clear()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least ``count`` messages arrived; return them all.

        Raises :class:`TimeoutError` if they do not arrive within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"SMTP sink got {len(self._messages)} message(s), "
                        f"expected {count} within {timeout:.1f}s"
                    )
                self._cond.wait(remaining)
            return list(self._messages)

    def _record(self, message: SinkMessage) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
