"""The chain: several filters on one MTA connection, answering as one milter.

Each command goes to every filter still active for it, all at once; the
verdicts are read in filter order and the first refusal answers (DESIGN.md,
chain rules 1-7). ``merge_verdicts`` and ``merge_changes`` are pure functions.
"""

from __future__ import annotations

import inspect
import io
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TypeAlias

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from txmilt.coroutines import coroutine_deferred
from txmilt.errors import ConfigurationError, LocalProtocolError, NegotiationError
from txmilt.interfaces import IMilter
from txmilt.messages import (
    Abort,
    Accept,
    Action,
    AddHeader,
    BodyChunk,
    ChangeFrom,
    Command,
    Connect,
    Continue,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    Modification,
    Negotiate,
    NegotiateReply,
    ProtocolFlag,
    Quit,
    QuitNoClose,
    RcptTo,
    Reject,
    Response,
    Skip,
    TempFail,
    split_body,
    strip_leading_space,
)
from txmilt.messages import ChangeHeader as _ChangeHeader
from txmilt.messages import Quarantine as _Quarantine
from txmilt.milter import CALLBACKS, FILTER_VERDICTS, Changes, FilterVerdict, overrides
from txmilt.session import (
    NO_FLAG,
    NO_REPLY_FLAG,
    REFUSAL_KEEPS_MESSAGE,
    TRACKING_EVENTS,
    Disconnected,
    LimitExceeded,
    MacroView,
    Requirements,
    can_answer,
    negotiate,
)

#: What the chain hands back for one command: the packets to send, now or later.
Outcome: TypeAlias = "Sequence[Response] | Deferred[Sequence[Response]]"

_REFUSALS = (Reject, TempFail, Discard)
_FALLBACKS = (TempFail, Accept, Continue, Reject)
_CONNECTION_LEVEL = (Connect, Helo)
# Commands at which a refusal leaves the message open (recipient-level, or no message).
_MESSAGE_SURVIVES = (*_CONNECTION_LEVEL, *REFUSAL_KEEPS_MESSAGE)
_HEADER_EDITS = Action.ADD_HEADERS | Action.CHANGE_HEADERS
_CONTINUE = Continue()
# Commands of the message content: after a per-message limit is passed, these get the refusal.
_CONTENT = (Header, EndOfHeaders, BodyChunk, EndOfMessage)

#: Default largest body a ``whole_body`` filter may buffer; above it the filter gets its fallback.
DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024
#: Default bytes of a buffered body kept in memory before it is spooled to a temporary file.
DEFAULT_BODY_SPOOL_THRESHOLD = 1024 * 1024

#: The answer to a message over a per-message limit, by what was counted.
OVER_LIMIT_REPLIES = {
    "headers": TempFail("Message has too many headers", code=452, status="4.3.1"),
    "header bytes": TempFail("Message header section is too large", code=452, status="4.3.1"),
}


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


@dataclass(frozen=True)
class FilterSpec:
    """One chain member: how to make it, and how to treat it when it fails."""

    factory: Callable[[], IMilter]
    name: str = ""
    timeout: float = 25.0
    fallback: FilterVerdict = field(default_factory=TempFail)
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            name = getattr(self.factory, "__qualname__", None) or repr(self.factory)
            object.__setattr__(self, "name", name)
        if not isinstance(self.fallback, _FALLBACKS):
            raise ConfigurationError(
                f"filter {self.name}: fallback must be TempFail, Accept, Continue or Reject, not {self.fallback!r}"
            )
        if not self.timeout > 0:
            raise ConfigurationError(f"filter {self.name}: timeout must be positive, not {self.timeout!r}")


def as_spec(member: FilterSpec | Callable[[], IMilter]) -> FilterSpec:
    """A FilterSpec for a spec or a bare factory (such as a Milter subclass)."""
    return member if isinstance(member, FilterSpec) else FilterSpec(member)


# ------------------------------------------------------------------ pure merges


def merge_verdicts(verdicts: Sequence[FilterVerdict]) -> FilterVerdict:
    """The first refusal in chain order, else Continue (Accept and Skip are per filter)."""
    for verdict in verdicts:
        if isinstance(verdict, _REFUSALS):
            return verdict
    return _CONTINUE


def _decides(member: _Member, verdict: FilterVerdict) -> bool:
    """Whether ``verdict`` from ``member`` answers the MTA (a refusal, not in evaluation mode)."""
    return isinstance(verdict, _REFUSALS) and not member.spec.dry_run


def _filter_requirements(milter: IMilter) -> tuple[Requirements, frozenset[type], frozenset[type]]:
    """A filter's own needs, the commands it receives, and those it answers without reply."""
    receives = frozenset(command for command, name in CALLBACKS.items() if overrides(milter, name))
    silent = frozenset(
        command for command in receives if CALLBACKS[command] in getattr(milter, "no_reply", frozenset())
    )
    if getattr(milter, "whole_body", False):
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
    needs = Requirements(actions=Action(getattr(milter, "actions", Action.NONE)), protocol=protocol, macros=macros)
    return needs, receives, silent


