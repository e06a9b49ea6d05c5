"""Faults over real sockets: trickling, stalling and vanishing clients; filters that raise, hang or talk nonsense.

Each fault ends with a defined outcome and a log line naming the connection,
and a well-behaved connection served at the same time is not affected.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.integration.test_sockets import (
    WAIT,
    Journal,
    MTAClient,
    connect,
    eventually,
    listen,
    make_factory,
    port_number,
    stop,
)
from txmilt.chain import FilterSpec
from txmilt.codec import encode
from txmilt.messages import (
    Abort,
    Action,
    AddHeader,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Macros,
    MailFrom,
    Negotiate,
    NegotiateReply,
    Quit,
    RcptTo,
    ReplaceBody,
    Response,
    TempFail,
)
from txmilt.milter import Changes, Milter, Result
from txmilt.protocol import MilterFactory, MilterProtocol

# ------------------------------------------------------------------ helpers


@implementer(ILogObserver)
class Logs:
    """The log events published during a test."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def matching(self, *words: str) -> list[str]:
        return [line for line in self.lines() if all(word in line for word in words)]

    def internal_errors(self) -> list[str]:
        return self.matching("internal error")


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Collect log events while the test runs."""
    collected = Logs()
    globalLogPublisher.addObserver(collected)
    try:
        yield collected
    finally:
        globalLogPublisher.removeObserver(collected)


async def serve(reactor: Any, factory: MilterFactory) -> tuple[IListeningPort, TCP4ClientEndpoint]:
    port = await listen(reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), factory)
    return port, TCP4ClientEndpoint(reactor, "127.0.0.1", port_number(port))


async def good_messages(reactor: Any, endpoint: TCP4ClientEndpoint, count: int = 3) -> list[list[Response]]:
    """A well-behaved connection: ``count`` messages and QUIT; the end-of-message replies."""
    client = await connect(reactor, endpoint)
    replies = []
    for number in range(count):
        out = await client.message(
            "<a@example.com>", ["<b@example.net>"], [("Subject", f"m{number}"), ("From", "a")], b"secret\r\n"
        )
        replies.append(out["eom"])
    await client.send(Quit())
    await client.lost.addTimeout(WAIT, reactor)
    return replies


GOOD_EOM = [AddHeader("X-Header-Count", "2"), ReplaceBody(b"******\r\n"), Continue()]


class RawClient(Protocol):
    """Writes what it is told and remembers what came back."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 - Twisted's name
        self.lost.callback(None)


async def raw(reactor: Any, endpoint: TCP4ClientEndpoint) -> RawClient:
    client = RawClient()
    await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
    return client


def connection_of(factory: MilterFactory, predicate: Callable[[MilterProtocol], bool]) -> str:
    """The id of the open connection ``predicate`` picks."""
    (protocol,) = [p for p in factory.connections if predicate(p)]
    return protocol.connection_id


# ---------------------------------------------------------- slow or silent MTAs


class TrickleClient(MTAClient):
    """An MTA that writes every command one byte at a time."""

    written = 0

    async def trickle(self, command: Command, macros: Sequence[tuple[str, str]] = ()) -> list[Response]:
        assert self.transport is not None
        packets: list[Command] = [Macros(command.letter, tuple(macros))] if macros else []
        if self.session.wants(type(command)):
            packets.append(command)
        data = b"".join(self.session.send(packet) for packet in packets)
        waiting: Deferred[list[Response]] | None = None
        if self.session.reply_due:
            self._batch = []
            waiting = self._waiting = Deferred()
        self.written += len(data)
        for offset in range(len(data)):
            self.transport.write(data[offset:offset + 1])
            await deferLater(self.reactor, 0.0005, lambda: None)
        if waiting is None:
            return []
        return await waiting.addTimeout(WAIT, self.reactor)


