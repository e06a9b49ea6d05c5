"""The chain: several filters on one MTA connection, answering as one milter.

Two orders (DESIGN.md, chain rules). ``concurrent``: each command goes to every
filter still active for it, all at once, and the answers are read in filter
order; the first refusal answers. ``sequential``: each command goes to the
filters one after another and stops at the first refusal, exactly as the MTA
walks ``smtpd_milters``. In either order a filter that must see the message as
the filters before it left it (``after_changes``, and every filter after the
first in sequential order) is shown the content at end of message, replayed
from the chain's copy with the earlier filters' changes applied.

When a message starts and ends is the session's to say (``states.CLOSES``);
the chain only reacts: MAIL starts one, ABORT and the replies that close it
end it. The pure merges live in ``txmilt.merge``, calling one filter safely in
``txmilt.member``, settling answers in order in ``txmilt.order``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeAlias

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmilt.errors import ConfigurationError
from txmilt.interfaces import IMilter
from txmilt.member import (
    ChainObserver,
    Context,
    FilterSpec,
    Lineup,
    Member,
    as_spec,
    verify_filters,
)
from txmilt.merge import REFUSALS, ChangeMerger, describe, merge_verdicts
from txmilt.messages import (
    Abort,
    Accept,
    BodyChunk,
    Command,
    Connect,
    Continue,
    EndOfHeaders,
    EndOfMessage,
    Header,
    MailFrom,
    Negotiate,
    NegotiateReply,
    ProtocolFlag,
    Quit,
    QuitNoClose,
    RcptTo,
    Response,
    Skip,
    TempFail,
)
from txmilt.milter import CALLBACKS, Changes, FilterVerdict
from txmilt.mta import MTA, mta_of_version
from txmilt.order import Keepalive, Later, Walked, all_of, both, walk
from txmilt.replay import MessageCopy, plan
from txmilt.session import Disconnected, LimitExceeded, MacroView, Scope, closes
from txmilt.spool import DEFAULT_BODY_SPOOL_THRESHOLD, DEFAULT_MAX_BODY_SIZE

__all__ = [
    "CHAIN_ORDERS",
    "DEFAULT_BODY_SPOOL_THRESHOLD",
    "DEFAULT_MAX_BODY_SIZE",
    "OVER_LIMIT_REPLIES",
    "Chain",
    "ChainObserver",
    "FilterSpec",
    "Lineup",
    "Outcome",
    "as_spec",
    "check_chain_order",
    "verify_filters",
]

#: What the chain hands back for one command: the packets to send, now or later.
Outcome: TypeAlias = "Sequence[Response] | Deferred[Sequence[Response]]"

#: The orders a chain can run its filters in.
CHAIN_ORDERS = ("concurrent", "sequential")
#: The verdicts that let a message go on.
_GOES_ON = (Continue, Accept)


def check_chain_order(value: str, label: str = "chain_order") -> None:
    """ConfigurationError unless ``value`` is one of CHAIN_ORDERS."""
    if value not in CHAIN_ORDERS:
        raise ConfigurationError(f"{label} must be one of {', '.join(CHAIN_ORDERS)}, not {value!r}")

#: The answer to a message over a per-message limit, by what was counted.
OVER_LIMIT_REPLIES = {
    "headers": TempFail("Message has too many headers", code=452, status="4.3.1"),
    "header bytes": TempFail("Message header section is too large", code=452, status="4.3.1"),
}

_CONTINUE = Continue()
#: What the members log under (one Logger for all: ``self.log`` would make one per connection).
_MEMBERS_LOG = Logger(namespace="txmilt.chain.Chain")
_CONTINUES: tuple[Response, ...] = (_CONTINUE,)
_CONTENT = frozenset({Header, EndOfHeaders, BodyChunk, EndOfMessage})
_SESSION_ENDS = frozenset({Quit, Disconnected, QuitNoClose})


class SessionState(Protocol):
    """What the chain reads of the session for each command (``MilterSession`` provides it)."""

    @property
    def macros(self) -> MacroView:
        """The macro values visible now."""

    @property
    def over_limit(self) -> LimitExceeded | None:
        """Whether the current message went over a per-message limit."""

    @property
    def in_transaction(self) -> bool:
        """Whether a message is open."""


# ------------------------------------------------------------------ the chain


class Chain:
    """Fans each MTA command out to the filters of one connection and merges their answers."""

    __slots__ = (
        "_closed", "_conditional", "_context", "_copy", "_in_flight", "_lineup", "_members",
        "_offer", "_progress_interval", "_refused_over_limit", "_sequential",
        "_skip_allowed", "send_progress",
    )

    log = Logger()

    def __init__(
        self,
        filters: Lineup | Sequence[FilterSpec | Callable[[], IMilter]],
        clock: IReactorTime,
        *,
        connection_id: str = "-",
        progress_interval: float = 10.0,
        send_progress: Callable[[], None] | None = None,
        observer: ChainObserver | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        body_spool_threshold: int = DEFAULT_BODY_SPOOL_THRESHOLD,
        chain_order: str = "concurrent",
    ) -> None:
        check_chain_order(chain_order)
        self._lineup = filters if isinstance(filters, Lineup) else Lineup(filters)
        self._sequential = chain_order == "sequential"
        self._context = Context(clock, connection_id, observer, _MEMBERS_LOG, body_spool_threshold, max_body_size)
        self._progress_interval = progress_interval
        self.send_progress = send_progress
        self._members = self._make_members()
        self._conditional = any(spec.conditions is not None for spec in self._lineup.specs)
        self._offer: Negotiate | None = None
        self._copy = MessageCopy(body_spool_threshold, max_body_size)
        self._skip_allowed = False  # SKIP negotiated, and no copy of the body needed
        self._in_flight: Deferred[Any] | None = None
        self._closed = False
        self._refused_over_limit = False

    @property
    def connection_id(self) -> str:
        """The connection's id, as logs show it."""
        return self._context.connection_id

    def _make_members(self) -> list[Member]:
        return [Member(self._lineup, index, self._context) for index in range(len(self._lineup.specs))]

    # -- negotiation

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        """The chain's OPTNEG reply; NegotiationError names a filter the MTA cannot serve."""
        reply, shown_later, keep_headers, keep_body = plan(self._lineup, offer, self._sequential)
        self._copy.keep(keep_headers, keep_body)
        self._skip_allowed = bool(reply.protocol & ProtocolFlag.SKIP) and not keep_body
        for index, member in enumerate(self._members):
            member.replayed = index in shown_later
        self._offer = offer
        # Leading space per filter; a filter with ``negotiated(offer, reply)`` learns both (RemoteMilter
        # offers its peer the same version).
        leading = bool(reply.protocol & ProtocolFlag.HEADER_LEADING_SPACE)
        for member in self._members:
            wants = bool(member.profile.requirements.protocol & ProtocolFlag.HEADER_LEADING_SPACE)
            member.strip_space = member.add_space = leading and not wants
            hook = getattr(member.milter, "negotiated", None)
            if callable(hook):
                hook(offer, reply)
        return reply

    # -- dispatch

    def handle(self, command: Command | Disconnected, session: SessionState) -> Outcome:
        """Run ``command`` through the chain; the responses to send (empty for none).

        A message over a per-message limit (``session.over_limit``) no longer
        reaches the filters: its content is answered TempFail.
        """
        kind = type(command)
        if kind in _CONTENT and session.over_limit is not None:
            return self._over_limit(session.over_limit)
        if kind is Abort:
            return self._after(self._end_message(self._members), ())
        if kind in _SESSION_ENDS:
            return self._session_end(command)
        if kind is MailFrom:
            self._begin_message(command, session)  # type: ignore[arg-type]
        elif kind is Header:
            self._copy.header(command.name, command.value)  # type: ignore[union-attr]
        elif kind is BodyChunk:
            self._copy.body(command.data)  # type: ignore[union-attr]
        elif kind is EndOfMessage:
            return self._end_of_message(command, session)  # type: ignore[arg-type]
        elif kind is Connect and self._conditional:
            self._check_connection(command)  # type: ignore[arg-type]
        return self._dispatch(command, session)  # type: ignore[arg-type]

    def _session_end(self, command: Command | Disconnected) -> Outcome:
        outcome = self._after(self.close(), ())
        if isinstance(command, QuitNoClose):
            self._members = self._make_members()
            self._closed = False
            if self._offer is not None:
                self.negotiate(self._offer)
        return outcome

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
        return self._after(self._end_message(self._members), (answer,))

    def _dispatch(self, command: Command, session: SessionState) -> Outcome:
        kind = type(command)
        stage = CALLBACKS[kind]
        macros = session.macros
        rejected = kind is RcptTo and macros.get("rcpt_mailer") == "error"
        targets: list[Member] = []
        results: list[Any] = []
        sequential = self._sequential
        continued = True  # every filter called answered Continue at once
        for member in self._members:
            if member.spec.dry_run:
                member.enqueue(functools.partial(
                    self._dry_call, member, command, macros, rejected, session.in_transaction
                ))
                continue
            argument = member.argument(command, rejected)
            if argument is None:
                continue
            targets.append(member)
            if sequential and targets[0] is not member:
                results.append(Later(functools.partial(member.call, stage, argument, macros)))
                continued = False
            else:
                result = member.call(stage, argument, macros)
                continued = continued and type(result) is Continue
                results.append(result)
        if continued and targets:
            # What _decide answers when every filter called continued: no filter retires or skips,
            # some filter is still active (so not all accepted), and some body reader is not skipping.
            if self._context.observer is not None:
                for member in targets:
                    member.count(stage, _CONTINUE)
            return _CONTINUES
        walked = walk(results, lambda _, verdict: isinstance(verdict, REFUSALS))
        if isinstance(walked, Deferred):
            return self._track(walked.addCallback(lambda w: self._decide(command, session, targets, w)))
        return self._decide(command, session, targets, walked)

    def _decide(self, command: Command, session: SessionState, targets: list[Member], walked: Walked) -> Outcome:
        """Apply the settled verdicts to the filters' state; the MTA's answer."""
        kind = type(command)
        stage = CALLBACKS[kind]
        message_open = session.in_transaction
        resets: list[Deferred[Any] | None] = []
        verdicts = walked.verdicts
        for member, verdict in zip(targets, verdicts, strict=False):
            member.count(stage, verdict)
            if isinstance(verdict, Accept):
                resets.append(self._retire(member, kind, message_open))
            elif isinstance(verdict, Skip):
                member.skipping = True
        settled = all_of(resets)
        answer = merge_verdicts(verdicts)  # the first refusal in filter order
        if isinstance(answer, REFUSALS):
            if message_open and closes(kind, type(answer)) is Scope.MESSAGE:
                refuser = targets[len(verdicts) - 1]
                others = [m for m in self._members if m is not refuser]
                return self._after(both(settled, self._end_message(others)), (answer,))
            return self._after(settled, (answer,))
        if self._all_accepted():
            if any(m.spec.dry_run for m in self._members):
                return self._after(settled, (_CONTINUE,))  # dry runs go on seeing the message
            if message_open and closes(kind, Accept) is Scope.MESSAGE:
                settled = both(settled, self._end_message(()))
            return self._after(settled, (Accept(),))
        if kind is BodyChunk and self._skip_allowed:
            readers = [m for m in self._members if m.active and BodyChunk in m.profile.needs.receives]
            if readers and all(m.skipping for m in readers):
                return self._after(settled, (Skip(),))
        return self._after(settled, (_CONTINUE,))

    def _retire(self, member: Member, kind: type, message_open: bool) -> Deferred[Any] | None:
        """A filter accepted: it sees no more of the connection, or of the message (which ends for it)."""
        scope = closes(kind, Accept)
        if scope is Scope.CONNECTION:
            member.retired_for_connection = True
        elif scope is Scope.MESSAGE and message_open:
            member.retired = True
            return member.call_quietly("reset")  # a dry run's queue is running this already
        return None  # Accept at UNKNOWN between messages means continue (PROTOCOL.md §5.3)

    def _all_accepted(self) -> bool:
        """Whether every filter that counts (not in evaluation mode) has accepted."""
        counted = False
        for member in self._members:
            if not member.spec.dry_run:
                if member.active:
                    return False
                counted = True
        return counted

    # -- dry runs: evaluated, never waited for

    def _dry_call(
        self, member: Member, command: Command, macros: MacroView, rejected: bool, message_open: bool
    ) -> object:
        """Give a dry-run filter a command (in its own time); log and count what it would have answered."""
        argument = member.argument(command, rejected)
        if argument is None:
            return None
        stage = CALLBACKS[type(command)]

        def judged(verdict: FilterVerdict) -> None:
            member.count(stage, verdict)
            if isinstance(verdict, Accept):
                self._retire(member, type(command), message_open)
            elif isinstance(verdict, Skip):
                member.skipping = True
            elif not isinstance(verdict, Continue):
                self.log.info(
                    "[{conn}] evaluation: filter {filter} would answer {verdict!r} at {stage}",
                    conn=self.connection_id, filter=member.name, verdict=verdict, stage=stage,
                )

        outcome = member.call(stage, argument, macros)
        if isinstance(outcome, Deferred):
            return outcome.addCallback(judged)
        judged(outcome)
        return None

    def _quiet(self, member: Member, stage: str) -> Deferred[Any] | None:
        """Call abort or reset if the filter is still in the message; a dry-run filter after its earlier work."""
        if member.spec.dry_run:
            member.enqueue(lambda: member.call_quietly(stage) if member.active else None)
            return None
        return member.call_quietly(stage) if member.active else None

    # -- messages

    def _begin_message(self, command: MailFrom, session: SessionState) -> None:
        self._refused_over_limit = False
        self._copy.begin()
        for member in self._members:
            when = member.spec.conditions
            reason = None
            if when is not None and when.message_level and member.active:
                reason = when.message_fails(session.macros.get("{auth_authen}"), command.address)
                if reason is not None:
                    member.skip(reason)
            if member.spec.dry_run:
                member.enqueue(functools.partial(_new_message, member, reason is not None))
            else:
                _new_message(member, reason is not None)

    def _check_connection(self, command: Connect) -> None:
        """Leave filters whose ``when`` rules the SMTP client out of this connection, as if they had accepted."""
        for member in self._members:
            when = member.spec.conditions
            if when is not None and not member.retired_for_connection:
                reason = when.connection_fails(command)
                if reason is not None:
                    member.retired_for_connection = True
                    member.skip(reason)

    def _end_message(self, aborted: Iterable[Member]) -> Deferred[Any] | None:
        """The message is over: ``abort()`` for ``aborted`` filters still in it, then ``reset()`` for all of them.

        Filters that accepted the message were reset then; the result is a
        Deferred when some filter is slow to abort or reset.
        """
        pending = [d for d in (self._quiet(m, "abort") for m in aborted) if d is not None]
        if pending:
            # reset() comes after abort() has settled.
            return gatherResults(pending, consumeErrors=True).addBoth(lambda _: self._reset_all())
        return self._reset_all()

    def _reset_all(self) -> Deferred[Any] | None:
        pending = []
        for member in self._members:
            reset = self._quiet(member, "reset")
            if reset is not None:
                pending.append(reset)
            if member.spec.dry_run:
                member.enqueue(functools.partial(_new_message, member))
            else:
                _new_message(member)
        self._copy.close()
        return all_of(pending)

    def _end_of_message(self, command: EndOfMessage, session: SessionState) -> Outcome:
        if command.data:
            # Not sent by Postfix or Sendmail: body bytes on end of message are one more chunk.
            self._copy.body(command.data)
            chunk = self._dispatch(BodyChunk(command.data), session)

            def then(responses: Sequence[Response]) -> Outcome:
                if not responses or isinstance(responses[0], (*REFUSALS, Accept)):
                    return responses
                return self._final(session)

            if isinstance(chunk, Deferred):
                return chunk.addCallback(then)
            return then(chunk)
        return self._final(session)

    def _final(self, session: SessionState) -> Outcome:
        macros = session.macros
        mta = mta_of_version(macros.get("v"))
        merger = ChangeMerger(self._copy.headers, mta)
        targets: list[Member] = []
        recorders: list[Changes] = []
        results: list[Any] = []
        for member in self._members:
            recorder = Changes(
                member.profile.requirements.actions, add_space=member.add_space, on_progress=self._progress_now
            )
            if member.spec.dry_run:
                self._dry_end(member, recorder, macros)
                continue
            if not member.active:
                continue
            member.failed = False
            targets.append(member)
            recorders.append(recorder)
            if member.replayed:
                results.append(Later(functools.partial(self._copy.replay, member, recorder, merger, macros)))
            else:
                results.append(member.end_of_message(recorder, macros))
        # Postfix ends the milters' pass at the first that quarantines, Sendmail goes on.
        stop_on_quarantine = self._sequential and mta is not MTA.SENDMAIL

        def settled(index: int, verdict: FilterVerdict) -> bool:
            member, recorder = targets[index], recorders[index]
            member.count("end_of_message", verdict)
            if isinstance(verdict, REFUSALS):
                return True
            if not member.failed and isinstance(verdict, _GOES_ON):
                merger.add(member.name, recorder, saw_edits=member.replayed)
                member.count_changes(recorder)
            # Postfix ends a quarantined message's milter pass; Sendmail goes on to the next milter.
            return stop_on_quarantine and merger.quarantined is not None

        walked = walk(results, settled)
        if isinstance(walked, Deferred):
            keepalive = Keepalive(self._context.clock, self._progress_interval, self._progress_now)
            walked.addBoth(keepalive.stop)
            return self._track(walked.addCallback(self._finish, targets, merger))
        return self._finish(walked, targets, merger)

    def _finish(self, walked: Walked, targets: list[Member], merger: ChangeMerger) -> Outcome:
        """The MTA's answer at end of message: the merged changes first, then the verdict.

        A filter whose end_of_message failed gets its fallback verdict, but its changes,
        perhaps half made, are dropped. On a refusal no changes are sent; the filters
        whose end of message did not finish get abort(), the others only reset().
        """
        unfinished = [targets[index] for index in walked.unfinished]
        answer = merge_verdicts(walked.verdicts)
        if isinstance(answer, REFUSALS):
            return self._after(self._end_message(unfinished), (answer,))
        merged = merger.result()
        for warning in merged.warnings:
            self.log.warn("[{conn}] {conflict}", conn=self.connection_id, conflict=warning)
        # Accept only when every filter that counts accepted, now or earlier in the message.
        accepted = (
            any(not m.spec.dry_run for m in self._members) and not unfinished
            and len(walked.verdicts) == len(targets) and all(isinstance(v, Accept) for v in walked.verdicts)
        )
        final = Accept() if accepted else _CONTINUE
        return self._after(self._end_message(unfinished), (*merged.modifications, final))

    def _dry_end(self, member: Member, recorder: Changes, macros: MacroView) -> None:
        """A dry-run filter's end of message: its verdict and changes are logged and counted, never sent."""

        def run() -> object:
            if not member.active:
                return None
            member.failed = False
            outcome = member.end_of_message(recorder, macros)
            if isinstance(outcome, Deferred):
                return outcome.addCallback(judged)
            judged(outcome)
            return None

        def judged(verdict: FilterVerdict) -> None:
            member.count("end_of_message", verdict)
            if member.failed:
                return
            if not isinstance(verdict, _GOES_ON) or not recorder.empty:
                self.log.info(
                    "[{conn}] evaluation: filter {filter} would answer {verdict!r} with changes {changes!r}",
                    conn=self.connection_id, filter=member.name, verdict=verdict, changes=describe(recorder),
                )
            member.count_changes(recorder)

        member.enqueue(run)

    # -- the end of the session

    def close(self) -> Deferred[Any] | None:
        """Call every filter's ``close`` once; later calls do nothing."""
        if self._closed:
            return None
        self._closed = True
        pending = []
        for member in self._members:
            if member.profile.whole_body:
                member.drop_body()
            if member.closed:
                continue
            member.closed = True
            member.stop_queue()
            closed = member.call_quietly("close")
            if closed is not None:
                pending.append(closed)
        self._copy.close()
        return all_of(pending)

    def connection_lost(self, in_transaction: bool) -> None:
        """The MTA vanished: cancel work in flight, abort an open message, close every filter.

        A Deferred ``handle`` returned for the cancelled work fires with no responses.
        """
        if self._in_flight is not None:
            self._in_flight.cancel()
        if in_transaction:
            self._end_message(self._members)
        self.close()

    def _progress_now(self) -> None:
        """Tell the MTA the chain is still working (while it is connected)."""
        if self.send_progress is not None:
            self.send_progress()

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

def _new_message(member: Member, left_out: bool = False) -> None:
    """Clear what a filter's state says about the last message; ``left_out`` of the next one by its ``when``."""
    member.retired, member.skipping = left_out, False
    if member.profile.whole_body:
        member.drop_body()