def merge_requirements(
    members: Sequence[tuple[Requirements, frozenset[type], frozenset[type]]],
    observe: Iterable[type] = (),
) -> Requirements:
    """The chain's needs: unions of actions and macros, events off only if nobody needs them.

    A no-reply flag is asked for only when every filter receiving that command
    answers it without reply; ``observe`` lists commands the chain itself reads.
    """
    actions, protocol = Action.NONE, ProtocolFlag.NONE
    macros: dict[MacroStage, list[str]] = {}
    for needs, _, _ in members:
        actions |= needs.actions
        protocol |= needs.protocol
        for stage, names in needs.macros.items():
            known = macros.setdefault(stage, [])
            known.extend(name for name in names if name not in known)
    optional = ProtocolFlag.NONE
    watched = set(observe)
    for command, no_flag in NO_FLAG.items():
        receivers = [(receives, silent) for _, receives, silent in members if command in receives]
        if not receivers and command not in watched:
            optional |= no_flag
        needs_reply_flag = receivers or command in watched or no_flag & TRACKING_EVENTS
        if needs_reply_flag and all(command in silent for _, silent in receivers):
            optional |= NO_REPLY_FLAG[command]
    if any(BodyChunk in receives for _, receives, _ in members):
        optional |= ProtocolFlag.SKIP
    rcpt = macros.get(MacroStage.RCPT)
    if protocol & ProtocolFlag.RCPT_REJECTED and rcpt is not None and not {"rcpt_mailer", "{rcpt_mailer}"} & set(rcpt):
        # The chain tells rejected recipients apart by {rcpt_mailer}; an explicit list replaces the
        # MTA's default one, which has it.
        rcpt.append("{rcpt_mailer}")
    return Requirements(actions, protocol, optional, {stage: tuple(names) for stage, names in macros.items()})


class _Entry:
    """One header in the simulated header list used for rebasing."""

    __slots__ = ("key",)

    def __init__(self, name: str) -> None:
        self.key = name.lower()


@dataclass
class MergedChanges:
    """The packets to send at end of message, and warnings about conflicts."""

    modifications: list[Modification] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def merge_changes(headers: Sequence[tuple[str, str]], contributions: Sequence[tuple[str, Changes]]) -> MergedChanges:
    """Apply each filter's changes in order, each rebased onto the message it saw.

    Header indices are rewritten so that one filter's insert or delete does not
    shift what a later filter meant; where two filters change the same single
    thing (a header, the sender, the body, the quarantine reason), the later
    wins and a warning names both. A change of a header an earlier filter
    deleted is dropped with a warning.
    """
    merged = MergedChanges()
    hidden = _Entry("")  # the MTA's own Received: header, position 0; its key matches no name
    original = [hidden, *(_Entry(name) for name, _ in headers)]
    current = list(original)  # the MTA's list as the modifications sent so far leave it
    live = set(current)
    touched: dict[_Entry, int] = {}
    deleted: dict[_Entry, int] = {}
    single: dict[str, int] = {}
    sender: ChangeFrom | None = None
    body: bytes | None = None
    quarantine: str | None = None

    def occurrences(entries: list[_Entry], key: str) -> list[_Entry]:
        return [entry for entry in entries if entry.key == key]

    def append(view: list[_Entry], name: str) -> None:
        entry = _Entry(name)
        view.append(entry)
        current.append(entry)
        live.add(entry)

    for number, (name, changes) in enumerate(contributions):
        view = list(original)  # the message as this filter saw it, with its own changes so far
        for edit in changes.edits:
            if isinstance(edit, InsertHeader):
                at = min(edit.index, len(view))
                anchor = next((e for e in view[at:] if e in live), None)
                # Before the first header still there that followed in this filter's view; past the
                # end, keep the distance so an append stays an append.
                position = len(current) + edit.index - at if anchor is None else current.index(anchor)
                entry = _Entry(edit.name)
                view.insert(at, entry)
                current.insert(position, entry)
                live.add(entry)
                merged.modifications.append(InsertHeader(position, edit.name, edit.value))
            elif isinstance(edit, _ChangeHeader):
                key = edit.name.lower()
                seen = occurrences(view, key)
                index = max(edit.index, 1)
                if index > len(seen):
                    # No such header: the MTA appends one (if the value is not empty).
                    beyond = index - len(seen)
                    merged.modifications.append(
                        _ChangeHeader(len(occurrences(current, key)) + beyond, edit.name, edit.value)
                    )
                    if edit.value:
                        append(view, edit.name)
                    continue
                target = seen[index - 1]
                if target in deleted:
                    merged.warnings.append(
                        f"filter {name} changes header {edit.name} #{index}, which filter"
                        f" {contributions[deleted[target]][0]} deleted; ignored"
                    )
                    if not edit.value:
                        view.remove(target)
                    continue
                if touched.get(target, number) != number:
                    merged.warnings.append(
                        f"filters {contributions[touched[target]][0]} and {name} both change header"
                        f" {edit.name} #{index}; {name} wins"
                    )
                rebased = occurrences(current, key).index(target) + 1
                merged.modifications.append(_ChangeHeader(rebased, edit.name, edit.value))
                touched[target] = number
                if not edit.value:
                    view.remove(target)
                    current.remove(target)
                    live.discard(target)
                    deleted[target] = number
            else:
                if isinstance(edit, AddHeader):
                    append(view, edit.name)
                merged.modifications.append(edit)
        for what, value in (("sender", changes.sender), ("body", changes.body),
                            ("quarantine reason", changes.quarantine_reason)):
            if value is None:
                continue
            if what in single:
                merged.warnings.append(
                    f"filters {contributions[single[what]][0]} and {name} both change the {what}; {name} wins"
                )
            single[what] = number
        if changes.sender is not None:
            sender = changes.sender
        if changes.body is not None:
            body = changes.body
        if changes.quarantine_reason is not None:
            quarantine = changes.quarantine_reason
    if sender is not None:
        merged.modifications.append(sender)
    if body is not None:
        merged.modifications.extend(split_body(body))
    if quarantine is not None:
        merged.modifications.append(_Quarantine(quarantine))
    return merged