@pytest_twisted.ensureDeferred
async def test_one_byte_at_a_time(reactor: Any, logs: Logs) -> None:
    """A client sending one byte per write gets a whole session served correctly."""
    journal = Journal(reactor)
    factory = make_factory(reactor, journal)
    port, endpoint = await serve(reactor, factory)
    reads: list[int] = []
    try:
        client = TrickleClient(reactor)
        await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
        client.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        await eventually(reactor, lambda: len(factory.connections) == 1)
        (protocol,) = factory.connections
        original = protocol.dataReceived

        def counting(data: bytes) -> None:
            reads.append(len(data))
            original(data)

        protocol.dataReceived = counting  # type: ignore[method-assign]
        assert isinstance((await client.trickle(Negotiate()))[0], NegotiateReply)
        opening: tuple[Command, ...] = (
            Connect("c.example", Family.INET, 4000, "192.0.2.9"), Helo("c.example"), MailFrom("<a@example.com>"),
            RcptTo("<b@example.net>"),
        )
        for command in opening:
            await client.trickle(command)
        assert await client.trickle(RcptTo("<blocked@example.net>")) != [Continue()]
        content: tuple[Command, ...] = (
            Data(), Header("Subject", "s"), Header("From", "a"), EndOfHeaders(), BodyChunk(b"a secret\r\n"),
        )
        for command in content:
            assert await client.trickle(command) in ([], [Continue()]), command
        assert await client.trickle(EndOfMessage()) == [
            AddHeader("X-Header-Count", "2"), ReplaceBody(b"a ******\r\n"), Continue(),
        ]
        await client.trickle(Quit())
        await client.lost.addTimeout(WAIT, reactor)
        await eventually(reactor, lambda: not factory.connections)
        assert sum(reads) == client.written > 100
        assert reads.count(1) > 0.9 * client.written, reads  # the server really read single bytes
        assert not logs.internal_errors()
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_half_frame_then_stall(reactor: Any, logs: Logs) -> None:
    """Half a frame, then silence: the idle timeout closes the connection, filters abort and close once."""
    journal = Journal(reactor)
    factory = make_factory(reactor, journal)
    factory.idle_timeout = 0.5
    port, endpoint = await serve(reactor, factory)
    try:
        client = await connect(reactor, endpoint)
        await client.run(MailFrom("<a@example.com>"), RcptTo("<b@example.net>"))
        conn = connection_of(factory, lambda p: True)
        packet = encode(Header("Subject", "a long subject that never ends"))
        assert client.transport is not None
        client.transport.write(packet[: len(packet) // 2])
        good = ensureDeferred(good_messages(reactor, endpoint))
        await client.lost.addTimeout(WAIT, reactor)
        assert await good == [GOOD_EOM] * 3
        await eventually(reactor, lambda: not factory.connections)
        lines = logs.matching(f"[{conn}]", "idle for 0.5s in stage RCPT", f"({len(packet) // 2} bytes of an unfinished")
        assert len(lines) == 1, logs.lines()
        for name in ("stamper", "rejecter", "inspector"):
            assert journal.events.count(f"{name} close") == 2  # this connection and the good one
        assert not logs.internal_errors()
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_never_negotiates(reactor: Any, logs: Logs) -> None:
    """Connections that never finish negotiating are closed at the negotiation deadline."""
    journal = Journal(reactor)
    factory = make_factory(reactor, journal)
    factory.negotiation_timeout = 0.3
    port, endpoint = await serve(reactor, factory)
    try:
        silent = [await raw(reactor, endpoint) for _ in range(10)]
        trickling = [await raw(reactor, endpoint) for _ in range(5)]
        for client in trickling:
            assert client.transport is not None
            client.transport.write(encode(Negotiate())[:7])
        good = ensureDeferred(good_messages(reactor, endpoint))
        started = reactor.seconds()
        for client in silent + trickling:
            await client.lost.addTimeout(WAIT, reactor)
            assert client.received == b""
        assert 0.25 <= reactor.seconds() - started < 3
        assert await good == [GOOD_EOM] * 3
        await eventually(reactor, lambda: not factory.connections)
        ids = {m[1] for line in logs.lines() if (m := re.search(r"\[(c\d+)\] no option negotiation within 0.3s", line))}
        assert len(ids) == 15, logs.lines()
        assert len(logs.matching("no option negotiation", "(7 bytes of an unfinished frame)")) == 5
    finally:
        await stop(port)


# ------------------------------------------------------- disconnect anywhere


def complete_session() -> bytes:
    """Everything a Postfix-like MTA sends for one connection with one message."""
    commands: list[Command] = [
        Negotiate(),
        Macros("C", (("j", "mx.example"), ("{client_addr}", "192.0.2.1"))),
        Connect("client.example", Family.INET, 4000, "192.0.2.1"),
        Helo("client.example"),
        Macros("M", (("{mail_addr}", "a@example.com"),)),
        MailFrom("<a@example.com>"),
        RcptTo("<b@example.net>"),
        RcptTo("<blocked@example.net>"),
        Data(),
        Header("Subject", "s"),
        Header("From", "a"),
        EndOfHeaders(),
        BodyChunk(b"the secret\r\n"),
        EndOfMessage(),
        Abort(),
        Quit(),
    ]
    return b"".join(encode(command) for command in commands)


class Counted(Milter):
    """Notes every instance serving a connection, and how often close and abort run."""

    actions = Action.ADD_HEADERS

    def __init__(self, registry: list[Counted], reactor: Any) -> None:
        self.closes = 0
        self.aborts = 0
        self.in_message = False
        self.reactor = reactor
        registry.append(self)

    def mail_from(self, command: MailFrom) -> Result:
        self.in_message = True
        return None

    async def header(self, command: Header) -> None:
        await deferLater(self.reactor, 0.002, lambda: None)

    def end_of_message(self, changes: Changes) -> Result:
        self.in_message = False
        changes.add_header("X-Counted", "1")
        return None

    def abort(self) -> Result:
        assert self.in_message, "abort outside a message"
        self.in_message = False
        self.aborts += 1
        return None

    def close(self) -> Result:
        self.closes += 1
        return None


@pytest_twisted.ensureDeferred
async def test_disconnect_at_every_offset(reactor: Any, logs: Logs) -> None:
    """An MTA vanishing after any number of bytes of a session leaks no connection; close runs once each."""
    journal = Journal(reactor)
    registry: list[Counted] = []
    factory = make_factory(
        reactor, journal, after=[FilterSpec(functools.partial(Counted, registry, reactor), name="counted")]
    )
    registry.clear()  # the instance the factory made to check the filter before serving
    data = complete_session()
    port, endpoint = await serve(reactor, factory)

    async def cut(offset: int) -> None:
        client = await raw(reactor, endpoint)
        assert client.transport is not None
        client.transport.write(data[:offset])
        if offset % 3 == 0:
            await deferLater(reactor, 0.005, lambda: None)  # let some filters be mid-callback
        client.transport.loseConnection()
        await client.lost.addTimeout(WAIT, reactor)

    try:
        offsets = list(range(len(data) + 1))
        for start in range(0, len(offsets), 25):
            batch = [ensureDeferred(cut(offset)) for offset in offsets[start:start + 25]]
            await DeferredList(batch, fireOnOneErrback=True, consumeErrors=True).addTimeout(WAIT * 2, reactor)
        await eventually(reactor, lambda: not factory.connections)
        await eventually(reactor, lambda: all(one.closes for one in registry))
        assert len(registry) == len(offsets)
        assert [one.closes for one in registry] == [1] * len(offsets)
        assert all(one.aborts <= 1 and not one.in_message for one in registry)
        for name in ("stamper", "rejecter", "inspector"):
            assert journal.events.count(f"{name} close") == len(offsets)
        assert not logs.internal_errors(), logs.internal_errors()
        assert not [e for e in logs.events if "log_failure" in e], logs.lines()
    finally:
        await stop(port)


# ------------------------------------------------------------ faulty filters


class Faulty(Milter):
    """On connections from a client named bad.*, every callback fails the way ``mode`` says."""

    actions = Action.ADD_HEADERS

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bad = False

    def misbehave(self) -> Any:
        if not self.bad:
            return None
        if self.mode == "raise":
            raise RuntimeError("faulty filter")
        if self.mode == "hang":
            return Deferred()
        return "not a verdict"

    def connect(self, command: Connect) -> Result:
        self.bad = command.hostname.startswith("bad.")
        return self.misbehave()  # type: ignore[no-any-return]

    def helo(self, command: Helo) -> Result:
        return self.misbehave()  # type: ignore[no-any-return]

    def mail_from(self, command: MailFrom) -> Result:
        return self.misbehave()  # type: ignore[no-any-return]

    def rcpt_to(self, command: RcptTo) -> Result:
        return self.misbehave()  # type: ignore[no-any-return]

    def data(self, command: Data) -> Result:
        return self.misbehave()  # type: ignore[no-any-return]

    def header(self, command: Header) -> Result:
        return self.misbehave()  # type: ignore[no-any-return]

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        return self.misbehave()  # type: ignore[no-any-return]

    def body(self, command: BodyChunk) -> Result:
        return self.misbehave()  # type: ignore[no-any-return]

    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header("X-Faulty", "half-made change")
        failed = self.misbehave()
        if failed is None:
            changes.edits.clear()
        return failed  # type: ignore[no-any-return]

    def close(self) -> Result:
        return self.misbehave()  # type: ignore[no-any-return]


STAGES = ("connect", "helo", "mail_from", "rcpt_to", "data", "header", "end_of_headers", "body", "end_of_message")
EXPECTED_LOG = {
    "raise": "failed in {stage}; using fallback Continue()",
    "hang": "timed out after 0.2s in {stage}; using fallback Continue()",
    "wrong": "returned 'not a verdict' from {stage}, not a verdict legal there; using fallback Continue()",
}


def faulty_factory(reactor: Any, journal: Journal, mode: str, fallback: Any = None) -> MilterFactory:
    spec = FilterSpec(
        functools.partial(Faulty, mode), name="faulty", timeout=0.2,
        fallback=fallback if fallback is not None else Continue(),
    )
    return make_factory(reactor, journal, before=[spec])


async def bad_session(reactor: Any, endpoint: TCP4ClientEndpoint) -> list[list[Response]]:
    """A whole session from a client the faulty filter misbehaves for; every reply batch."""
    client = MTAClient(reactor)
    await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
    replies = [await client.send(Negotiate())]
    replies += await client.run(Connect("bad.example", Family.INET, 4000, "192.0.2.66"), Helo("bad.example"))
    out = await client.message("<a@example.com>", ["<b@example.net>"], [("Subject", "s"), ("From", "a")],
                               b"secret\r\n")
    replies += [out["mail"], *out["rcpt"], out["data"], *out["headers"], out["eoh"], out["body"], out["eom"]]
    await client.send(Quit())
    await client.lost.addTimeout(WAIT, reactor)
    return replies


@pytest.mark.parametrize("mode", ["raise", "hang", "wrong"])
@pytest_twisted.ensureDeferred
async def test_faulty_filter(reactor: Any, logs: Logs, mode: str) -> None:
    """A filter that raises, hangs or returns a non-verdict at every callback gets its fallback each time.

    Its half-made end-of-message change is dropped, the other filters' are
    sent, each failure is logged with the connection id, and a good
    connection served at the same time gets exactly its normal answers.
    """
    journal = Journal(reactor)
    factory = faulty_factory(reactor, journal, mode)
    port, endpoint = await serve(reactor, factory)
    try:
        bad = ensureDeferred(bad_session(reactor, endpoint))
        good = ensureDeferred(good_messages(reactor, endpoint))
        bad_replies = await bad
        assert bad_replies[-1] == GOOD_EOM  # the faulty filter's X-Faulty is not among them
        assert await good == [GOOD_EOM] * 3
        await eventually(reactor, lambda: not factory.connections)
        # Every complaint about the faulty filter names one connection: the bad one.
        (conn,) = {m[1] for line in logs.matching("filter faulty") if (m := re.search(r"\[(c\d+)\]", line))}
        for stage in STAGES:
            wanted = EXPECTED_LOG[mode].format(stage=stage)
            assert len(logs.matching(f"[{conn}]", "filter faulty", wanted)) >= 1, (stage, logs.lines())
        assert not logs.internal_errors()
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_faulty_filter_default_fallback(reactor: Any, logs: Logs) -> None:
    """With the default fallback a raising filter tempfails the SMTP session at connect."""
    journal = Journal(reactor)
    factory = faulty_factory(reactor, journal, "raise", fallback=TempFail())
    port, endpoint = await serve(reactor, factory)
    try:
        client = MTAClient(reactor)
        await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
        await client.send(Negotiate())
        assert await client.send(Connect("bad.example", Family.INET, 4000, "192.0.2.66")) == [TempFail()]
        assert await good_messages(reactor, endpoint, 1) == [GOOD_EOM]
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost.addTimeout(WAIT, reactor)
        await eventually(reactor, lambda: not factory.connections)
        assert len(logs.matching("filter faulty failed in connect; using fallback TempFail(")) == 1
    finally:
        await stop(port)
