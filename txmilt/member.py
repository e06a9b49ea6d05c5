"""Chain members: how a filter is configured, what it declares, and calling it safely.

``FilterSpec`` says how to make a filter and how to treat it when it fails;
``Lineup`` holds the configured specs with what each declares, worked out once
per factory; a ``Member`` is one filter instance on one connection, and
``Member.call`` runs one callback with the filter's timeout and fallback.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, cast

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from txmilt.conditions import When
from txmilt.coroutines import coroutine_deferred
from txmilt.errors import ConfigurationError, LocalProtocolError
from txmilt.interfaces import IMilter
from txmilt.merge import Needs
from txmilt.merge import describe as describe_changes
from txmilt.messages import (
    Accept,
    Action,
    BodyChunk,
    Command,
    Continue,
    EndOfHeaders,
    EndOfMessage,
    Header,
    MacroStage,
    ProtocolFlag,
    Reject,
    TempFail,
    strip_leading_space,
)
from txmilt.milter import CALLBACKS, FILTER_VERDICTS, FilterVerdict, overrides
from txmilt.session import MacroView, Requirements, can_answer
from txmilt.spool import DEFAULT_BODY_SPOOL_THRESHOLD, DEFAULT_MAX_BODY_SIZE, BodySpool

_FALLBACKS = (TempFail, Accept, Continue, Reject)
_CONTINUE = Continue()
#: The command each callback answers, for checking a verdict against session.can_answer.
_COMMAND_OF = {name: kind for kind, name in CALLBACKS.items()} | {"end_of_message": EndOfMessage}
#: Message content: what an ``after_changes`` filter is shown again, edited, at end of message.
CONTENT_EVENTS = frozenset({Header, EndOfHeaders, BodyChunk})
#: Actions that change what a later filter would see of the message content.
CONTENT_EDITS = Action.ADD_HEADERS | Action.CHANGE_HEADERS | Action.CHANGE_BODY


class ChainObserver(Protocol):
    """Receives the chain's counts and timings (metrics plug in here)."""

    def verdict(self, filter_name: str, stage: str, verdict: str, dry_run: bool) -> None:
        """A filter answered ``verdict`` at ``stage``."""

    def change(self, filter_name: str, kind: str, dry_run: bool) -> None:
        """A filter made one change of ``kind`` at end of message."""

    def latency(self, filter_name: str, stage: str, seconds: float) -> None:
        """A filter took ``seconds`` to answer at ``stage``."""

    def failure(self, filter_name: str, stage: str, kind: str) -> None:
        """A filter failed at ``stage``: ``kind`` is "timeout", "error", "bad-verdict" or "body" (too large)."""

    def skipped(self, filter_name: str, reason: str) -> None:
        """A filter's ``when`` left it out of a connection or message; ``reason`` names the key that failed."""


@dataclass(frozen=True)
class FilterSpec:
    """One chain member: how to make it, and how to treat it when it fails.

    ``after_changes`` makes the filter see the message content as the filters
    before it left it (as a filter listed later in ``smtpd_milters`` does); a
    filter class can also declare it with an ``after_changes = True`` attribute.
    ``when`` says where the filter applies (``txmilt.conditions``): a ``When``
    or a mapping like the config file's ``when`` table.
    """

    factory: Callable[[], IMilter]
    name: str = ""
    timeout: float = 25.0
    fallback: FilterVerdict = field(default_factory=TempFail)
    dry_run: bool = False
    after_changes: bool = False
    when: When | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            name = getattr(self.factory, "__qualname__", None) or repr(self.factory)
            object.__setattr__(self, "name", name)
        if self.when is not None and not isinstance(self.when, When):
            object.__setattr__(self, "when", When.parse(self.when, f"filter {self.name}"))
        if not isinstance(self.fallback, _FALLBACKS):
            raise ConfigurationError(
                f"filter {self.name}: fallback must be TempFail, Accept, Continue or Reject, not {self.fallback!r}"
            )
        if not self.timeout > 0:
            raise ConfigurationError(f"filter {self.name}: timeout must be positive, not {self.timeout!r}")

    @property
    def conditions(self) -> When | None:
        """Where the filter applies (``when``, parsed), or None for everywhere."""
        return cast(When | None, self.when)


