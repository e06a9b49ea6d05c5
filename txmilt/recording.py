"""A filter that records what a chain delivers to it, and answers as it is told (for tests)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from txmilt.messages import (
    Action,
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Data,
    DeleteRecipient,
    EndOfHeaders,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    Modification,
    RcptTo,
    ReplaceBody,
    Unknown,
    required_action,
)
from txmilt.milter import Changes, FilterVerdict, Milter, Result

__all__ = ["Call", "RecordingMilter", "VerdictRule"]


@dataclass(frozen=True)
class Call:
    """One callback a RecordingMilter received."""

    #: The callback's name (``"connect"`` ... ``"reset"``, ``"close"``).
    name: str
    #: The command it was given, the ``Changes`` for end_of_message, None for abort, reset and close.
    argument: object
    #: The macro values visible at the call.
    macros: Mapping[str, str]


#: A verdict, None (continue), or a function of the callback's argument returning either (or a Deferred).
VerdictRule: TypeAlias = "FilterVerdict | Callable[[Any], Result] | None"


class RecordingMilter(Milter):
    """A filter that records every callback in ``calls`` and answers as configured.

    ``verdicts`` maps callback names to a verdict or to a function of the
    callback's argument (``{"rcpt_to": lambda c: Reject() if "spam" in c.address else None}``);
    unlisted callbacks continue. ``changes`` is a sequence of modification
    messages (``AddHeader(...)``, ``ChangeFrom(...)``) made at end of message,
    or a function given the ``Changes``; ``actions`` defaults to what they need.
    A subclass may set the ``verdicts`` and ``changes`` class attributes instead.
    """

    #: Default verdict rules, by callback name.
    verdicts: ClassVar[Mapping[str, VerdictRule]] = {}
    #: Default end-of-message changes.
    changes: ClassVar[Sequence[Modification]] = ()

    def __init__(
        self,
        verdicts: Mapping[str, VerdictRule] | None = None,
        *,
        changes: Sequence[Modification] | Callable[[Changes], None] | None = None,
        actions: Action | None = None,
        macro_requests: Mapping[MacroStage, Sequence[str]] | None = None,
    ) -> None:
        #: Every callback received, in order.
        self.calls: list[Call] = []
        self._rules: dict[str, VerdictRule] = {**type(self).verdicts, **(verdicts or {})}
        self._changes = type(self).changes if changes is None else changes
        if actions is None and not callable(self._changes):
            actions = type(self).actions
            for change in self._changes:
                actions |= required_action(change)
        if actions is not None:
            self.actions = actions  # type: ignore[misc]  # per instance, read by the chain
        if macro_requests is not None:
            self.macro_requests = macro_requests  # type: ignore[misc]

    @property
    def names(self) -> list[str]:
        """The names of the callbacks received, in order."""
        return [call.name for call in self.calls]

    def arguments(self, name: str) -> list[object]:
        """The arguments of every call of callback ``name``."""
        return [call.argument for call in self.calls if call.name == name]

    def _record(self, name: str, argument: object) -> Result:
        self.calls.append(Call(name, argument, dict(self.macros)))
        rule = self._rules.get(name)
        if callable(rule):
            return rule(argument)
        return rule

    def connect(self, command: Connect) -> Result:
        """Record the connection."""
        return self._record("connect", command)

    def helo(self, command: Helo) -> Result:
        """Record the HELO name."""
        return self._record("helo", command)

    def mail_from(self, command: MailFrom) -> Result:
        """Record the sender."""
        return self._record("mail_from", command)

    def rcpt_to(self, command: RcptTo) -> Result:
        """Record a recipient."""
        return self._record("rcpt_to", command)

    def data(self, command: Data) -> Result:
        """Record DATA."""
        return self._record("data", command)

    def header(self, command: Header) -> Result:
        """Record a header."""
        return self._record("header", command)

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        """Record the end of the headers."""
        return self._record("end_of_headers", command)

    def body(self, command: BodyChunk) -> Result:
        """Record a body chunk."""
        return self._record("body", command)

    def end_of_message(self, changes: Changes) -> Result:
        """Make the configured changes, then record the end of the message."""
        if callable(self._changes):
            self._changes(changes)
        else:
            _make_changes(changes, self._changes)
        return self._record("end_of_message", changes)

    def unknown(self, command: Unknown) -> Result:
        """Record an unknown SMTP command."""
        return self._record("unknown", command)

    def abort(self) -> Result:
        """Record an abort."""
        return self._record("abort", None)

    def reset(self) -> Result:
        """Record the end of a message."""
        return self._record("reset", None)

    def close(self) -> Result:
        """Record the end of the session."""
        return self._record("close", None)


def _make_changes(changes: Changes, modifications: Sequence[Modification]) -> None:
    """Record ``modifications`` on ``changes`` through its public methods."""
    body: bytes | None = None
    for change in modifications:
        if isinstance(change, AddHeader):
            changes.add_header(change.name, change.value)
        elif isinstance(change, InsertHeader):
            changes.insert_header(change.name, change.value, index=change.index)
        elif isinstance(change, ChangeHeader):
            changes.change_header(change.name, change.value, index=change.index)
        elif isinstance(change, ChangeFrom):
            changes.change_from(change.address, change.args)
        elif isinstance(change, AddRecipient):
            changes.add_recipient(change.address, change.args)
        elif isinstance(change, DeleteRecipient):
            changes.delete_recipient(change.address)
        elif isinstance(change, ReplaceBody):
            body = (body or b"") + change.data
            changes.replace_body(body)
        else:
            changes.quarantine(change.reason)
