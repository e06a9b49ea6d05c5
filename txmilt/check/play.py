"""Messages played to milters over real sockets: the MTA model of txmilt.conversation, driven by MilterClients."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet.defer import Deferred, TimeoutError

from txmilt.client import MilterClient, Reply, connect_milter
from txmilt.conversation import Answer, Conversation, HangUp, MacroState, Mail, Outcome, Send
from txmilt.errors import MilterError, MilterUnavailableError, ProtocolError
from txmilt.messages import Abort, Command, Connect, Continue, Macros, Negotiate, Quarantine
from txmilt.mta import MTAProfile

__all__ = ["ERROR_KINDS", "CheckError", "Connector", "Exchange", "MilterSession", "Played", "reactor_connector"]

#: Why a milter could not be checked, as CheckError.kind says it.
ERROR_KINDS: Final = ("connect", "timeout", "protocol", "closed")

#: Connects to a milter address and negotiates the offer within a timeout; fires with the ready client.
Connector = Callable[[str, Negotiate, float], "Deferred[MilterClient]"]


class CheckError(MilterError):
    """A milter could not be checked; ``kind`` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def reactor_connector(reactor: Any) -> Connector:
    """A Connector that dials with ``reactor`` (``connect_milter``)."""

    def connect(address: str, offer: Negotiate, timeout: float) -> Deferred[MilterClient]:
        return connect_milter(address, reactor, offer, timeout=timeout)

    return connect


@dataclass(frozen=True)
class Exchange:
    """One command sent to one milter (numbered from 0): the macros before it, the reply, the time it took."""

    milter: int
    command: Command
    macros: Macros | None
    reply: Reply
    seconds: float


@dataclass
class Played:
    """One message played: how it ended, and every command exchanged on the way."""

    outcome: Outcome
    exchanges: list[Exchange] = field(default_factory=list)


def _error(address: str, error: Exception) -> CheckError:
    """The CheckError for what a MilterClient failed with; other exceptions are bugs and pass."""
    if isinstance(error, TimeoutError):
        return CheckError("timeout", f"{address}: {error}")
    if isinstance(error, ProtocolError):
        return CheckError("protocol", f"{address}: {error}")
    if isinstance(error, MilterUnavailableError):
        return CheckError("closed", f"{address}: {error}")
    raise error


def _answer(reply: Reply) -> Answer:
    changes = reply.modifications
    if reply.quarantine is not None:
        changes += (Quarantine(reply.quarantine),)
    return Answer(Continue() if reply.verdict is None else reply.verdict, changes)


class MilterSession:
    """One SMTP session's connection to each milter, in order, and the conversation played over them."""

    def __init__(
        self,
        addresses: Sequence[str],
        clients: Sequence[MilterClient],
        profile: MTAProfile,
        macros: Mapping[str, str | None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.addresses = tuple(addresses)
        self.clients = tuple(clients)
        self.conversation = Conversation(profile, [c.session for c in clients], MacroState(profile, macros))
        self.clock = time.perf_counter if clock is None else clock

    @classmethod
    async def open(
        cls,
        addresses: Sequence[str],
        connector: Connector,
        profile: MTAProfile,
        *,
        timeout: float,
        macros: Mapping[str, str | None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> MilterSession:
        """Connect to every milter in turn and negotiate the profile's offer; CheckError if one fails."""
        clients: list[MilterClient] = []
        try:
            for address in addresses:
                clients.append(await cls._connect(connector, address, profile.offer, timeout))
        except BaseException:
            for client in clients:
                client.close()
            raise
        return cls(addresses, clients, profile, macros, clock)

    @staticmethod
    async def _connect(connector: Connector, address: str, offer: Negotiate, timeout: float) -> MilterClient:
        try:
            return await connector(address, offer, timeout)
        except MilterUnavailableError as e:
            raise CheckError("connect", str(e)) from None
        except (TimeoutError, ProtocolError) as e:
            raise _error(address, e) from None

    async def message(self, mail: Mail, client: Connect, helo: str) -> Played:
        """Play one message (CONNECT and HELO first, if not sent yet); CheckError if a milter fails."""
        exchanges: list[Exchange] = []
        steps = self.conversation.message(mail, connect=client, helo=helo)
        try:
            instruction = next(steps)
            while True:
                if isinstance(instruction, HangUp):
                    target = self.clients[instruction.milter]
                    await (target.quit() if instruction.quit else target.close())
                    answer = Answer(None, connected=False)
                else:
                    exchange = await self._exchange(instruction)
                    exchanges.append(exchange)
                    answer = _answer(exchange.reply)
                instruction = steps.send(answer)
        except StopIteration as done:
            outcome: Outcome = done.value
            return Played(outcome, exchanges)
        finally:
            steps.close()

    async def _exchange(self, send: Send) -> Exchange:
        client = self.clients[send.milter]
        macros = self.conversation.macros.prepare(send.command, client.negotiated)
        start = self.clock()
        try:
            reply = await client.send(send.command, None if macros is None else macros.pairs)
        except Exception as e:
            if isinstance(send.command, Abort) and isinstance(e, MilterUnavailableError):
                reply = Reply()  # gone after its last reply: the message was decided all the same
            else:
                raise _error(self.addresses[send.milter], e) from None
        return Exchange(send.milter, send.command, macros, reply, self.clock() - start)

    @property
    def decided(self) -> bool:
        """Whether CONNECT or HELO decided the whole SMTP session, so no later message reaches a milter."""
        return self.conversation.verdict is not None

    async def close(self) -> None:
        """QUIT every milter still connected, as the MTA does when the SMTP session ends."""
        for client in self.clients:
            if not client.disconnected:
                await client.quit()

    def drop(self) -> None:
        """Close every connection at once."""
        for client in self.clients:
            client.close()