def as_spec(member: FilterSpec | Callable[[], IMilter]) -> FilterSpec:
    """A FilterSpec for a spec or a bare factory (such as a Milter subclass)."""
    return member if isinstance(member, FilterSpec) else FilterSpec(member)


@dataclass(frozen=True)
class Profile:
    """What a filter declares; the same for every instance one FilterSpec makes."""

    needs: Needs
    no_reply: frozenset[str]
    whole_body: bool
    calls_body: bool
    after_changes: bool

    @property
    def requirements(self) -> Requirements:
        """Actions, protocol options and macros the filter needs."""
        return self.needs.requirements


def profile_of(spec: FilterSpec, milter: IMilter) -> Profile:
    """The declarations of ``milter``; ConfigurationError if one is invalid."""
    no_reply: Any = getattr(milter, "no_reply", frozenset())
    unknown = sorted(set(no_reply) - set(CALLBACKS.values())) if not isinstance(no_reply, str) else [no_reply]
    if unknown:
        raise ConfigurationError(
            f"filter {spec.name}: no_reply must name callbacks that can go unanswered"
            f" ({', '.join(CALLBACKS.values())}), not {', '.join(map(repr, unknown))}"
        )
    try:
        receives = frozenset(command for command, name in CALLBACKS.items() if overrides(milter, name))
        silent = frozenset(command for command in receives if CALLBACKS[command] in no_reply)
        whole_body = bool(getattr(milter, "whole_body", False))
        if whole_body:
            # The chain buffers the body for it: it needs the chunks, but answers none of them itself.
            if BodyChunk not in receives:
                silent |= {BodyChunk}
            receives |= {BodyChunk}
        protocol = ProtocolFlag.NONE
        if getattr(milter, "leading_space", False):
            protocol |= ProtocolFlag.HEADER_LEADING_SPACE
        if getattr(milter, "rejected_recipients", False):
            protocol |= ProtocolFlag.RCPT_REJECTED
        macros = {MacroStage(stage): tuple(names) for stage, names in getattr(milter, "macro_requests", {}).items()}
        requirements = Requirements(
            actions=Action(getattr(milter, "actions", Action.NONE)), protocol=protocol, macros=macros
        )
    except (ValueError, TypeError, LocalProtocolError) as e:
        raise ConfigurationError(f"filter {spec.name} declares something invalid: {e}") from e
    return Profile(
        Needs(requirements, receives, silent), frozenset(no_reply), whole_body, overrides(milter, "body"),
        spec.after_changes or bool(getattr(milter, "after_changes", False)),
    )


class Lineup:
    """The configured filters in chain order, with what each declares, worked out once per factory."""

    def __init__(self, filters: Sequence[FilterSpec | Callable[[], IMilter]]) -> None:
        #: The specs, in chain order (a tuple of specs is kept as it is).
        self.specs: tuple[FilterSpec, ...] = (
            filters if isinstance(filters, tuple) and all(isinstance(f, FilterSpec) for f in filters)
            else tuple(as_spec(f) for f in filters)
        )
        self._profiles: list[Profile | None] = [None] * len(self.specs)

    @classmethod
    def verified(cls, filters: Sequence[FilterSpec | Callable[[], IMilter]]) -> Lineup:
        """A lineup whose filters were each made once, so configuration errors show before listening."""
        lineup = cls(filters)
        for index, spec in enumerate(lineup.specs):
            try:
                milter = spec.factory()
            except Exception as e:
                raise ConfigurationError(f"filter {spec.name} cannot be created: {e}") from e
            if not IMilter.providedBy(milter):
                raise ConfigurationError(
                    f"filter {spec.name} does not provide IMilter; derive it from txmilt.Milter"
                )
            lineup.profile(index, milter)
        return lineup

    def profiles(self) -> list[Profile]:
        """Every filter's declarations, once each has been worked out (a chain has made its filters)."""
        known = [profile for profile in self._profiles if profile is not None]
        if len(known) != len(self._profiles):
            raise LocalProtocolError("a lineup's declarations are known only once a chain has made its filters")
        return known

    def profile(self, index: int, milter: IMilter) -> Profile:
        """The declarations of filter ``index``, worked out from its first instance (``milter``)."""
        profile = self._profiles[index]
        if profile is None:
            profile = self._profiles[index] = profile_of(self.specs[index], milter)
        return profile


