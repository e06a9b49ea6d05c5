"""Showing a filter the message as the filters before it left it, as the MTA's own chaining does.

A filter declared ``after_changes`` (and, in sequential order, every filter
after the first) is not given the headers and body as they come: at end of
message, once every filter before it has answered, the chain replays them
from its copy of the message with those filters' changes applied. ``plan``
works out, per lineup and MTA offer, which filters are replayed and what the
chain must ask the MTA for; ``MessageCopy`` keeps the copy and replays it.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from typing import IO, Any, NamedTuple

from twisted.internet.defer import Deferred

from txmilt.errors import NegotiationError
from txmilt.member import CONTENT_EDITS, CONTENT_EVENTS, Lineup, Member
from txmilt.merge import ChangeMerger, Needs, merge_requirements
from txmilt.messages import (
    MAX_BODY_CHUNK,
    Action,
    BodyChunk,
    Connect,
    Continue,
    EndOfHeaders,
    Header,
    MacroStage,
    Negotiate,
    NegotiateReply,
    Skip,
    strip_leading_space,
)
from txmilt.milter import Changes, FilterVerdict
from txmilt.mta import default_macros, union_of_names
from txmilt.session import MacroView, Requirements, negotiate
from txmilt.spool import BodySpool

_HEADER_EDITS = Action.ADD_HEADERS | Action.CHANGE_HEADERS


class Plan(NamedTuple):
    """What the chain negotiates, which filters are replayed, and what of the message it keeps."""

    reply: NegotiateReply
    replayed: frozenset[int]
    keep_headers: bool
    keep_body: bool


def replayed(lineup: Lineup, sequential: bool) -> frozenset[int]:
    """Which filters are shown the content at end of message, edited, rather than as it comes.

    In sequential order every filter after the first; otherwise an ``after_changes``
    filter once some filter before it may change the content. Dry runs see the
    message as the MTA sent it.
    """
    found: set[int] = set()
    editors_before = False
    first = True
    for index, (spec, profile) in enumerate(zip(lineup.specs, lineup.profiles(), strict=True)):
        if spec.dry_run:
            continue
        if (sequential and not first) or (profile.after_changes and editors_before):
            found.add(index)
        first = False
        editors_before = editors_before or bool(profile.requirements.actions & CONTENT_EDITS)
    return frozenset(found)


@functools.lru_cache(maxsize=256)
def plan(lineup: Lineup, offer: Negotiate, sequential: bool) -> Plan:
    """The chain's plan for ``offer``; NegotiationError names a filter the MTA cannot serve.

    Worked out once per lineup and offer (an MTA makes the same offer every time).
    """
    negotiate(offer, Requirements())  # an unusable version is no filter's fault
    profiles = lineup.profiles()
    for spec, profile in zip(lineup.specs, profiles, strict=True):
        try:
            negotiate(offer, profile.requirements)
        except NegotiationError as e:
            raise NegotiationError(f"filter {spec.name}: {e}") from None
    shown_later = replayed(lineup, sequential)
    editors = sum(
        bool(p.requirements.actions & _HEADER_EDITS) for s, p in zip(lineup.specs, profiles, strict=True)
        if not s.dry_run
    )
    keep_body = bool(shown_later)
    keep_headers = keep_body or editors > 1  # to replay the headers, or to rebase header indices
    needs: list[Needs] = []
    for index, profile in enumerate(profiles):
        if index in shown_later:
            # Its content comes from the chain's copy: the MTA need not wait for it live.
            live = profile.needs.receives - CONTENT_EVENTS
            needs.append(Needs(profile.requirements, live, profile.needs.silent & live))
        else:
            needs.append(profile.needs)
    whens = [spec.conditions for spec in lineup.specs if spec.conditions is not None]
    observe = (
        ((Header,) if keep_headers else ()) + ((BodyChunk,) if keep_body else ())
        + ((Connect,) if any(when.connection_level for when in whens) else ())
    )
    if any(when.authenticated is not None for when in whens):
        # Whether the client authenticated is {auth_authen} at MAIL (in both MTAs' default lists).
        needs.append(Needs(Requirements(macros={MacroStage.MAIL: ("{auth_authen}",)}), frozenset(), frozenset()))
    merged = merge_requirements(needs, observe=observe, offer=offer)
    if keep_headers or (sequential and merged.actions & Action.QUARANTINE):
        # Postfix and Sendmail place added headers, and end a quarantined message's milter pass,
        # differently; the ``v`` macro tells them apart (Sendmail does not send it by default).
        connect = merged.macros.get(MacroStage.CONNECT) or default_macros(offer).get(MacroStage.CONNECT, ())
        macros = {**merged.macros, MacroStage.CONNECT: union_of_names(connect, ("v",))}
        merged = Requirements(merged.actions, merged.protocol, merged.optional, macros)
    return Plan(negotiate(offer, merged), shown_later, keep_headers, keep_body)


class MessageCopy:
    """The chain's copy of the current message, kept where a plan needs it: headers, then the body."""

    __slots__ = ("_body", "_keep_body", "_keep_headers", "_max_size", "_threshold", "headers")

    def __init__(self, threshold: int, max_size: int) -> None:
        self._threshold, self._max_size = threshold, max_size
        self._keep_headers = self._keep_body = False
        #: The headers as the MTA sent them (name, value as on the wire).
        self.headers: list[tuple[str, str]] = []
        self._body: BodySpool | None = None

    def keep(self, headers: bool, body: bool) -> None:
        """Keep the headers, the body, both or neither of the messages to come."""
        self._keep_headers, self._keep_body = headers, body

    def begin(self) -> None:
        """A message starts: forget the last one."""
        self.close()
        if self._keep_body:
            self._body = BodySpool(self._threshold, self._max_size)

    def header(self, name: str, value: str) -> None:
        """Keep one header (if headers are kept)."""
        if self._keep_headers:
            self.headers.append((name, value))

    def body(self, data: bytes) -> None:
        """Keep one body chunk (if the body is kept)."""
        if self._body is not None:
            self._body.write(data)

    def close(self) -> None:
        """Forget the message (a spooled body is deleted)."""
        self.headers = []
        if self._body is not None:
            self._body.close()
            self._body = None

    def body_chunks(self, merger: ChangeMerger) -> tuple[Iterable[bytes], str | None]:
        """The body as the earlier filters left it, in chunks; or why it cannot be shown."""
        if merger.body is not None:
            body = merger.body
            return (body[i:i + MAX_BODY_CHUNK] for i in range(0, len(body), MAX_BODY_CHUNK)), None
        if self._body is None:
            return (), None
        if self._body.trouble is not None:
            return (), self._body.trouble
        return self._body.chunks(MAX_BODY_CHUNK), None

    def body_file(self, merger: ChangeMerger) -> IO[bytes]:
        """The body as the earlier filters left it, as a file at its start."""
        if merger.body is not None:
            return io.BytesIO(merger.body)
        return self._body.file() if self._body is not None else io.BytesIO()

    def replay(
        self, member: Member, recorder: Changes, merger: ChangeMerger, macros: MacroView
    ) -> Deferred[FilterVerdict]:
        """Show ``member`` the content as the filters merged so far left it, then call its end of message.

        Its first answer other than Continue (Skip only stops the body) is its
        verdict for the message; otherwise its end_of_message answers.
        """
        return Deferred.fromCoroutine(self._replay(member, recorder, merger, macros))

    async def _replay(
        self, member: Member, recorder: Changes, merger: ChangeMerger, macros: MacroView
    ) -> FilterVerdict:
        receives = member.profile.needs.receives
        if Header in receives:
            for name, value in merger.headers():
                shown = strip_leading_space(value) if member.strip_space else value
                verdict = await _settled(member.call("header", Header(name, shown), macros))
                if not isinstance(verdict, Continue):
                    return verdict
        if EndOfHeaders in receives:
            verdict = await _settled(member.call("end_of_headers", EndOfHeaders(), macros))
            if not isinstance(verdict, Continue):
                return verdict
        chunks, trouble = self.body_chunks(merger)
        if trouble is not None:
            member.context.log.error(
                "[{conn}] filter {filter}: {trouble}, so it cannot be shown the edited message; it gets its"
                " fallback {fallback!r}", conn=member.context.connection_id, filter=member.name, trouble=trouble,
                fallback=member.spec.fallback,
            )
            return member.fallback("end_of_message")[0]
        if member.profile.calls_body:
            for chunk in chunks:
                verdict = await _settled(member.call("body", BodyChunk(chunk), macros))
                if isinstance(verdict, Skip):
                    break
                if not isinstance(verdict, Continue):
                    return verdict
        if member.profile.whole_body:
            member.show_body(self.body_file(merger))
        return await _settled(member.call("end_of_message", recorder, macros))


async def _settled(outcome: FilterVerdict | Deferred[Any]) -> FilterVerdict:
    """The verdict of a call, waiting for it if it is pending."""
    if isinstance(outcome, Deferred):
        return await outcome  # type: ignore[no-any-return]
    return outcome
