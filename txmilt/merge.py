"""The chain's pure merges: what to negotiate, which verdict answers, and the changes to send.

No Twisted here: each function takes plain data, so the rules of DESIGN.md's
chain (1, 3 and 5) can be tested exhaustively on their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from txmilt.messages import (
    Accept,
    Action,
    AddHeader,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Continue,
    Discard,
    InsertHeader,
    MacroStage,
    Modification,
    Negotiate,
    ProtocolFlag,
    Quarantine,
    Reject,
    Skip,
    TempFail,
    split_body,
)
from txmilt.mta import MTA, default_macros, union_of_names, where_added
from txmilt.session import NO_FLAG, NO_REPLY_FLAG, TRACKING_EVENTS, Requirements

#: A verdict a filter may give.
Verdict: TypeAlias = Continue | Accept | Reject | TempFail | Discard | Skip
#: The verdicts that answer the MTA for the whole chain.
REFUSALS = (Reject, TempFail, Discard)

_CONTINUE = Continue()


# ------------------------------------------------------------------ verdicts


def merge_verdicts(verdicts: Sequence[Verdict]) -> Verdict:
    """The first refusal in chain order, else Continue (Accept and Skip are per filter)."""
    for verdict in verdicts:
        if isinstance(verdict, REFUSALS):
            return verdict
    return _CONTINUE


# -------------------------------------------------------------- requirements


@dataclass(frozen=True)
class Needs:
    """What one filter declares: its requirements, the commands it receives, and those it answers silently."""

    requirements: Requirements
    receives: frozenset[type]
    silent: frozenset[type]


def merge_requirements(
    members: Sequence[Needs | tuple[Requirements, frozenset[type], frozenset[type]]],
    observe: Iterable[type] = (),
    offer: Negotiate | None = None,
) -> Requirements:
    """The chain's needs: unions of actions and macros, events off only if nobody needs them.

    A no-reply flag is asked for only when every filter receiving that command
    answers it without reply; ``observe`` lists commands the chain itself reads.
    With the MTA's ``offer``, every stage for which macros are asked also asks for
    the MTA's default list, which a requested list replaces: a filter that asks
    for nothing keeps what it would get alone.
    """
    needs = [m if isinstance(m, Needs) else Needs(*m) for m in members]
    actions, protocol = Action.NONE, ProtocolFlag.NONE
    macros: dict[MacroStage, tuple[str, ...]] = {}
    for member in needs:
        actions |= member.requirements.actions
        protocol |= member.requirements.protocol
        for stage, names in member.requirements.macros.items():
            macros[stage] = union_of_names(macros.get(stage, ()), names)
    optional = ProtocolFlag.NONE
    watched = set(observe)
    for command, no_flag in NO_FLAG.items():
        receivers = [m for m in needs if command in m.receives]
        if not receivers and command not in watched:
            optional |= no_flag
        sent = receivers or command in watched or no_flag & TRACKING_EVENTS
        if sent and all(command in m.silent for m in receivers):
            optional |= NO_REPLY_FLAG[command]
    if any(BodyChunk in m.receives for m in needs):
        optional |= ProtocolFlag.SKIP
    if offer is not None:
        defaults = default_macros(offer)
        macros = {stage: union_of_names(names, defaults.get(stage, ())) for stage, names in macros.items()}
    rcpt = macros.get(MacroStage.RCPT)
    if protocol & ProtocolFlag.RCPT_REJECTED and rcpt is not None:
        # The chain tells rejected recipients apart by {rcpt_mailer}; an explicit list replaces the
        # MTA's default one, which has it.
        macros[MacroStage.RCPT] = union_of_names(rcpt, ("{rcpt_mailer}",))
    return Requirements(actions, protocol, optional, macros)


# ------------------------------------------------------------------- changes


class ChangeSet(Protocol):
    """One filter's recorded end-of-message changes (``txmilt.Changes`` is one)."""

    @property
    def edits(self) -> Sequence[Modification]:
        """Header and recipient changes, in call order."""

    @property
    def sender(self) -> ChangeFrom | None:
        """The new envelope sender, if changed."""

    @property
    def body(self) -> bytes | None:
        """The replacement body, if replaced."""

    @property
    def quarantine_reason(self) -> str | None:
        """The quarantine reason, if quarantined."""


class _Entry:
    """One header in the simulated MTA header list; compared by identity."""

    __slots__ = ("key", "name", "value")

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value
        self.key = name.lower()