# ----------------------------------------------------------------- the chain


@dataclass(frozen=True)
class _Profile:
    """What a filter declares; the same for every instance one FilterSpec makes."""

    needs: Requirements
    receives: frozenset[type]
    silent: frozenset[type]
    no_reply: frozenset[str]
    whole_body: bool
    calls_body: bool


_PROFILES: dict[FilterSpec, _Profile] = {}


def _profile(spec: FilterSpec, milter: IMilter) -> _Profile:
    """The declarations of ``spec``'s filters, worked out once from its first instance."""
    profile = _PROFILES.get(spec)
    if profile is None:
        needs, receives, silent = _filter_requirements(milter)
        profile = _Profile(
            needs, receives, silent, frozenset(getattr(milter, "no_reply", ())),
            bool(getattr(milter, "whole_body", False)), overrides(milter, "body"),
        )
        if len(_PROFILES) > 1024:
            _PROFILES.clear()
        _PROFILES[spec] = profile
    return profile


class _Member:
    """One filter instance on this connection and its per-message state."""

    __slots__ = (
        "add_space",
        "body_size",
        "body_trouble",
        "calls_body",
        "closed",
        "failed",
        "in_message",
        "milter",
        "needs",
        "no_reply",
        "receives",
        "retired",
        "retired_for_connection",
        "silent",
        "skipping",
        "spec",
        "spool",
        "strip_space",
        "whole_body",
    )

    def __init__(self, spec: FilterSpec) -> None:
        self.spec = spec
        self.milter = spec.factory()
        profile = _profile(spec, self.milter)
        self.needs, self.receives, self.silent = profile.needs, profile.receives, profile.silent
        self.no_reply, self.whole_body, self.calls_body = profile.no_reply, profile.whole_body, profile.calls_body
        self.spool: tempfile.SpooledTemporaryFile[bytes] | None = None
        self.body_size = 0
        self.body_trouble: str | None = None  # why the buffered body was given up
        self.strip_space = False
        self.add_space = False
        self.retired = False
        self.retired_for_connection = False
        self.skipping = False
        self.in_message = False
        self.closed = False
        self.failed = False  # its end_of_message failed: its changes are dropped

    @property
    def active(self) -> bool:
        return not (self.retired or self.retired_for_connection)

    def drop_body(self) -> None:
        """Forget the buffered body (and the file the filter was shown)."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self.body_size = 0
        self.body_trouble = None
        if self.whole_body:
            self.show_body(None)

    def show_body(self, body: IO[bytes] | None) -> None:
        """Set the whole_body filter's ``body_file``."""
        milter: Any = self.milter
        milter.body_file = body


_PENDING: Any = object()
_SESSION_ENDS = (Quit, Disconnected, QuitNoClose)
# The command each callback answers, for checking a verdict against session.can_answer.
_COMMAND_OF = {name: kind for kind, name in CALLBACKS.items()} | {"end_of_message": EndOfMessage}
# OPTNEG replies already worked out, by filter specs and offer (an MTA makes the same offer every time).
_REPLIES: dict[tuple[tuple[FilterSpec, ...], Negotiate], NegotiateReply] = {}


