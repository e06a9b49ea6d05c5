"""The MTA side over Twisted: MilterClient talks to one milter, connect_milter dials and negotiates.

``MilterClient`` is a Protocol built on the sans-IO ``MTASession``. Commands go
out strictly one at a time: a ``send`` while another command still waits for
its reply is queued and written in order once that reply is in. Every call
answers with a Deferred, so the client reads naturally in ``async def`` code::

    client = await connect_milter("inet:8891@127.0.0.1", reactor)
    reply = await client.send(Connect("mx.example", Family.INET, 25, "192.0.2.1"), {"j": "mx"})
    if isinstance(reply.verdict, Reject): ...
    await client.quit()
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, cast

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, clientFromString, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from txmilt.address import connect_address, split_kind
from txmilt.codec import DEFAULT_FRAME_LIMIT
from txmilt.errors import ConfigurationError, LocalProtocolError, MilterError, MilterUnavailableError, ProtocolError
from txmilt.messages import (
    Abort,
    Command,
    Macros,
    Modification,
    Negotiate,
    NegotiateReply,
    Progress,
    Quarantine,
    Quit,
    Response,
    Verdict,
)
from txmilt.session import NEED_DATA, Disconnected, MTASession
from txmilt.states import describe

#: Seconds to wait for each reply (Postfix's milter_command_timeout); a PROGRESS restarts it.
DEFAULT_TIMEOUT: Final = 30.0

#: Macro values for one command: a mapping or (name, value) pairs, in the order to send.
MacroValues: TypeAlias = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Reply:
    """What the milter answered to one command.

    ``verdict`` is the final response, or None for a command that gets no
    reply (ABORT, QUIT, a command under a negotiated no-reply flag) or that
    was not sent because the milter switched it off (then ``skipped``).
    ``modifications`` are the end-of-message changes that came before the
    verdict, in order (QUARANTINE is reported as ``quarantine`` instead);
    ``progress`` counts PROGRESS packets.
    """

    verdict: Verdict | None = None
    modifications: tuple[Modification, ...] = ()
    progress: int = 0
    quarantine: str | None = None
    skipped: bool = False


class _Request:
    """One queued command and what has come back for it so far."""

    __slots__ = (
        "abandoned", "command", "deferred", "macros", "modifications", "on_progress", "progress", "quarantine",
    )

    def __init__(
        self, command: Command, macros: Macros | None, on_progress: Callable[[], None] | None
    ) -> None:
        self.command = command
        self.macros = macros
        self.on_progress = on_progress
        self.deferred: Deferred[Any] = Deferred()
        self.modifications: list[Modification] = []
        self.progress = 0
        self.quarantine: str | None = None
        self.abandoned = False


class MilterClient(Protocol):
    """The MTA end of one milter connection: commands in, Deferred replies out, one at a time.

    ``timeout`` bounds the wait for each reply from the moment its command is
    written (None: wait forever). A milter that misses it is dropped: its
    connection is aborted, the waiting Deferred fails with ``TimeoutError``
    and queued ones with ``MilterUnavailableError``. Cancelling a Deferred
    takes a queued command back; a command already written still gets its
    reply read, and discarded, so the session stays in step. Failures reach
    the caller through the Deferreds only (the client logs them at debug).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        frame_limit: int = DEFAULT_FRAME_LIMIT,
    ) -> None:
        self.session = MTASession(frame_limit)
        self.clock = clock
        self.timeout = timeout
        self._queue: deque[_Request] = deque()
        self._current: _Request | None = None
        self._timer: IDelayedCall | None = None
        self._advancing = False
        self._error: MilterError | None = None
        self._lost = False
        self._lost_waiters: list[Deferred[None]] = []

    # -- public API

    @property
    def negotiated(self) -> NegotiateReply | None:
        """The milter's OPTNEG reply, once negotiation is done."""
        return self.session.negotiated

    @property
    def pending(self) -> int:
        """How many commands are queued or await their reply."""
        return len(self._queue) + (self._current is not None)

    @property
    def disconnected(self) -> bool:
        """Whether the connection is closed or closing; every further command fails."""
        return self._error is not None

    def negotiate(self, offer: Negotiate | None = None) -> Deferred[NegotiateReply]:
        """Send OPTNEG (everything version 6 has, by default); fires with the milter's reply."""
        return cast("Deferred[NegotiateReply]", self._enqueue(_Request(offer or Negotiate(), None, None)))

    def send(
        self,
        command: Command,
        macros: MacroValues | None = None,
        *,
        on_progress: Callable[[], None] | None = None,
    ) -> Deferred[Reply]:
        """Send ``command``, preceded by a MACRO packet for its letter if ``macros`` is given.

        Fires with the Reply once the final response is in; at once (after the
        commands queued before it) for a command that gets no reply or that
        the milter switched off, whose macros are still sent, as MTAs do.
        ``on_progress`` is called for each PROGRESS packet as it arrives.
        """
        if isinstance(command, Negotiate | Macros):
            raise LocalProtocolError(f"send {describe(command)} with negotiate() or as macros=, not send()")
        packet = None
        if macros is not None:
            pairs = tuple(macros.items()) if isinstance(macros, Mapping) else tuple(macros)
            packet = Macros(command.letter, pairs)
        return cast("Deferred[Reply]", self._enqueue(_Request(command, packet, on_progress)))

    def abort(self) -> Deferred[None]:
        """Send ABORT (the current message is gone); fires once it is written."""
        return self.send(Abort()).addCallback(lambda _: None)

    def quit(self) -> Deferred[None]:
        """Send QUIT after whatever is queued and close; fires once the connection is closed."""
        if self._error is not None:
            return self._when_lost()
        self.send(Quit()).addErrback(lambda _: None)
        return self._when_lost()

    def close(self) -> Deferred[None]:
        """Drop the connection now; pending commands fail. Fires once it is closed."""
        self._drop(MilterUnavailableError("milter connection closed by this side"))
        return self._when_lost()

    # -- Twisted glue

    @override
    def connectionMade(self) -> None:
        if self._error is not None:  # closed before the connection was made
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self._advance()

    @override
    def dataReceived(self, data: bytes) -> None:
        self.session.receive_data(data)
        try:
            while self._error is None:
                event = self.session.next_event()
                if event is NEED_DATA or isinstance(event, Disconnected):
                    return
                self._response(event)
        except ProtocolError as e:
            self.log.debug("milter broke the protocol: {error}; closing the connection", error=str(e))
            self._drop(MilterUnavailableError(f"milter broke the protocol: {e}"), e)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._error is None:
            waiting = f" while {describe(self._current.command)} awaited its reply" if self._current else ""
            self._fail_all(MilterUnavailableError(
                f"milter closed the connection{waiting}: {reason.getErrorMessage()}"
            ))
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- the queue

    def _enqueue(self, request: _Request) -> Deferred[Any]:
        if self._error is not None:
            return fail(self._error)

        def cancel(_: Deferred[Any]) -> None:
            if request in self._queue:
                self._queue.remove(request)
            elif request is self._current:
                request.abandoned = True

        request.deferred = Deferred(cancel)
        self._queue.append(request)
        self._advance()
        return request.deferred

    def _advance(self) -> None:
        """Write queued commands until one needs a reply; fire those that need none."""
        if self._advancing:
            return
        self._advancing = True
        try:
            while True:
                out: list[bytes] = []
                done: list[tuple[_Request, object]] = []
                quitting = False
                while (
                    self._current is None and self._queue and self.transport is not None
                    and self._error is None and not quitting
                ):
                    request = self._queue.popleft()
                    try:
                        data, sent = self._encode(request)
                    except LocalProtocolError as e:
                        done.append((request, Failure(e)))
                        continue
                    out.append(data)
                    if sent and self.session.reply_due:
                        self._current = request
                        self._start_timer()
                    else:
                        done.append((request, Reply(skipped=not sent)))
                        quitting = isinstance(request.command, Quit)
                if out:
                    self.transport.write(b"".join(out))  # type: ignore[union-attr]
                if quitting:
                    self._fail_all(MilterUnavailableError("milter connection closed after QUIT"))
                    self.transport.loseConnection()  # type: ignore[union-attr]
                if not done:
                    return
                for request, result in done:
                    if not request.deferred.called:
                        request.deferred.callback(result)
        finally:
            self._advancing = False

    def _encode(self, request: _Request) -> tuple[bytes, bool]:
        """The bytes for a request, and whether its command itself went out."""
        command = request.command
        macros = b"" if request.macros is None else self.session.send(request.macros)
        if not isinstance(command, Negotiate) and not self.session.wants(type(command)):
            return macros, False
        return macros + self.session.send(command), True

    def _response(self, response: Response) -> None:
        request = self._current
        assert request is not None  # the session refuses responses nobody waits for
        if isinstance(response, Progress):
            request.progress += 1
            self._start_timer()
            if request.on_progress is not None and not request.abandoned:
                try:
                    request.on_progress()
                except Exception:
                    self.log.failure("on_progress callback failed")
            return
        if isinstance(response, Quarantine):
            request.quarantine = response.reason
            return
        result: object
        if isinstance(response, NegotiateReply):
            result = response
        elif isinstance(response, Verdict):
            result = Reply(response, tuple(request.modifications), request.progress, request.quarantine)
        else:
            request.modifications.append(response)
            return
        self._stop_timer()
        self._current = None
        if not request.deferred.called:
            request.deferred.callback(result)
        self._advance()

    # -- timeouts and failure

    def _start_timer(self) -> None:
        self._stop_timer()
        if self.timeout is not None:
            self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        request = self._current
        name = describe(request.command) if request is not None else "a command"
        self.log.debug("milter gave no reply to {command} within {timeout}s; dropping it",
                       command=name, timeout=self.timeout)
        self._drop(
            MilterUnavailableError(f"milter connection dropped: no reply to {name} within {self.timeout}s"),
            TimeoutError(f"milter gave no reply to {name} within {self.timeout}s"),
        )

    def _drop(self, error: MilterError, first: Exception | None = None) -> None:
        """Fail everything pending (the waiting command with ``first``) and abort the connection."""
        if self._error is not None:
            return
        self._fail_all(error, first)
        if self.transport is not None and not self._lost:
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()

    def _fail_all(self, error: MilterError, first: Exception | None = None) -> None:
        self._error = error
        self._stop_timer()
        current, self._current = self._current, None
        queued, self._queue = list(self._queue), deque()
        if current is not None and not current.deferred.called:
            current.deferred.errback(Failure(first or error))
        for request in queued:
            if not request.deferred.called:
                request.deferred.errback(Failure(error))

    def _when_lost(self) -> Deferred[None]:
        if self._lost or self.transport is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter




# ------------------------------------------------------------------ connecting

def milter_endpoint(address: str, reactor: Any, timeout: float = DEFAULT_TIMEOUT) -> IStreamClientEndpoint:
    """The client endpoint for a milter address: libmilter/Postfix style or a Twisted description.

    The grammar of txmilt.address (``inet:PORT@HOST``, ``inet:HOST:PORT``,
    ``inet6:[ADDRESS]:PORT``, ``unix:/path``, ``local:/path``; a host is
    required) is accepted besides Twisted's client descriptions
    (``tcp:host=127.0.0.1:port=8891``, ``unix:path=/run/milter.sock``,
    ``tls:...``). ``timeout`` bounds connecting for the libmilter forms.
    """
    parsed = connect_address(address)
    if parsed is None:
        return _described_endpoint(address, reactor)
    if parsed.kind == "unix":
        return UNIXClientEndpoint(reactor, parsed.path, timeout=timeout)
    assert parsed.host is not None  # connect_address refuses inet addresses without a host
    return HostnameEndpoint(reactor, parsed.host, parsed.port, timeout=timeout)


def check_milter_address(address: str) -> None:
    """ConfigurationError unless ``address`` names a milter endpoint; nothing is resolved or connected."""
    if connect_address(address) is None:
        _described_endpoint(address, None)


