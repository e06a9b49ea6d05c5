"""RemoteMilter over real loopback TCP: a txmilt chain whose member is another txmilt server."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater

from txmilt.chain import FilterSpec
from txmilt.client import MilterClient, Reply, connect_milter
from txmilt.interfaces import IMilter
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
    MacroStage,
    MailFrom,
    RcptTo,
    Reject,
    Skip,
    TempFail,
)
from txmilt.milter import Changes, Milter, Result
from txmilt.protocol import MilterFactory
from txmilt.remote import RemoteMilter

reactor: Any = _reactor
T = TypeVar("T")
WAIT = 10.0  # no single step of these tests should take longer


async def within(deferred: Deferred[T], seconds: float = WAIT) -> T:
    """Await ``deferred`` under a timeout, so a hang fails the test instead of stalling it."""
    return await deferred.addTimeout(seconds, reactor)


@dataclass
class Seen:
    """What the external filter was shown, shared by its instances."""

    connect_macros: list[str | None] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    closed: int = 0


class Tagger(Milter):
    """The "external" filter: tags every message, rejects spam subjects, hangs on "slow"."""

    actions = Action.ADD_HEADERS
    macro_requests: ClassVar[dict[MacroStage, tuple[str, ...]]] = {MacroStage.CONNECT: ("j",)}
    seen: ClassVar[Seen] = Seen()

    def connect(self, command: Connect) -> Result:
        self.seen.connect_macros.append(self.macros.get("j"))
        return None

    def header(self, command: Header) -> Result:
        self.seen.headers.append((command.name, command.value))
        if command.name == "Subject" and "spam" in command.value:
            return Reject("no spam here", code=554, status="5.7.0")
        if command.name == "Subject" and "slow" in command.value:
            return Deferred()  # never answers
        return None

    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header("X-Remote", "checked")
        return None

    def close(self) -> Result:
        self.seen.closed += 1
        return None


class Local(Milter):
    """The filter that runs in the front chain itself."""

    actions = Action.ADD_HEADERS

    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header("X-Local", "yes")
        return None


@dataclass
class Servers:
    """The external milter, the front chain in front of it, and an MTA connected to the front."""

    remote_port: int
    front: MilterFactory
    ports: list[IListeningPort]
    factories: list[MilterFactory]

    async def mta(self) -> MilterClient:
        port = port_of(self.ports[-1])
        return await within(connect_milter(f"inet:{port}@127.0.0.1", reactor))


def listen(factory: MilterFactory) -> IListeningPort:
    port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port


def port_of(listening: IListeningPort) -> int:
    address = listening.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture
async def servers() -> AsyncIterator[Callable[..., Servers]]:
    """Start an external milter and a front chain ``[Local, RemoteMilter(...)]`` pointing at it."""
    Tagger.seen = Seen()
    started: list[Servers] = []

    def start(remote_address: str | None = None, **remote_options: Any) -> Servers:
        external = MilterFactory([Tagger], reactor)
        external_port = listen(external)
        address = remote_address or f"inet:{port_of(external_port)}@127.0.0.1"
        filters: Sequence[FilterSpec | Callable[[], IMilter]] = [
            Local, RemoteMilter.spec(address, name="tagger", reactor=reactor, **remote_options)
        ]
        front = MilterFactory(filters, reactor)
        front_port = listen(front)
        servers = Servers(port_of(external_port), front, [external_port, front_port], [external, front])
        started.append(servers)
        return servers

    yield start
    for servers in started:
        for factory in servers.factories:
            for protocol in list(factory.connections):
                if protocol.transport is not None:
                    protocol.transport.loseConnection()
            await wait_for(lambda f=factory: not f.connections, "connections to close")  # type: ignore[misc]
        for port in servers.ports:
            await maybeDeferred(port.stopListening)


async def session_start(mta: MilterClient) -> None:
    """Negotiate-time is over; CONNECT and HELO, both continued."""
    reply = await within(mta.send(
        Connect("mail.example.com", Family.INET, 54321, "192.0.2.10"), {"j": "mx.example.net"}
    ))
    assert reply.verdict == Continue()
    assert (await within(mta.send(Helo("mail.example.com")))).verdict == Continue()


async def message(mta: MilterClient, subject: str) -> list[tuple[Command, Reply]]:
    """One message, stopping at the first refusal as the MTA would; the replies."""
    replies: list[tuple[Command, Reply]] = []
    skipping = False
    for command in (
        MailFrom("<alice@example.com>"), RcptTo("<bob@example.net>"), Data(),
        Header("Subject", subject), Header("To", "  <bob@example.net>"), EndOfHeaders(),
        BodyChunk(b"Hi Bob\r\n"), BodyChunk(b"Bye\r\n"), EndOfMessage(),
    ):
        if skipping and isinstance(command, BodyChunk):
            continue
        reply = await within(mta.send(command))
        replies.append((command, reply))
        skipping = isinstance(reply.verdict, Skip)
        if not isinstance(reply.verdict, Continue | Skip):
            break
    return replies


async def finish(servers: Servers, mta: MilterClient) -> None:
    await within(mta.quit())
    await wait_for(lambda: Tagger.seen.closed >= 1, "the external filter to be closed")


@pytest_twisted.ensureDeferred
async def test_remote_changes_arrive(servers: Callable[..., Servers]) -> None:
    """The remote's header and the local one both reach the MTA, the remote saw the macros it asked for."""
    front = servers()
    mta = await front.mta()
    assert mta.negotiated is not None and mta.negotiated.protocol
    await session_start(mta)
    replies = await message(mta, " Hello")
    # Neither filter reads the body: the remote switched it off, so the chain asks the MTA to skip it.
    assert [type(command) for command, _ in replies][-2:] == [BodyChunk, EndOfMessage]
    assert replies[-2][1] == Reply(Skip())
    last = replies[-1][1]
    assert last.verdict == Continue()
    # Leading space negotiated with this "MTA" (RemoteMilter asks for exact values): both values carry it.
    assert last.modifications == (AddHeader("X-Local", " yes"), AddHeader("X-Remote", " checked"))
    assert Tagger.seen.connect_macros == ["mx.example.net"]
    # The external filter did not ask for leading space: it sees values as an MTA would strip them.
    assert Tagger.seen.headers == [("Subject", "Hello"), ("To", " <bob@example.net>")]
    await finish(front, mta)


