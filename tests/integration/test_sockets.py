"""The real server on loopback TCP and a unix socket, driven by a small MTA built on MTASession."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from txmilt.chain import FilterSpec
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
    Reject,
    ReplaceBody,
    Response,
)
from txmilt.milter import Changes, FilterVerdict, Milter, Result
from txmilt.protocol import MilterFactory
from txmilt.session import NEED_DATA, Disconnected, MTASession

#: Seconds any single wait may take before the test fails.
WAIT = 5.0


# ------------------------------------------------------------------ filters


class Journal:
    """What the filters of all connections did, and waiting until something happened."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.events: list[str] = []
        self._waiters: list[tuple[Callable[[list[str]], bool], Deferred[None]]] = []

    def record(self, event: str) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            predicate, deferred = waiter
            if predicate(self.events):
                self._waiters.remove(waiter)
                deferred.callback(None)

    def until(self, predicate: Callable[[list[str]], bool]) -> Deferred[None]:
        if predicate(self.events):
            return succeed(None)
        deferred: Deferred[None] = Deferred()
        self._waiters.append((predicate, deferred))
        return deferred.addTimeout(WAIT, self.reactor)


class Recorded(Milter):
    """Records abort and close in the journal."""

    name = "recorded"

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def abort(self) -> Result:
        self.journal.record(f"{self.name} abort")
        return None

    def close(self) -> Result:
        self.journal.record(f"{self.name} close")
        return None


class HeaderStamper(Recorded):
    """Counts the headers and adds X-Header-Count at end of message."""

    name = "stamper"
    actions = Action.ADD_HEADERS

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.count = 0

    def header(self, command: Header) -> Result:
        self.count += 1
        return None

    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header("X-Header-Count", str(self.count))
        self.count = 0
        return None

    def abort(self) -> Result:
        self.count = 0
        return super().abort()


class RecipientRejecter(Recorded):
    """Refuses recipients whose address contains "blocked"."""

    name = "rejecter"

    def rcpt_to(self, command: RcptTo) -> Result:
        if "blocked" in command.address:
            return Reject("no such user", code=550, status="5.1.1")
        return None


class BodyInspector(Recorded):
    """Reads the body asynchronously; rejects a virus, masks the word "secret"."""

    name = "inspector"
    actions = Action.CHANGE_BODY

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.body_seen = b""

    async def body(self, command: BodyChunk) -> FilterVerdict | None:
        await deferLater(self.journal.reactor, 0.001, lambda: None)
        self.body_seen += command.data
        return None

    def end_of_message(self, changes: Changes) -> Result:
        body, self.body_seen = self.body_seen, b""
        if b"VIRUS" in body:
            return Reject()
        if b"secret" in body:
            changes.replace_body(body.replace(b"secret", b"******"))
        return None

    def abort(self) -> Result:
        self.body_seen = b""
        return super().abort()


def make_factory(
    reactor: Any, journal: Journal, *, before: Sequence[FilterSpec] = (), after: Sequence[FilterSpec] = ()
) -> MilterFactory:
    return MilterFactory(
        [
            *before,
            FilterSpec(functools.partial(HeaderStamper, journal), name="stamper"),
            FilterSpec(functools.partial(RecipientRejecter, journal), name="rejecter"),
            FilterSpec(functools.partial(BodyInspector, journal), name="inspector"),
            *after,
        ],
        reactor,
    )


# -------------------------------------------------------------- the MTA side


class MTAClient(Protocol):
    """A minimal MTA: sends commands through an MTASession and collects each reply batch."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.session = MTASession()
        self.responses: list[Response] = []
        self.skipped: list[Command] = []
        self.lost: Deferred[None] = Deferred()
        self._batch: list[Response] = []
        self._waiting: Deferred[list[Response]] | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.session.receive_data(data)
        self._drain()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 - Twisted's name
        self.session.receive_data(b"")
        self._drain()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(self._batch)
        self.lost.callback(None)

    def _drain(self) -> None:
        while True:
            event = self.session.next_event()
            if event is NEED_DATA or isinstance(event, Disconnected):
                return
            self.responses.append(event)
            self._batch.append(event)
            if not self.session.reply_due and self._waiting is not None:
                waiting, self._waiting = self._waiting, None
                batch, self._batch = self._batch, []
                waiting.callback(batch)

    def send(self, command: Command, macros: Sequence[tuple[str, str]] = ()) -> Deferred[list[Response]]:
        """Send a macro packet and the command (unless switched off); the reply batch, if one is due."""
        assert self.transport is not None
        packets: list[Command] = [Macros(command.letter, tuple(macros))] if macros else []
        if self.session.wants(type(command)):
            packets.append(command)
        else:
            self.skipped.append(command)
        self.transport.write(b"".join(self.session.send(packet) for packet in packets))
        if not self.session.reply_due:
            return succeed([])
        self._batch = []
        self._waiting = Deferred()
        return self._waiting.addTimeout(WAIT, self.reactor)

    async def run(self, *commands: Command) -> list[list[Response]]:
        """Send the commands one after another, each after the previous reply."""
        return [await self.send(command) for command in commands]

    async def message(
        self, sender: str, recipients: Sequence[str], headers: Sequence[tuple[str, str]], body: bytes
    ) -> dict[str, Any]:
        """One message, Postfix style (ABORT at the end); the replies by stage."""
        out: dict[str, Any] = {"mail": await self.send(MailFrom(sender), [("{mail_addr}", sender.strip("<>"))])}
        out["rcpt"] = [await self.send(RcptTo(r), [("{rcpt_addr}", r.strip("<>"))]) for r in recipients]
        out["data"] = await self.send(Data())
        out["headers"] = [await self.send(Header(n, v), [("i", "4ABC")]) for n, v in headers]
        out["eoh"] = await self.send(EndOfHeaders())
        out["body"] = await self.send(BodyChunk(body), [("i", "4ABC")])
        out["eom"] = await self.send(EndOfMessage(), [("i", "4ABC")])
        await self.send(Abort())
        return out


async def connect(reactor: Any, endpoint: IStreamClientEndpoint) -> MTAClient:
    """Connect an MTAClient and negotiate like Postfix."""
    client = MTAClient(reactor)
    await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
    [reply] = await client.send(Negotiate())
    assert isinstance(reply, NegotiateReply)
    await client.run(Connect("mail.example.com", Family.INET, 54321, "192.0.2.10"), Helo("mail.example.com"))
    return client


async def eventually(reactor: Any, predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds, at most WAIT seconds."""
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"{predicate} did not become true within {WAIT}s")