class Chain:
    """Fans each MTA command out to the filters of one connection and merges their answers."""

    __slots__ = (
        "_clock", "_closed", "_headers", "_in_flight", "_max_body_size", "_members", "_negotiated", "_observer",
        "_offer", "_progress_call", "_progress_interval", "_refused_over_limit", "_specs", "_spool_threshold",
        "connection_id", "send_progress",
    )

    log = Logger()

    def __init__(
        self,
        filters: Sequence[FilterSpec | Callable[[], IMilter]],
        clock: IReactorTime,
        *,
        connection_id: str = "-",
        progress_interval: float = 10.0,
        send_progress: Callable[[], None] | None = None,
        observer: ChainObserver | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        body_spool_threshold: int = DEFAULT_BODY_SPOOL_THRESHOLD,
    ) -> None:
        self._specs = tuple(as_spec(spec) for spec in filters)
        self._max_body_size = max_body_size
        self._spool_threshold = body_spool_threshold
        self._clock = clock
        self.connection_id = connection_id
        self._progress_interval = progress_interval
        self.send_progress = send_progress
        self._observer = observer
        self._members = [_Member(spec) for spec in self._specs]
        self._negotiated: NegotiateReply | None = None
        self._offer: Negotiate | None = None
        self._headers: list[tuple[str, str]] = []
        self._in_flight: Deferred[Any] | None = None
        self._progress_call: IDelayedCall | None = None
        self._closed = False
        self._refused_over_limit = False

    # -- negotiation

    def _watched(self) -> tuple[type, ...]:
        editors = [m for m in self._members if m.needs.actions & _HEADER_EDITS and not m.spec.dry_run]
        return (Header,) if len(editors) > 1 else ()

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        """The chain's OPTNEG reply; NegotiationError names a filter the MTA cannot serve."""
        key = (self._specs, offer)
        reply = _REPLIES.get(key)
        if reply is None:
            reply = self._negotiate(offer)
            if len(_REPLIES) > 1024:
                _REPLIES.clear()
            _REPLIES[key] = reply
        self._offer = offer
        self.accept_negotiation(reply)
        return reply

    def _negotiate(self, offer: Negotiate) -> NegotiateReply:
        negotiate(offer, Requirements())  # an unusable version is no filter's fault
        for member in self._members:
            try:
                negotiate(offer, member.needs)
            except NegotiationError as e:
                raise NegotiationError(f"filter {member.spec.name}: {e}") from None
        needs = merge_requirements(
            [(m.needs, m.receives, m.silent) for m in self._members], observe=self._watched()
        )
        return negotiate(offer, needs)

    def accept_negotiation(self, reply: NegotiateReply) -> None:
        """Adapt the filters to what was negotiated (leading space per filter).

        A filter with a ``negotiated(offer, reply)`` method learns the MTA's offer
        and the chain's reply (RemoteMilter uses it to offer its peer the same version).
        """
        self._negotiated = reply
        leading = bool(reply.protocol & ProtocolFlag.HEADER_LEADING_SPACE)
        for member in self._members:
            wants = bool(member.needs.protocol & ProtocolFlag.HEADER_LEADING_SPACE)
            member.strip_space = member.add_space = leading and not wants
            hook = getattr(member.milter, "negotiated", None)
            if callable(hook) and self._offer is not None:
                hook(self._offer, reply)

    # -- dispatch

    def handle(
        self, command: Command | Disconnected, macros: MacroView, over_limit: LimitExceeded | None = None
    ) -> Outcome:
        """Run ``command`` through the chain; the responses to send (empty for none).

        ``over_limit`` (from the session) means the message went over a limit:
        its content no longer reaches the filters, and is answered TempFail.
        """
        if over_limit is not None and isinstance(command, _CONTENT):
            return self._over_limit(over_limit)
        if isinstance(command, Abort):
            return self._after(self._abort(self._members), ())
        if isinstance(command, _SESSION_ENDS):
            outcome = self._after(self.close(), ())
            if isinstance(command, QuitNoClose):
                self._members = [_Member(spec) for spec in self._specs]
                self._closed = False
                if self._negotiated is not None:
                    self.accept_negotiation(self._negotiated)
            return outcome
        if isinstance(command, MailFrom):
            self._begin_message()
        elif isinstance(command, Header):
            self._headers.append((command.name, command.value))
        if isinstance(command, EndOfMessage):
            return self._end_of_message(command, macros)
        return self._dispatch(command, macros)

    def _over_limit(self, limit: LimitExceeded) -> Outcome:
        """Answer content past a per-message limit; the first time, log it and abort the filters."""
        answer = OVER_LIMIT_REPLIES.get(limit.what, TempFail())
        if self._refused_over_limit:
            return (answer,)
        self._refused_over_limit = True
        self.log.warn(
            "[{conn}] message over a limit ({limit}); no more of it goes to the filters, answering {answer!r}",
            conn=self.connection_id, limit=str(limit), answer=answer,
        )
        return self._after(self._abort(self._members), (answer,))

    def _dispatch(self, command: Command, macros: MacroView) -> Outcome:
        kind = type(command)
        stage = CALLBACKS[kind]
        targets = [m for m in self._members if m.active and kind in m.receives]
        if isinstance(command, BodyChunk):
            targets = [m for m in targets if not m.skipping]
            for member in targets:
                if member.whole_body:
                    self._buffer(member, command.data)
            targets = [m for m in targets if m.calls_body]
        elif kind is RcptTo and macros.get("rcpt_mailer") == "error":
            targets = [m for m in targets if m.needs.protocol & ProtocolFlag.RCPT_REJECTED]
        results: list[Any] = []
        for member in targets:
            argument = command
            if isinstance(command, Header) and member.strip_space:
                argument = Header(command.name, strip_leading_space(command.value))
            results.append(self._invoke(member, stage, argument, macros))
        gathered = self._gather(targets, results)
        if isinstance(gathered, Deferred):
            return self._track(gathered.addCallback(lambda verdicts: self._decide(command, targets, verdicts)))
        return self._decide(command, targets, gathered)

    def _buffer(self, member: _Member, data: bytes) -> None:
        """Keep a body chunk for a whole_body filter, in memory, then in a temporary file."""
        if member.body_trouble is not None:
            return
        size = member.body_size + len(data)
        if self._max_body_size and size > self._max_body_size:
            self._give_up_body(member, f"the body is over max_body_size ({self._max_body_size} bytes)")
            return
        try:
            if member.spool is None:
                member.spool = tempfile.SpooledTemporaryFile(max_size=self._spool_threshold)  # noqa: SIM115
                if not self._spool_threshold:
                    member.spool.rollover()
            member.spool.write(data)
        except OSError as e:
            self._give_up_body(member, f"the body cannot be spooled ({e})")
            return
        member.body_size = size

    def _give_up_body(self, member: _Member, trouble: str) -> None:
        """Stop buffering for ``member``, which then gets its fallback at end of message."""
        member.drop_body()
        member.body_trouble = trouble
        self.log.error(
            "[{conn}] filter {filter}: {trouble}; it gets its fallback {fallback!r} at end of message",
            conn=self.connection_id, filter=member.spec.name, trouble=trouble, fallback=member.spec.fallback,
        )

    def _invoke(
        self, member: _Member, stage: str, argument: object, macros: MacroView
    ) -> FilterVerdict | Deferred[Any]:
        """Call one filter's callback; a verdict now, or a Deferred that never fails."""
        milter = member.milter
        milter.macros = macros
        started = self._clock.seconds() if self._observer is not None else 0.0
        try:
            value = getattr(milter, stage)(argument)
        except Exception:
            self._latency(member, stage, started)
            return self._failed(member, stage, Failure(), "error")
        return self._settle(member, stage, value, started)

    def _settle(self, member: _Member, stage: str, value: object, started: float) -> FilterVerdict | Deferred[Any]:
        """The verdict a callback's return value stands for, now or (for a pending Deferred) later."""
        if value is None or type(value) is Continue:
            self._latency(member, stage, started)
            return _CONTINUE
        if inspect.iscoroutine(value):
            value = coroutine_deferred(value)
        if isinstance(value, Deferred):
            if not value.called or value.paused:
                return self._wait(member, stage, value, started)
            box: list[object] = []  # already fired: a finished coroutine, succeed(...)
            value.addBoth(box.append)
            value = box[0]
        self._latency(member, stage, started)
        if isinstance(value, Failure):
            return self._failed(member, stage, value, "error")
        return self._verdict(member, stage, value)

    def _wait(self, member: _Member, stage: str, value: Deferred[Any], started: float) -> Deferred[Any]:
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
            self._latency(member, stage, started)
            return self._verdict(member, stage, result)

        def failed(failure: Failure) -> object:
            if cancelled:
                return _CONTINUE  # the chain no longer needs this answer; nothing to report
            self._latency(member, stage, started)
            kind = "timeout" if failure.check(TimeoutError) else "error"
            return self._failed(member, stage, failure, kind)

        verdict: Deferred[Any] = Deferred(cancel)
        value.addTimeout(member.spec.timeout, self._clock)
        value.addCallbacks(done, failed).addBoth(forward)
        return verdict

    def _verdict(self, member: _Member, stage: str, value: object) -> FilterVerdict:
        if value is None:
            return _CONTINUE
        if isinstance(value, FILTER_VERDICTS):
            return self._checked(member, stage, value)
        return self._bad_verdict(member, stage, value)

    def _checked(self, member: _Member, stage: str, verdict: FilterVerdict) -> FilterVerdict:
        """The verdict if it is legal at this stage, else the filter's fallback."""
        kind = _COMMAND_OF.get(stage)
        if kind is not None and not can_answer(kind, type(verdict)):
            return self._bad_verdict(member, stage, verdict)
        if stage in member.no_reply and not isinstance(verdict, Continue):
            self.log.error(
                "[{conn}] filter {filter} answered {verdict!r} from {stage}, which it declared no_reply;"
                " ignored", conn=self.connection_id, filter=member.spec.name, verdict=verdict, stage=stage,
            )
            return _CONTINUE
        return verdict

    def _fallback(self, member: _Member, stage: str) -> tuple[FilterVerdict, str]:
        """What a failed callback answers, and how the log says so."""
        if stage == "end_of_message":
            member.failed = True
        if stage in ("abort", "reset", "close"):
            return _CONTINUE, "carrying on"
        if stage in member.no_reply:
            # The MTA reads no reply here (or the filter promised it only observes): never refuse.
            return _CONTINUE, "continuing, as the callback is declared no_reply"
        return member.spec.fallback, f"using fallback {member.spec.fallback!r}"

    def _bad_verdict(self, member: _Member, stage: str, value: object) -> FilterVerdict:
        fallback, consequence = self._fallback(member, stage)
        self.log.error(
            "[{conn}] filter {filter} returned {value!r} from {stage}, not a verdict legal there; {consequence}",
            conn=self.connection_id, filter=member.spec.name, value=value, stage=stage, consequence=consequence,
        )
        if self._observer is not None:
            self._observer.failure(member.spec.name, stage, "bad-verdict")
        return fallback

    def _failed(self, member: _Member, stage: str, failure: Failure, kind: str) -> FilterVerdict:
        fallback, consequence = self._fallback(member, stage)
        if kind == "timeout":
            self.log.error(
                "[{conn}] filter {filter} timed out after {timeout}s in {stage}; {consequence}",
                conn=self.connection_id, filter=member.spec.name, timeout=member.spec.timeout, stage=stage,
                consequence=consequence,
            )
        else:
            self.log.failure(
                "[{conn}] filter {filter} failed in {stage}; {consequence}",
                failure=failure, level=LogLevel.error, conn=self.connection_id, filter=member.spec.name,
                stage=stage, consequence=consequence,
            )
        if self._observer is not None:
            self._observer.failure(member.spec.name, stage, kind)
        return fallback

    def _latency(self, member: _Member, stage: str, started: float) -> None:
        if self._observer is not None:
            self._observer.latency(member.spec.name, stage, self._clock.seconds() - started)

    def _gather(
        self, targets: list[_Member], results: list[Any], cancelled: set[int] | None = None
    ) -> list[FilterVerdict] | Deferred[Any]:
        """Verdicts in filter order up to the first refusal that counts; later work is cancelled.

        The indices of filters whose work was cancelled that way are added to ``cancelled``.
        """
        if not any(isinstance(result, Deferred) for result in results):
            for index, verdict in enumerate(results):  # every filter answered at once: no bookkeeping
                if _decides(targets[index], verdict):
                    return results[: index + 1]
            return results
        settled: list[FilterVerdict] = []
        deferreds: dict[int, Deferred[Any]] = {}
        unfinished = cancelled if cancelled is not None else set()
        state: dict[str, Any] = {"outer": None, "running": False, "stopped": False}

        def store(verdict: FilterVerdict, index: int) -> None:
            results[index] = verdict
            outer = state["outer"]
            if outer is None or outer.called or state["running"] or state["stopped"]:
                return
            if advance():
                outer.callback(settled)

        def advance() -> bool:
            state["running"] = True
            try:
                while len(settled) < len(results):
                    index = len(settled)
                    verdict = results[index]
                    if verdict is _PENDING:
                        return False
                    settled.append(verdict)
                    if _decides(targets[index], verdict):
                        for later, deferred in deferreds.items():
                            if later > index and results[later] is _PENDING:
                                unfinished.add(later)
                                deferred.cancel()
                        return True
                return True
            finally:
                state["running"] = False

        for index, result in enumerate(results):
            if isinstance(result, Deferred):
                deferreds[index] = result
                results[index] = _PENDING
                result.addCallback(store, index)
        if advance():
            return settled

        def cancel(_: Deferred[Any]) -> None:
            # Cancelled from outside (the connection is gone): no verdict is wanted any more.
            state["stopped"] = True
            for index, deferred in deferreds.items():
                if results[index] is _PENDING:
                    deferred.cancel()

        outer: Deferred[Any] = Deferred(cancel)
        state["outer"] = outer
        return outer

    def _decide(self, command: Command, targets: list[_Member], verdicts: list[FilterVerdict]) -> Outcome:
        """Apply the settled verdicts to the filters' state; the MTA's answer."""
        stage = CALLBACKS[type(command)]
        resets: list[Deferred[Any] | None] = []
        for member, verdict in zip(targets, verdicts, strict=False):
            self._count(member, stage, verdict)
            if member.spec.dry_run and not isinstance(verdict, Continue):
                self.log.info(
                    "[{conn}] evaluation: filter {filter} would answer {verdict!r} at {stage}",
                    conn=self.connection_id, filter=member.spec.name, verdict=verdict, stage=stage,
                )
            if isinstance(verdict, Accept):
                if isinstance(command, _CONNECTION_LEVEL):
                    member.retired_for_connection = True
                elif member.in_message:
                    member.retired = True
                    resets.append(self._reset(member))  # the message is over for this filter
                # else: Accept at UNKNOWN between messages means continue (PROTOCOL.md §5.3)
            elif isinstance(verdict, Skip):
                member.skipping = True
        settled = _all_of([d for d in resets if d is not None])
        counted = [(m, v) for m, v in zip(targets, verdicts, strict=False) if not m.spec.dry_run]
        answer = merge_verdicts([v for _, v in counted])  # the first refusal in filter order
        if isinstance(answer, _REFUSALS):
            refuser = next(m for m, v in counted if v is answer)
            if not isinstance(command, _MESSAGE_SURVIVES):
                others = [m for m in self._members if m is not refuser]
                return self._after(_both(settled, self._abort(others)), (answer,))
            return self._after(settled, (answer,))
        if self._all_accepted():
            if not isinstance(command, _CONNECTION_LEVEL):
                settled = _both(settled, self._end_message())
            return self._after(settled, (Accept(),))
        if isinstance(command, BodyChunk) and self._negotiated is not None:
            readers = [m for m in self._members if m.active and BodyChunk in m.receives]
            if readers and all(m.skipping for m in readers) and self._negotiated.protocol & ProtocolFlag.SKIP:
                return self._after(settled, (Skip(),))
        return self._after(settled, (_CONTINUE,))

    def _all_accepted(self) -> bool:
        """Whether every filter that counts (not in evaluation mode) has accepted."""
        counted = False
        for member in self._members:
            if not member.spec.dry_run:
                if not (member.retired or member.retired_for_connection):
                    return False
                counted = True
        return counted

    def _count(self, member: _Member, stage: str, verdict: FilterVerdict) -> None:
        if self._observer is not None:
            self._observer.verdict(member.spec.name, stage, type(verdict).__name__, member.spec.dry_run)

    # -- messages

    def _begin_message(self) -> None:
        self._headers = []
        self._refused_over_limit = False
        for member in self._members:
            member.retired = member.skipping = False
            member.in_message = not member.retired_for_connection
            if member.whole_body:
                member.drop_body()

    def _end_message(self) -> Deferred[Any] | None:
        """The message is over for every filter: reset() those still in it; a Deferred if one is slow."""
        self._headers = []
        pending = []
        for member in self._members:
            reset = self._reset(member)
            if reset is not None:
                pending.append(reset)
            member.retired = member.skipping = False
            if member.whole_body:
                member.drop_body()
        return _all_of(pending)

    def _reset(self, member: _Member) -> Deferred[Any] | None:
        """Call ``reset()`` of a filter whose message just ended (once per message); a Deferred if slow."""
        if not member.in_message:
            return None
        member.in_message = False
        return self._call_quietly(member, "reset")

    def _call_quietly(self, member: _Member, stage: str) -> Deferred[Any] | None:
        """Call a callback whose verdict does not count (abort, reset, close); a Deferred if it is slow."""
        try:
            value = getattr(member.milter, stage)()
        except Exception:
            self._failed(member, stage, Failure(), "error")
            return None
        if inspect.iscoroutine(value):
            value = coroutine_deferred(value)
        if isinstance(value, Deferred):
            return self._quietly(member, stage, value)
        return None

    def _end_of_message(self, command: EndOfMessage, macros: MacroView) -> Outcome:
        if command.data:
            chunk = self._dispatch(BodyChunk(command.data), macros)

            def then(responses: Sequence[Response]) -> Outcome:
                if not responses or isinstance(responses[0], (*_REFUSALS, Accept)):
                    return responses
                return self._final(command, macros)

            if isinstance(chunk, Deferred):
                return chunk.addCallback(then)
            return then(chunk)
        return self._final(command, macros)

    def _final(self, command: EndOfMessage, macros: MacroView) -> Outcome:
        targets = [m for m in self._members if m.active]
        for member in targets:
            member.failed = False
        changes = [
            Changes(m.needs.actions, add_space=m.add_space, on_progress=self._progress_now) for m in targets
        ]
        results: list[Any] = [
            self._end_of_message_of(member, recorder, macros)
            for member, recorder in zip(targets, changes, strict=True)
        ]
        cancelled: set[int] = set()

        def finish(verdicts: list[FilterVerdict]) -> Outcome:
            unfinished = [targets[index] for index in sorted(cancelled)]
            return self._finish(targets, changes, verdicts, unfinished)

        gathered = self._gather(targets, results, cancelled)
        if isinstance(gathered, Deferred):
            self._start_progress()
            gathered.addBoth(self._stop_progress)
            return self._track(gathered.addCallback(finish))
        return finish(gathered)

    def _end_of_message_of(
        self, member: _Member, recorder: Changes, macros: MacroView
    ) -> FilterVerdict | Deferred[Any]:
        """Call one filter's end_of_message, showing a whole_body filter its body first."""
        if member.whole_body:
            if member.body_trouble is not None:
                fallback, _ = self._fallback(member, "end_of_message")
                if self._observer is not None:
                    self._observer.failure(member.spec.name, "end_of_message", "body")
                return fallback
            body: IO[bytes] = member.spool if member.spool is not None else io.BytesIO()
            body.seek(0)
            member.show_body(body)
        return self._invoke(member, "end_of_message", recorder, macros)

    def _finish(
        self, targets: list[_Member], changes: list[Changes], verdicts: list[FilterVerdict], unfinished: list[_Member]
    ) -> Outcome:
        """Merge end-of-message verdicts and changes: changes first, then the verdict.

        A filter whose end_of_message failed gets its fallback verdict, but its changes,
        perhaps half made, are dropped. On a refusal, filters whose end_of_message was
        cancelled for it get abort(); the ones that finished have had their end of message.
        """
        answer: FilterVerdict = _CONTINUE
        contributions = []
        for member, recorder, verdict in zip(targets, changes, verdicts, strict=False):
            self._count(member, "end_of_message", verdict)
            if member.failed:
                recorder = Changes(Action.NONE)
            if member.spec.dry_run:
                if not isinstance(verdict, (Continue, Accept)) or not recorder.empty:
                    self.log.info(
                        "[{conn}] evaluation: filter {filter} would answer {verdict!r} with changes {changes!r}",
                        conn=self.connection_id, filter=member.spec.name, verdict=verdict,
                        changes=_describe(recorder),
                    )
                self._count_changes(member, recorder)
                continue
            if _decides(member, verdict):
                answer = verdict
                break
            if isinstance(verdict, Accept):
                member.retired = True
            contributions.append((member.spec.name, recorder))
            self._count_changes(member, recorder)
        headers, self._headers = self._headers, []
        if isinstance(answer, _REFUSALS):
            return self._after(self._abort(unfinished), (answer,))
        merged = merge_changes(headers, contributions)
        for warning in merged.warnings:
            self.log.warn("[{conn}] {conflict}", conn=self.connection_id, conflict=warning)
        final: FilterVerdict = Accept() if self._all_accepted() else _CONTINUE
        return self._after(self._end_message(), (*merged.modifications, final))

    def _count_changes(self, member: _Member, recorder: Changes) -> None:
        if self._observer is None:
            return
        for kind in _describe(recorder):
            self._observer.change(member.spec.name, kind, member.spec.dry_run)

    def _abort(self, members: Iterable[_Member]) -> Deferred[Any] | None:
        """Tell filters in a message that it is gone; revive the ones retired for it."""
        pending = []
        for member in members:
            if member.in_message and member.active:
                aborted = self._call_quietly(member, "abort")
                if aborted is not None:
                    pending.append(aborted)
        if pending:
            # reset() comes after abort() has settled.
            return gatherResults(pending, consumeErrors=True).addBoth(lambda _: self._end_message())
        return self._end_message()

    def close(self) -> Deferred[Any] | None:
        """Call every filter's ``close`` once; later calls do nothing."""
        if self._closed:
            return None
        self._closed = True
        pending = []
        for member in self._members:
            if member.whole_body:
                member.drop_body()
            if member.closed:
                continue
            member.closed = True
            closed = self._call_quietly(member, "close")
            if closed is not None:
                pending.append(closed)
        return _all_of(pending)

    def connection_lost(self, in_transaction: bool) -> None:
        """The MTA vanished: cancel work in flight, abort an open message, close every filter.

        A Deferred ``handle`` returned for the cancelled work fires with no responses.
        Filters are aborted when the session or the chain counts a message as open: while
        end_of_message is pending the session already counts the message as over.
        """
        if self._in_flight is not None:
            self._in_flight.cancel()
        if in_transaction or any(member.in_message for member in self._members):
            self._abort(self._members)
        self.close()

    def _quietly(self, member: _Member, stage: str, deferred: Deferred[Any]) -> Deferred[Any]:
        deferred.addTimeout(member.spec.timeout, self._clock)

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return  # connection_lost gave up waiting; not the filter's failure
            kind = "timeout" if failure.check(TimeoutError) else "error"
            self._failed(member, stage, failure, kind)

        return deferred.addErrback(failed)

    def _after(self, waiting: Deferred[Any] | None, responses: Sequence[Response]) -> Outcome:
        if waiting is None:
            return responses
        return self._track(waiting.addCallback(lambda _: responses))

    def _track(self, deferred: Deferred[Any]) -> Deferred[Any]:
        self._in_flight = deferred

        def clear(result: object) -> object:
            if self._in_flight is deferred:
                self._in_flight = None
            if isinstance(result, Failure) and result.check(CancelledError):
                return ()  # cancelled by connection_lost: nothing to send
            return result

        return deferred.addBoth(clear)

    # -- progress keep-alives

    def _progress_now(self) -> None:
        if self.send_progress is not None:
            self.send_progress()

    def _start_progress(self) -> None:
        if self.send_progress is None:
            return

        def tick() -> None:
            self._progress_now()
            self._progress_call = self._clock.callLater(self._progress_interval, tick)

        self._progress_call = self._clock.callLater(self._progress_interval, tick)

    def _stop_progress(self, result: object) -> object:
        if self._progress_call is not None and self._progress_call.active():
            self._progress_call.cancel()
        self._progress_call = None
        return result


