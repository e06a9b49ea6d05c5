"""txmilt-check's exit statuses: what the milters decided, or why nothing was decided."""

from __future__ import annotations

import enum

from txmilt.messages import Accept, Continue, Discard, Reject, Shutdown, TempFail, Verdict

__all__ = ["ExitStatus", "exit_status", "verdict_name"]


class ExitStatus(enum.IntEnum):
    """The exit status of txmilt-check."""

    #: The message would be delivered (every milter continued or accepted).
    ACCEPTED = 0
    #: A milter rejected it (or every recipient).
    REJECTED = 1
    #: A milter tempfailed it (or answered Postfix's 421 shutdown).
    TEMPFAILED = 2
    #: A milter discarded it.
    DISCARDED = 3
    #: A milter could not be reached, broke the protocol, closed the connection or timed out.
    FAILED = 4
    #: The command line or the message file is wrong (EX_USAGE).
    USAGE = 64


def verdict_name(verdict: Verdict | None) -> str:
    """A verdict as the reports spell it: ``continue``, ``reject`` ... (``none`` for no verdict)."""
    if verdict is None:
        return "none"
    return type(verdict).__name__.lower()


def exit_status(verdict: Verdict | None) -> ExitStatus:
    """The exit status for a message's final verdict."""
    if isinstance(verdict, Continue | Accept):
        return ExitStatus.ACCEPTED
    if isinstance(verdict, Reject):
        return ExitStatus.REJECTED
    if isinstance(verdict, TempFail | Shutdown):
        return ExitStatus.TEMPFAILED
    if isinstance(verdict, Discard):
        return ExitStatus.DISCARDED
    return ExitStatus.FAILED
