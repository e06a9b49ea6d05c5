"""Socket glue: one MilterProtocol per MTA connection, made by a MilterFactory."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast, runtime_checkable
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from txmilt.chain import (
    DEFAULT_BODY_SPOOL_THRESHOLD,
    DEFAULT_MAX_BODY_SIZE,
    Chain,
    ChainObserver,
    FilterSpec,
    Lineup,
    check_chain_order,
)
from txmilt.codec import DEFAULT_FRAME_LIMIT
from txmilt.errors import NegotiationError, RemoteProtocolError
from txmilt.interfaces import IMilter
from txmilt.messages import Negotiate, Progress, Quit, QuitNoClose, Response
from txmilt.session import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADERS,
    NEED_DATA,
    Disconnected,
    MilterSession,
    Notice,
)

#: Seconds within which a frame that has begun to arrive must be complete.
DEFAULT_FRAME_TIMEOUT = 120.0
#: Seconds a connection may stay silent between commands before it is closed.
DEFAULT_IDLE_TIMEOUT = 3600.0
#: Seconds from accepting a connection to the end of option negotiation before it is closed.
DEFAULT_NEGOTIATION_TIMEOUT = 10.0
#: Connections served at once before new ones are refused.
DEFAULT_MAX_CONNECTIONS = 2000
#: Seconds between keep-alives (SMFIR_PROGRESS) while a slow end of message is pending.
DEFAULT_PROGRESS_INTERVAL = 10.0
#: Linux's socket option for acknowledging at once (None elsewhere).
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class VerifiedFilters(tuple[FilterSpec, ...]):
    """Filter specs whose factories verify_filters has tried; MilterFactory takes them as they are."""

    __slots__ = ()

    @classmethod
    def verify(cls, filters: Sequence[FilterSpec | Callable[[], IMilter]]) -> VerifiedFilters:
        """Specs for ``filters``, each factory called once (ConfigurationError names a bad one)."""
        return cls(Lineup.verified(filters).specs)


def _has_server_hooks(observer: object) -> bool:
    """Whether ``observer`` also has the connection-level hooks."""
    return isinstance(observer, ServerObserver)


@runtime_checkable
class ServerObserver(TypingProtocol):
    """Optional extra hooks of a chain observer for connection-level metrics."""

    def connection_opened(self) -> None:
        """A connection was accepted."""

    def protocol_error(self) -> None:
        """A connection was dropped for breaking the protocol."""

    def command(self, stage: str, seconds: float) -> None:
        """The chain answered one command after ``seconds``."""


class Deadlines:
    """One timer for the idle deadlines of every connection of a factory.

    A DelayedCall per connection costs about 600 bytes; here a connection costs
    a heap entry, and activity only moves a float (``MilterProtocol._deadline``),
    which the heap checks lazily when the old deadline comes up.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, MilterProtocol]] = []
        self._order = itertools.count()
        self._call: IDelayedCall | None = None
        self._stale = 0

    def watch(self, when: float, protocol: MilterProtocol) -> None:
        """Look at ``protocol`` at ``when`` (or later, if its deadline moves)."""
        heapq.heappush(self._heap, (when, next(self._order), protocol))
        self._schedule()

    def forget(self) -> None:
        """A watched connection closed: drop such entries once they are half the heap."""
        self._stale += 1
        if self._stale * 2 < len(self._heap):
            return
        kept = []
        for entry in self._heap:
            if entry[2].waiting:
                kept.append(entry)
            else:
                entry[2].unwatched()
        heapq.heapify(kept)
        self._heap, self._stale = kept, 0
        self._schedule()

    def _schedule(self) -> None:
        if not self._heap:
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = None
            return
        first = self._heap[0][0]
        call = self._call
        if call is not None and call.active():
            if call.getTime() <= first:
                return
            call.cancel()
        self._call = self._clock.callLater(max(0.0, first - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, protocol = heapq.heappop(heap)
            later = protocol.check_deadline(now)
            if later is not None:
                heapq.heappush(heap, (later, next(self._order), protocol))
        self._schedule()

    def __len__(self) -> int:
        return len(self._heap)


class MilterProtocol(Protocol):
    """Frames MTA packets, runs them through the chain in order, writes each reply batch at once."""

    log = Logger()

    def __init__(self, factory: MilterFactory, connection_id: str) -> None:
        self.factory = factory
        self.connection_id = connection_id
        self.session = MilterSession(
            factory.frame_limit, max_headers=factory.max_headers, max_header_bytes=factory.max_header_bytes
        )
        self.chain = Chain(
            factory.lineup,
            factory.clock,
            connection_id=connection_id,
            progress_interval=factory.progress_interval,
            send_progress=self._send_progress,
            observer=factory.observer,
            max_body_size=factory.max_body_size,
            body_spool_threshold=factory.body_spool_threshold,
            chain_order=factory.chain_order,
        )
        self._busy = False
        self._finished = False
        self._deadline: float | None = None  # when the idle (or negotiation) timeout closes us
        self._frame_due: float | None = None  # when the frame that has started must be complete
        self._watched = float("inf")  # the earliest time the factory's deadline heap will look at us
        self._observer = factory.server_observer
        self._started = 0.0
        self._socket: socket.socket | None = None
        self._replied = False  # whether anything was written since the last read

    @override
    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.factory.connections.add(self)
        if self._observer is not None:
            self._observer.connection_opened()
        transport: Any = self.transport
        # Replies go straight to the socket when Twisted has nothing queued for it (see _write).
        self._socket = transport.socket if isinstance(transport, tcp.Connection) else None
        self._restart_idle_timer()

    @override
    def dataReceived(self, data: bytes) -> None:
        session = self.session
        session.receive_data(data)
        if not self._busy:
            self._restart_idle_timer()
            self._replied = False
            self._pump()
            self._track_frame()
            if not self._replied and not self._busy and self._socket is not None:
                self._acknowledge_now()

    def _acknowledge_now(self) -> None:
        """ACK what was read at once: nothing we send will carry the ACK soon.

        An MTA that writes a packet needing no reply (the macros of a command
        switched off, a command answered by no reply) and then, under Nagle,
        holds its next packet until that one is acknowledged would otherwise
        wait for the kernel's delayed ACK, about 40 ms (Postfix does, at DATA
        switched off). TCP_QUICKACK set after a read sends the pending ACK.
        """
        sock = self._socket
        if sock is None or _TCP_QUICKACK is None:
            return
        with contextlib.suppress(OSError):  # the connection is going away; its transport will say so
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections.discard(self)
        self._cancel_idle_timer()
        self.factory.deadlines.forget()
        if not self._finished:
            self._finished = True
            self.chain.connection_lost(self.session.in_transaction)
        # The chain's callback is the only reference cycle through a connection: without it, a
        # closed connection is freed at once by reference counting, not at the next full GC.
        self.chain.send_progress = None
        self._socket = None

    # -- the command loop

    def _pump(self) -> None:
        """Process whole commands until one has to wait for a filter or bytes run out."""
        session, chain = self.session, self.chain
        try:
            while not self._busy and not self._finished:
                event = session.next_event()
                if event is NEED_DATA:
                    return
                kind = type(event)
                if kind is Negotiate:
                    self._negotiate(event)  # type: ignore[arg-type]
                    continue
                if kind is Notice:
                    self.log.warn("[{conn}] {notice}", conn=self.connection_id, notice=event.text)  # type: ignore[union-attr]
                    continue
                if self._observer is not None:
                    self._started = self.factory.clock.seconds()
                outcome = chain.handle(event, session)  # type: ignore[arg-type]
                if type(outcome) is not tuple and isinstance(outcome, Deferred):
                    self._busy = True
                    self._cancel_idle_timer()
                    outcome.addCallbacks(self._resume, self._crashed, callbackArgs=(event,))
                    return
                self._answer(outcome, event)
        except RemoteProtocolError as e:
            self._drop("protocol error from the MTA: {error}", error=str(e))
        except Exception:
            self._crashed(Failure())

    def _negotiate(self, offer: Negotiate) -> None:
        try:
            reply = self.chain.negotiate(offer)
        except NegotiationError as e:
            self._drop("negotiation failed: {error}", error=str(e))
            return
        self._write(self.session.send(reply))
        self._restart_idle_timer()  # from the negotiation deadline to the idle timeout

    def _answer(self, responses: Sequence[Response], event: object) -> None:
        if self._observer is not None:
            self._observer.command(type(event).__name__, self.factory.clock.seconds() - self._started)
        session = self.session
        if session.reply_due:
            if len(responses) == 1:
                self._write(session.send(responses[0]))
            else:
                send = session.send
                self._write(b"".join([send(response) for response in responses]))
        kind = type(event)
        if kind is Quit or kind is Disconnected:
            self._finished = True
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif kind is QuitNoClose:
            self.log.debug("[{conn}] new SMTP session on this connection", conn=self.connection_id)

    def _resume(self, responses: Sequence[Response], event: object) -> None:
        self._busy = False
        if self._finished:
            return
        try:
            self._answer(responses, event)
        except Exception:
            self._crashed(Failure())
            return
        self._restart_idle_timer()
        self._pump()
        self._track_frame()

    def _write(self, data: bytes) -> None:
        """Send one reply batch: one send() when the socket is idle, else through the transport.

        Twisted's own write path registers the socket for writing and sends on the
        next reactor turn, two epoll_ctl calls per reply; a direct send is safe when
        nothing of ours is queued, and whatever the kernel does not take goes to
        the transport, so the order of bytes is kept.
        """
        self._replied = True
        transport: Any = self.transport
        sock = self._socket
        if sock is not None and not transport.dataBuffer and not transport._tempDataBuffer and not transport.TLS:
            try:
                sent = sock.send(data)
            except OSError:  # EAGAIN, or an error the transport will find and report itself
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def _crashed(self, failure: Failure) -> None:
        self._busy = False
        if failure.check(RemoteProtocolError):
            self._drop("protocol error from the MTA: {error}", error=str(failure.value))
            return
        self.log.failure("[{conn}] internal error; closing the connection", failure=failure, conn=self.connection_id)
        self._close()

    def _drop(self, format: str, **fields: Any) -> None:
        if self._observer is not None:
            self._observer.protocol_error()
        self.log.error("[{conn}] " + format + "; closing the connection", conn=self.connection_id, **fields)
        self._close()

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            self.chain.connection_lost(self.session.in_transaction)
        if self.transport is not None:
            self.transport.loseConnection()

    def _send_progress(self) -> None:
        if self.session.reply_due and not self._finished:
            self._write(self.session.send(Progress()))

    # -- idle timeout

    def _restart_idle_timer(self) -> None:
        """Restart the idle timer; before negotiation, run the negotiation deadline (never restarted)."""
        factory = self.factory
        if self.session.negotiated is not None or factory.negotiation_timeout <= 0:  # not _negotiating, inline
            timeout = factory.idle_timeout
        elif self._deadline is not None:
            return  # a deadline from connecting: trickling bytes do not extend it
        else:
            timeout = factory.negotiation_timeout
        if not timeout:
            self._deadline = None
            return
        deadline = factory.clock.seconds() + timeout
        self._deadline = deadline
        if deadline < self._watched:
            self._watched = deadline
            self.factory.deadlines.watch(deadline, self)

    def _cancel_idle_timer(self) -> None:
        self._deadline = self._frame_due = None

    def _track_frame(self) -> None:
        """Start the frame deadline when a frame is part-way in, and stop it when none is.

        Trickled bytes restart the idle timer, but not this one: a frame that has
        started must be whole within ``frame_timeout``.
        """
        if self._busy or self._finished:
            return
        if not self.session.pending_bytes:
            self._frame_due = None
        elif self._frame_due is None and self.factory.frame_timeout:
            self._frame_due = due = self.factory.clock.seconds() + self.factory.frame_timeout
            if due < self._watched:
                self._watched = due
                self.factory.deadlines.watch(due, self)

    @property
    def waiting(self) -> bool:
        """Whether a deadline runs for this connection."""
        return (self._deadline is not None or self._frame_due is not None) and not self._finished

    def unwatched(self) -> None:
        """The deadline heap dropped this connection."""
        self._watched = float("inf")

    def check_deadline(self, now: float) -> float | None:
        """Close the connection if its deadline has passed; else the time to look again (or None)."""
        self._watched = float("inf")
        if self._finished:
            return None
        due = [when for when in (self._deadline, self._frame_due) if when is not None]
        if not due:
            return None
        if min(due) > now:
            self._watched = min(due)
            return self._watched
        if self._frame_due is not None and self._frame_due <= now:
            self._frame_due = None
            self.log.warn(
                "[{conn}] a frame begun {timeout}s ago is still incomplete ({pending} bytes); closing the connection",
                conn=self.connection_id, timeout=self.factory.frame_timeout, pending=self.session.pending_bytes,
            )
            self._close()
            return None
        self._deadline = None
        self._idle()
        return None

    @property
    def _negotiating(self) -> bool:
        """Whether the negotiation deadline (rather than the idle timeout) applies now."""
        return self.session.negotiated is None and self.factory.negotiation_timeout > 0

    def _idle(self) -> None:
        if self._negotiating:
            self.log.warn(
                "[{conn}] no option negotiation within {timeout}s of connecting ({pending} bytes of an unfinished"
                " frame); closing the connection",
                conn=self.connection_id, timeout=self.factory.negotiation_timeout,
                pending=self.session.pending_bytes,
            )
        else:
            self.log.warn(
                "[{conn}] idle for {timeout}s in stage {stage} ({pending} bytes of an unfinished frame);"
                " closing the connection",
                conn=self.connection_id, timeout=self.factory.idle_timeout, stage=self.session.stage.value,
                pending=self.session.pending_bytes,
            )
        self._close()


class MilterFactory(Factory):
    """Makes one MilterProtocol, with fresh filter instances, per MTA connection."""

    log = Logger()

    def __init__(
        self,
        filters: Lineup | Sequence[FilterSpec | Callable[[], IMilter]],
        clock: IReactorTime | None = None,
        *,
        frame_limit: int = DEFAULT_FRAME_LIMIT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        negotiation_timeout: float = DEFAULT_NEGOTIATION_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        observer: ChainObserver | None = None,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        body_spool_threshold: int = DEFAULT_BODY_SPOOL_THRESHOLD,
        chain_order: str = "concurrent",
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
    ) -> None:
        """Serve ``filters`` in this order; the keywords are the limits (0 switches a limit off).

        ``chain_order``: "concurrent" (each command to every filter at once) or
        "sequential" (one after another, exactly as ``smtpd_milters``).

        Each filter's factory is called once now, to show configuration errors
        early, unless ``filters`` are VerifiedFilters or a
        Lineup (tried once already).

        ``frame_limit``: largest packet payload (larger: the connection is dropped).
        ``frame_timeout``: seconds within which a frame that has begun must be complete.
        ``idle_timeout``: seconds of silence between commands before the connection is closed.
        ``negotiation_timeout``: seconds from connecting to the end of option negotiation.
        ``max_connections``: connections served at once (more are refused at accept).
        ``max_headers``, ``max_header_bytes``: per message; above either, the message's
        content goes to no filter and is answered TempFail (452 4.3.1).
        ``max_body_size``: largest body a ``whole_body`` filter may buffer (above it the filter
        gets its fallback); ``body_spool_threshold``: bytes kept in memory before spooling to disk.
        """
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        if isinstance(filters, Lineup):
            lineup = filters
        elif isinstance(filters, VerifiedFilters):
            lineup = Lineup(filters)
        else:
            lineup = Lineup.verified(filters)
        #: The filters in chain order, with what each declares.
        self.lineup = lineup
        self.filters: tuple[FilterSpec, ...] = lineup.specs
        check_chain_order(chain_order)
        self.chain_order = chain_order
        self.clock: IReactorTime = clock
        self.frame_limit = frame_limit
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.negotiation_timeout = negotiation_timeout
        self.max_connections = max_connections
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.max_body_size = max_body_size
        self.body_spool_threshold = body_spool_threshold
        self.progress_interval = progress_interval
        self.observer = observer
        # A ServerObserver is a ChainObserver with connection hooks too (metrics.MetricsObserver).
        self.server_observer = cast("ServerObserver | None", observer if _has_server_hooks(observer) else None)
        self.connections: set[MilterProtocol] = set()
        self.deadlines = Deadlines(self.clock)
        self._ids = itertools.count(1)

    def take_over(self, previous: MilterFactory) -> None:
        """Serve new connections in ``previous``'s place (a reload) while its open ones finish.

        Those still count toward ``max_connections`` (and a drain), and connection ids go on from its.
        """
        self.connections = previous.connections
        self._ids = previous._ids

    @override
    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if len(self.connections) >= self.max_connections:
            self.log.error(
                "refusing connection from {addr}: {count} connections open (limit {limit})",
                addr=addr, count=len(self.connections), limit=self.max_connections,
            )
            return None
        return MilterProtocol(self, f"c{next(self._ids)}")