def verify_filters(filters: Sequence[FilterSpec | Callable[[], IMilter]]) -> tuple[FilterSpec, ...]:
    """Specs for ``filters``, each factory tried once so configuration errors show before listening."""
    return Lineup.verified(filters).specs


@dataclass
class Context:
    """What every member of one chain shares: the clock, the observer and the connection's id for logs."""

    clock: IReactorTime
    connection_id: str = "-"
    observer: ChainObserver | None = None
    log: Logger = field(default_factory=lambda: Logger(namespace="txmilt.chain.Chain"))
    #: Bytes of a buffered body kept in memory, then the most kept at all (``whole_body`` filters).
    spool_threshold: int = DEFAULT_BODY_SPOOL_THRESHOLD
    max_body_size: int = DEFAULT_MAX_BODY_SIZE


class Member:
    """One filter instance on one connection, with its per-message state."""

    __slots__ = (
        "add_space", "closed", "context", "failed", "milter", "pending", "profile", "queued", "replayed", "retired",
        "retired_for_connection", "skipping", "spec", "spool", "strip_space",
    )

    def __init__(self, lineup: Lineup, index: int, context: Context) -> None:
        self.spec = lineup.specs[index]
        self.context = context
        self.milter = self.spec.factory()
        self.profile = lineup.profile(index, self.milter)
        #: Header values lose (or gain, on the way back) the leading space the filter did not ask for.
        self.strip_space = self.add_space = False
        #: It accepted the current message: it sees no more of it.
        self.retired = False
        #: It accepted at CONNECT or HELO: it sees nothing more of this connection.
        self.retired_for_connection = False
        #: It answered Skip: no more body chunks for this message.
        self.skipping = False
        #: Its end_of_message failed: its changes, perhaps half made, are dropped.
        self.failed = False
        self.closed = False
        #: The body buffered for a ``whole_body`` filter.
        self.spool: BodySpool | None = None
        #: A dry-run filter's running work, and the work waiting for it, in order.
        self.pending: Deferred[Any] | None = None
        self.queued: deque[Callable[[], object]] | None = None  # made when first needed (memory per connection)
        #: It is shown the message content at end of message, as the filters before it left it.
        self.replayed = False

    @property
    def active(self) -> bool:
        """Whether the filter still takes part in the current message."""
        return not (self.retired or self.retired_for_connection)

    @property
    def name(self) -> str:
        """The filter's name, for logs and metrics."""
        return self.spec.name

    def show_body(self, body: IO[bytes] | None) -> None:
        """Set a ``whole_body`` filter's ``body_file``."""
        milter: Any = self.milter
        milter.body_file = body

    def drop_body(self) -> None:
        """Forget the buffered body and the file the filter was shown."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.profile.whole_body:
            self.show_body(None)

    def enqueue(self, work: Callable[[], object]) -> None:
        """Run ``work`` once this filter's earlier work is done (at once if there is none).

        A dry-run filter is never waited for: its callbacks run in their own time,
        one after another, through this queue.
        """
        if self.pending is not None:
            if self.queued is None:
                self.queued = deque()
            self.queued.append(work)
            return
        while True:
            result = work()
            if isinstance(result, Deferred) and not result.called:
                self.pending = result
                result.addBoth(self._next, result)
                return
            if not self.queued:
                return
            work = self.queued.popleft()

    def _next(self, result: object, deferred: Deferred[Any]) -> object:
        if self.pending is deferred:
            self.pending = None
            if self.queued:
                self.enqueue(self.queued.popleft())
        return result

    def stop_queue(self) -> None:
        """Drop the queued work and cancel the running one."""
        self.queued = None
        running, self.pending = self.pending, None
        if running is not None:
            running.cancel()

    # -- what the filter is given

    def argument(self, command: Command, rejected: bool) -> object | None:
        """What this filter's callback is given for ``command`` now, or None if it is not called.

        ``rejected``: the command is a recipient the MTA already refused. A
        ``whole_body`` filter's chunks are buffered here.
        """
        kind = type(command)
        if self.retired or self.retired_for_connection or kind not in self.profile.needs.receives:
            return None
        if kind is BodyChunk:
            if self.skipping or self.replayed:
                return None
            if self.profile.whole_body:
                self.buffer(command.data)  # type: ignore[union-attr]
            return command if self.profile.calls_body else None
        if kind is Header:
            if self.replayed:
                return None
            if self.strip_space:
                return Header(command.name, strip_leading_space(command.value))  # type: ignore[union-attr]
            return command
        if kind is EndOfHeaders:
            return None if self.replayed else command
        if rejected and not self.profile.requirements.protocol & ProtocolFlag.RCPT_REJECTED:
            return None
        return command

    def buffer(self, data: bytes) -> None:
        """Keep a body chunk for a ``whole_body`` filter, in memory, then in a temporary file."""
        context = self.context
        if self.spool is None:
            self.spool = BodySpool(context.spool_threshold, context.max_body_size)
        elif self.spool.trouble is not None:
            return
        if not self.spool.write(data):
            context.log.error(
                "[{conn}] filter {filter}: {trouble}; it gets its fallback {fallback!r} at end of message",
                conn=context.connection_id, filter=self.name, trouble=self.spool.trouble,
                fallback=self.spec.fallback,
            )

    def count(self, stage: str, verdict: FilterVerdict) -> None:
        """Report a verdict to the observer."""
        observer = self.context.observer
        if observer is not None:
            observer.verdict(self.name, stage, type(verdict).__name__, self.spec.dry_run)

    def count_changes(self, recorder: Any) -> None:
        """Report each change the filter recorded to the observer, if there is one."""
        observer = self.context.observer
        if observer is not None:
            for kind in describe_changes(recorder):
                observer.change(self.name, kind, self.spec.dry_run)

    def end_of_message(self, recorder: Any, macros: MacroView) -> FilterVerdict | Deferred[Any]:
        """Call end_of_message, showing a ``whole_body`` filter its body first (its fallback if it has none)."""
        if self.profile.whole_body and not self.replayed:
            spool = self.spool
            if spool is not None and spool.trouble is not None:
                fallback, _ = self.fallback("end_of_message")
                self._report("end_of_message", "body")
                return fallback
            self.show_body(spool.file() if spool is not None else BodySpool().file())
        return self.call("end_of_message", recorder, macros)

    def skip(self, reason: str) -> None:
        """Log and count that this filter's ``when`` left it out (``reason``: the key that failed)."""
        context = self.context
        context.log.debug(
            "[{conn}] filter {filter} sits this out: its when.{key} does not hold",
            conn=context.connection_id, filter=self.name, key=reason,
        )
        if context.observer is not None:
            context.observer.skipped(self.name, reason)

    # -- calling the filter

    def call(self, stage: str, argument: object, macros: MacroView) -> FilterVerdict | Deferred[Any]:
        """Run one callback; a verdict now, or a Deferred of one that never fails (the fallback instead)."""
        milter = self.milter
        milter.macros = macros
        observed = self.context.observer is not None
        started = self.context.clock.seconds() if observed else 0.0
        try:
            value = getattr(milter, stage)(argument)
        except Exception:
            if observed:
                self._latency(stage, started)
            return self.failed_with(stage, Failure(), "error")
        if value is None or type(value) is Continue:
            if observed:
                self._latency(stage, started)
            return _CONTINUE
        return self._settle(stage, value, started)

    def call_quietly(self, stage: str) -> Deferred[Any] | None:
        """Run a callback whose answer does not count (abort, reset, close); a Deferred if it is slow."""
        try:
            value = getattr(self.milter, stage)()
        except Exception:
            self.failed_with(stage, Failure(), "error")
            return None
        if inspect.iscoroutine(value):
            value = coroutine_deferred(value)
        if not isinstance(value, Deferred):
            return None
        value.addTimeout(self.spec.timeout, self.context.clock)

        def failed(failure: Failure) -> None:
            if failure.check(TimeoutError):
                self.failed_with(stage, failure, "timeout")
            elif not failure.check(CancelledError):
                self.failed_with(stage, failure, "error")

        return value.addErrback(failed)

    def _settle(self, stage: str, value: object, started: float) -> FilterVerdict | Deferred[Any]:
        """The verdict a callback's return value stands for, now or (for a pending Deferred) later."""
        if inspect.iscoroutine(value):
            value = coroutine_deferred(value)
        if isinstance(value, Deferred):
            if not value.called or value.paused:
                return self._wait(stage, value, started)
            box: list[object] = []  # already fired: a finished coroutine, succeed(...)
            value.addBoth(box.append)
            value = box[0]
        self._latency(stage, started)
        if isinstance(value, Failure):
            return self.failed_with(stage, value, "error")
        return self._verdict(stage, value)

    def _wait(self, stage: str, value: Deferred[Any], started: float) -> Deferred[Any]:
        """A Deferred of the verdict, never failing; cancelling it cancels the filter's work."""
        cancelled = False

        def cancel(_: Deferred[Any]) -> None:
            nonlocal cancelled
            cancelled = True
            value.cancel()
            forward(_CONTINUE)  # in case the filter's Deferred ignores the cancellation

        def forward(result: object) -> None:
            if not verdict.called:
                verdict.callback(result)

        def done(result: object) -> object:
            self._latency(stage, started)
            return self._verdict(stage, result)

        def failed(failure: Failure) -> object:
            if cancelled:
                return _CONTINUE  # the chain no longer needs this answer; nothing to report
            self._latency(stage, started)
            kind = "timeout" if failure.check(TimeoutError) else "error"
            return self.failed_with(stage, failure, kind)

        verdict: Deferred[Any] = Deferred(cancel)
        value.addTimeout(self.spec.timeout, self.context.clock)
        value.addCallbacks(done, failed).addBoth(forward)
        return verdict

    def _verdict(self, stage: str, value: object) -> FilterVerdict:
        if value is None:
            return _CONTINUE
        if isinstance(value, FILTER_VERDICTS):
            return self._checked(stage, value)
        return self._bad_verdict(stage, value)

    def _checked(self, stage: str, verdict: FilterVerdict) -> FilterVerdict:
        """The verdict if it is legal at this stage, else the filter's fallback."""
        kind = _COMMAND_OF.get(stage)
        if kind is not None and not can_answer(kind, type(verdict)):
            return self._bad_verdict(stage, verdict)
        if stage in self.profile.no_reply and not isinstance(verdict, Continue):
            self.context.log.error(
                "[{conn}] filter {filter} answered {verdict!r} from {stage}, which it declared no_reply;"
                " ignored", conn=self.context.connection_id, filter=self.name, verdict=verdict, stage=stage,
            )
            return _CONTINUE
        return verdict

    def fallback(self, stage: str) -> tuple[FilterVerdict, str]:
        """What a failed callback answers, and how the log says so."""
        if stage == "end_of_message":
            self.failed = True
        if stage in ("abort", "reset", "close"):
            return _CONTINUE, "carrying on"
        if stage in self.profile.no_reply:
            # The MTA reads no reply here (or the filter promised it only observes): never refuse.
            return _CONTINUE, "continuing, as the callback is declared no_reply"
        return self.spec.fallback, f"using fallback {self.spec.fallback!r}"

    def _bad_verdict(self, stage: str, value: object) -> FilterVerdict:
        fallback, consequence = self.fallback(stage)
        self.context.log.error(
            "[{conn}] filter {filter} returned {value!r} from {stage}, not a verdict legal there; {consequence}",
            conn=self.context.connection_id, filter=self.name, value=value, stage=stage, consequence=consequence,
        )
        self._report(stage, "bad-verdict")
        return fallback

    def failed_with(self, stage: str, failure: Failure, kind: str) -> FilterVerdict:
        """Log a failed callback (``kind`` "timeout" or "error"); the fallback it gets."""
        fallback, consequence = self.fallback(stage)
        log, conn = self.context.log, self.context.connection_id
        if kind == "timeout":
            log.error(
                "[{conn}] filter {filter} timed out after {timeout}s in {stage}; {consequence}",
                conn=conn, filter=self.name, timeout=self.spec.timeout, stage=stage, consequence=consequence,
            )
        else:
            log.failure(
                "[{conn}] filter {filter} failed in {stage}; {consequence}", failure=failure, level=LogLevel.error,
                conn=conn, filter=self.name, stage=stage, consequence=consequence,
            )
        self._report(stage, kind)
        return fallback

    def _report(self, stage: str, kind: str) -> None:
        if self.context.observer is not None:
            self.context.observer.failure(self.name, stage, kind)

    def _latency(self, stage: str, started: float) -> None:
        observer = self.context.observer
        if observer is not None:
            observer.latency(self.name, stage, self.context.clock.seconds() - started)