@pytest_twisted.ensureDeferred
async def test_remote_reject_arrives(servers: Callable[..., Servers]) -> None:
    """The remote's custom reject is the chain's answer; the next message on the session still works."""
    front = servers()
    mta = await front.mta()
    await session_start(mta)
    replies = await message(mta, " buy spam now")
    command, last = replies[-1]
    assert command == Header("Subject", " buy spam now")
    assert last.verdict == Reject("no spam here", code=554, status="5.7.0")
    await within(mta.abort())
    replies = await message(mta, " second")
    assert replies[-1][1].verdict == Continue()
    assert AddHeader("X-Remote", " checked") in replies[-1][1].modifications
    await finish(front, mta)


@pytest_twisted.ensureDeferred
async def test_refused_connection_uses_fallback(servers: Callable[..., Servers]) -> None:
    """A remote that refuses connections gets its fallback; the local filter goes on working."""
    front = servers(f"inet:{free_port()}@127.0.0.1", fallback=Continue())
    mta = await front.mta()
    await session_start(mta)
    replies = await message(mta, " Hello")
    assert replies[-1][1] == Reply(Continue(), (AddHeader("X-Local", " yes"),))
    await within(mta.quit())


@pytest_twisted.ensureDeferred
async def test_refused_connection_tempfails_by_default(servers: Callable[..., Servers]) -> None:
    """With the default fallback an unreachable remote tempfails the connection."""
    front = servers(f"inet:{free_port()}@127.0.0.1")
    mta = await front.mta()
    reply = await within(mta.send(Connect("mail.example.com", Family.INET, 54321, "192.0.2.10")))
    assert reply.verdict == TempFail()
    await within(mta.quit())


@pytest_twisted.ensureDeferred
async def test_hanging_remote_times_out(servers: Callable[..., Servers]) -> None:
    """A remote silent past its timeout gets its fallback at that command and for the rest of the session."""
    front = servers(timeout=0.5, fallback=Continue())
    mta = await front.mta()
    await session_start(mta)
    started = time.monotonic()
    replies = await message(mta, " slow")
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 5, elapsed
    assert replies[-1][1] == Reply(Continue(), (AddHeader("X-Local", " yes"),))
    # The external milter's connection was dropped, so its filter was closed.
    await wait_for(lambda: Tagger.seen.closed == 1, "the external filter to be closed")
    await within(mta.quit())


@pytest_twisted.ensureDeferred
async def test_hanging_remote_tempfails(servers: Callable[..., Servers]) -> None:
    """With the TempFail fallback, the command the remote hangs on is tempfailed."""
    front = servers(timeout=0.5, fallback=TempFail())
    mta = await front.mta()
    await session_start(mta)
    replies = await message(mta, " slow")
    assert replies[-1] == (Header("Subject", " slow"), Reply(TempFail()))
    await within(mta.send(Abort()))
    await within(mta.quit())