def _described_endpoint(description: str, reactor: Any) -> IStreamClientEndpoint:
    """The endpoint for a Twisted client description, with ``local:`` read as ``unix:``."""
    kind, rest = split_kind(description, "milter address")
    try:
        return cast(IStreamClientEndpoint, clientFromString(reactor, f"{kind}:{rest}"))
    except Exception as e:  # parsers raise anything from ValueError to NameError (no pyOpenSSL)
        raise ConfigurationError(f"milter address {description!r} is not understood: {e!r}") from None


def connect_milter(
    endpoint: str | IStreamClientEndpoint,
    reactor: Any,
    offer: Negotiate | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    frame_limit: int = DEFAULT_FRAME_LIMIT,
) -> Deferred[MilterClient]:
    """Connect to a milter and negotiate; fires with the ready MilterClient.

    Fails with MilterUnavailableError when the connection cannot be made (or
    not within ``timeout``) or closes during negotiation, and with
    RemoteProtocolError when the milter answers the offer illegally.
    """
    where = endpoint if isinstance(endpoint, str) else repr(endpoint)
    if isinstance(endpoint, str):
        endpoint = milter_endpoint(endpoint, reactor, timeout or DEFAULT_TIMEOUT)
    client = MilterClient(reactor, timeout=timeout, frame_limit=frame_limit)
    connecting: Deferred[Any] = connectProtocol(endpoint, client)
    if timeout is not None:
        connecting.addTimeout(timeout, reactor)

    def unreachable(failure: Failure) -> Failure:
        if failure.check(CancelledError):
            return failure
        timed_out = failure.check(TimeoutError)
        reason = f"no connection within {timeout}s" if timed_out else failure.getErrorMessage()
        return Failure(MilterUnavailableError(f"cannot connect to milter at {where}: {reason}"))

    def negotiated(_: NegotiateReply) -> MilterClient:
        return client

    def negotiation_failed(failure: Failure) -> Failure:
        client.close()
        return failure

    def connected(_: object) -> Deferred[MilterClient]:
        return client.negotiate(offer).addCallbacks(negotiated, negotiation_failed)

    return connecting.addErrback(unreachable).addCallback(connected)