@dataclass
class MergedChanges:
    """The packets to send at end of message, and warnings about conflicts."""

    modifications: list[Modification] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class ChangeMerger:
    """Applies filters' changes in chain order to a model of the MTA's header list.

    Each filter's changes are expressed against the message it saw: the original
    (its header indices are rebased, so one filter's insert or delete does not
    shift what a later filter meant), or, with ``saw_edits``, the message as the
    filters before it left it (``headers()`` at that point). Where two filters
    change the same single thing (a header, the sender, the body, the quarantine
    reason) without the later having seen it, the later wins and a warning names
    both. A change of a header an earlier filter deleted is dropped with a warning.
    """

    def __init__(self, headers: Sequence[tuple[str, str]], mta: MTA | None = None) -> None:
        #: Whose rules place an added header in the model (Postfix's when None).
        self.mta = mta
        hidden = _Entry("", "")  # the MTA's own Received: header, position 0; its key matches no name
        self._original = [hidden, *(_Entry(name, value) for name, value in headers)]
        self._current = list(self._original)  # the MTA's list as the modifications so far leave it
        self._live = set(self._current)
        self._number = 0  # contributions merged so far: filters may share a name
        self._touched: dict[_Entry, tuple[int, str]] = {}
        self._deleted: dict[_Entry, str] = {}
        self._single: dict[str, tuple[int, str]] = {}
        self._edits: list[Modification] = []
        self.warnings: list[str] = []
        #: The new sender so far, if changed.
        self.sender: ChangeFrom | None = None
        #: The replacement body so far, if replaced.
        self.body: bytes | None = None
        #: The quarantine reason so far, if quarantined.
        self.quarantined: str | None = None

    def headers(self) -> list[tuple[str, str]]:
        """The visible headers as the changes merged so far leave them (values as the filters gave them)."""
        return [(entry.name, entry.value) for entry in self._current[1:]]

    def add(self, name: str, changes: ChangeSet, *, saw_edits: bool = False) -> None:
        """Merge the changes of the next filter in chain order, called ``name``."""
        self._number += 1
        me = (self._number, name)
        view = list(self._current if saw_edits else self._original)
        for edit in changes.edits:
            if isinstance(edit, InsertHeader):
                self._insert(view, edit)
            elif isinstance(edit, ChangeHeader):
                self._change(view, edit, me, saw_edits)
            else:
                if isinstance(edit, AddHeader):
                    self._append(view, edit.name, edit.value)
                self._edits.append(edit)
        for what, value in (("sender", changes.sender), ("body", changes.body),
                            ("quarantine reason", changes.quarantine_reason)):
            if value is None:
                continue
            if what in self._single and not saw_edits:
                self.warnings.append(
                    f"filters {self._single[what][1]} and {name} both change the {what}; {name} wins"
                )
            self._single[what] = me
        if changes.sender is not None:
            self.sender = changes.sender
        if changes.body is not None:
            self.body = changes.body
        if changes.quarantine_reason is not None:
            self.quarantined = changes.quarantine_reason

    def result(self) -> MergedChanges:
        """The modifications to send, in order: header and recipient edits, sender, body, quarantine."""
        modifications = list(self._edits)
        if self.sender is not None:
            modifications.append(self.sender)
        if self.body is not None:
            modifications.extend(split_body(self.body))
        if self.quarantined is not None:
            modifications.append(Quarantine(self.quarantined))
        return MergedChanges(modifications, list(self.warnings))

    # -- header edits

    def _append(self, view: list[_Entry], name: str, value: str) -> None:
        """A header added by name: where the MTA puts it, in the filter's view and in the MTA's list."""
        entry = _Entry(name, value)
        view.insert(where_added([e.key for e in view], name, self.mta), entry)
        current = self._current
        current.insert(where_added([e.key for e in current], name, self.mta), entry)
        self._live.add(entry)

    def _insert(self, view: list[_Entry], edit: InsertHeader) -> None:
        current = self._current
        at = min(edit.index, len(view))
        anchor = next((e for e in view[at:] if e in self._live), None)
        # Before the first header still there that followed in this filter's view; past the
        # end, keep the distance so an append stays an append.
        position = len(current) + edit.index - at if anchor is None else current.index(anchor)
        entry = _Entry(edit.name, edit.value)
        view.insert(at, entry)
        current.insert(min(position, len(current)), entry)
        self._live.add(entry)
        self._edits.append(InsertHeader(position, edit.name, edit.value))

    def _change(self, view: list[_Entry], edit: ChangeHeader, me: tuple[int, str], saw_edits: bool) -> None:
        name = me[1]
        key = edit.name.lower()
        seen = [entry for entry in view if entry.key == key]
        index = max(edit.index, 1)
        if index > len(seen):
            # No such header: the MTA appends one (if the value is not empty).
            beyond = index - len(seen)
            present = sum(entry.key == key for entry in self._current)
            self._edits.append(ChangeHeader(present + beyond, edit.name, edit.value))
            if edit.value:
                self._append(view, edit.name, edit.value)
            return
        target = seen[index - 1]
        if target in self._deleted:
            self.warnings.append(
                f"filter {name} changes header {edit.name} #{index}, which filter {self._deleted[target]}"
                " deleted; ignored"
            )
            if not edit.value:
                view.remove(target)
            return
        if target in self._touched and self._touched[target] != me and not saw_edits:
            self.warnings.append(
                f"filters {self._touched[target][1]} and {name} both change header {edit.name} #{index};"
                f" {name} wins"
            )
        rebased = [entry for entry in self._current if entry.key == key].index(target) + 1
        self._edits.append(ChangeHeader(rebased, edit.name, edit.value))
        self._touched[target] = me
        if edit.value:
            target.name, target.value, target.key = edit.name, edit.value, key
        else:
            view.remove(target)
            self._current.remove(target)
            self._live.discard(target)
            self._deleted[target] = name


def merge_changes(headers: Sequence[tuple[str, str]], contributions: Sequence[tuple[str, ChangeSet]]) -> MergedChanges:
    """Apply each filter's changes in order, each rebased onto the (original) message it saw."""
    merger = ChangeMerger(headers)
    for name, changes in contributions:
        merger.add(name, changes)
    return merger.result()


def describe(changes: ChangeSet) -> list[str]:
    """The kinds of change recorded, one entry per change, for logs and metrics."""
    kinds = [type(edit).__name__ for edit in changes.edits]
    if changes.sender is not None:
        kinds.append("ChangeFrom")
    if changes.body is not None:
        kinds.append("ReplaceBody")
    if changes.quarantine_reason is not None:
        kinds.append("Quarantine")
    return kinds