async def listen(reactor: Any, endpoint: IStreamServerEndpoint, factory: MilterFactory) -> IListeningPort:
    port: IListeningPort = await endpoint.listen(factory).addTimeout(WAIT, reactor)
    return port


def port_number(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


async def stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


async def two_messages(reactor: Any, client: MTAClient, journal: Journal) -> None:
    """Two messages on one connection: a per-recipient reject, changes, a rejected message; then QUIT."""
    first = await client.message(
        "<alice@example.com>", ["<bob@example.net>", "<blocked@example.net>", "<carol@example.net>"],
        [("Subject", "Hello"), ("From", "alice@example.com")], b"the secret is out\r\n",
    )
    assert first["mail"] == [] and client.skipped[:2] == [Connect("mail.example.com", Family.INET, 54321,
                                                                   "192.0.2.10"), Helo("mail.example.com")]
    assert first["rcpt"] == [[Continue()], [Reject("no such user", code=550, status="5.1.1")], [Continue()]]
    assert first["headers"] == [[Continue()], [Continue()]]
    assert first["body"] == [Continue()]
    assert first["eom"] == [
        AddHeader("X-Header-Count", "2"), ReplaceBody(b"the ****** is out\r\n"), Continue(),
    ]
    second = await client.message("<alice@example.com>", ["<dave@example.net>"], [("Subject", "x")], b"VIRUS\r\n")
    assert second["eom"] == [Reject()]
    await client.send(Quit())
    await client.lost.addTimeout(WAIT, reactor)
    await journal.until(lambda events: {"stamper close", "rejecter close", "inspector close"} <= set(events))
    assert [e for e in journal.events if e.endswith("close")].count("stamper close") == 1


# ------------------------------------------------------------------ the tests


@pytest_twisted.ensureDeferred
async def test_tcp_complete_sessions(reactor: Any) -> None:
    """Over loopback TCP, three filters handle two messages on one connection, Postfix style."""
    journal = Journal(reactor)
    factory = make_factory(reactor, journal)
    port = await listen(reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), factory)
    try:
        client = await connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port_number(port)))
        await two_messages(reactor, client, journal)
        await eventually(reactor, lambda: not factory.connections)
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_unix_socket(reactor: Any, tmp_path: Path) -> None:
    """The same sessions run over a unix socket."""
    journal = Journal(reactor)
    factory = make_factory(reactor, journal)
    path = str(tmp_path / "milter.sock")
    port = await listen(reactor, UNIXServerEndpoint(reactor, path), factory)
    try:
        client = await connect(reactor, UNIXClientEndpoint(reactor, path))
        await two_messages(reactor, client, journal)
        await eventually(reactor, lambda: not factory.connections)
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_disconnect_mid_message(reactor: Any) -> None:
    """An MTA that vanishes mid-message makes every filter abort and close exactly once."""
    journal = Journal(reactor)
    factory = make_factory(reactor, journal)
    port = await listen(reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), factory)
    try:
        client = await connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port_number(port)))
        await client.run(MailFrom("<a@example.com>"), RcptTo("<b@example.net>"), Header("Subject", "s"))
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost.addTimeout(WAIT, reactor)
        names = ("stamper", "rejecter", "inspector")
        await journal.until(lambda events: all(f"{n} close" in events for n in names))
        await eventually(reactor, lambda: not factory.connections)
        for name in names:
            assert journal.events.count(f"{name} abort") == 1, journal.events
            assert journal.events.count(f"{name} close") == 1, journal.events
            assert journal.events.index(f"{name} abort") < journal.events.index(f"{name} close")
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_concurrent_connections(reactor: Any) -> None:
    """Several connections at once each get their own filters and the right answers."""
    journal = Journal(reactor)
    factory = make_factory(reactor, journal)
    port = await listen(reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), factory)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port_number(port))
    count = 8

    async def session(number: int) -> list[Response]:
        client = await connect(reactor, endpoint)
        headers = [(f"X-H{i}", str(i)) for i in range(number + 1)]
        body = b"VIRUS\r\n" if number % 4 == 3 else b"clean %d\r\n" % number
        out = await client.message("<a@example.com>", [f"<r{number}@example.net>"], headers, body)
        await client.send(Quit())
        await client.lost.addTimeout(WAIT, reactor)
        eom: list[Response] = out["eom"]
        return eom

    try:
        results = await DeferredList(
            [ensureDeferred(session(n)) for n in range(count)], fireOnOneErrback=True, consumeErrors=True
        ).addTimeout(WAIT * 2, reactor)
        for number, (ok, eom) in enumerate(results):
            assert ok
            if number % 4 == 3:
                assert eom == [Reject()]
            else:
                assert eom == [AddHeader("X-Header-Count", str(number + 1)), Continue()]
        await eventually(reactor, lambda: not factory.connections)
        assert journal.events.count("stamper close") == count
    finally:
        await stop(port)