def _all_of(pending: list[Deferred[Any]]) -> Deferred[Any] | None:
    if not pending:
        return None
    return gatherResults(pending, consumeErrors=True).addErrback(lambda _: None)


def _both(first: Deferred[Any] | None, second: Deferred[Any] | None) -> Deferred[Any] | None:
    """One Deferred for two pieces of work that may each be done already (None)."""
    return _all_of([d for d in (first, second) if d is not None])


def _describe(changes: Changes) -> list[str]:
    kinds = [type(edit).__name__ for edit in changes.edits]
    if changes.sender is not None:
        kinds.append("ChangeFrom")
    if changes.body is not None:
        kinds.append("ReplaceBody")
    if changes.quarantine_reason is not None:
        kinds.append("Quarantine")
    return kinds


def verify_filters(filters: Sequence[FilterSpec | Callable[[], IMilter]]) -> tuple[FilterSpec, ...]:
    """Specs for ``filters``, each factory tried once so configuration errors show before listening."""
    specs = tuple(as_spec(f) for f in filters)
    for spec in specs:
        try:
            milter = spec.factory()
        except Exception as e:
            raise ConfigurationError(f"filter {spec.name} cannot be created: {e}") from e
        if not IMilter.providedBy(milter):
            raise ConfigurationError(f"filter {spec.name} does not provide IMilter; derive it from txmilt.Milter")
        try:
            _filter_requirements(milter)
        except (ValueError, TypeError, LocalProtocolError) as e:
            raise ConfigurationError(f"filter {spec.name} declares something invalid: {e}") from e
        no_reply = getattr(milter, "no_reply", ())
        unknown = sorted(set(no_reply) - set(CALLBACKS.values())) if not isinstance(no_reply, str) else [no_reply]
        if unknown:
            raise ConfigurationError(
                f"filter {spec.name}: no_reply must name callbacks that can go unanswered"
                f" ({', '.join(CALLBACKS.values())}), not {', '.join(map(repr, unknown))}"
            )
    return specs
