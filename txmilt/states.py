"""Where a milter session stands and what moves it: libmilter's states and three tables.

``TRANSITIONS`` says where each command may come and where it leads,
``CLOSES`` what each final reply closes (when a message ends, and why), and
``ANSWERS`` which verdict may answer which command. The sessions
(``txmilt.session``) and the chain read them; nothing else decides these rules.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from typing import Final

from txmilt.messages import (
    Abort,
    Accept,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Macros,
    MailFrom,
    Negotiate,
    ProtocolFlag,
    Quit,
    QuitNoClose,
    RcptTo,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Unknown,
)


class Stage(enum.Enum):
    """Where a session stands (libmilter's states); named for the last command processed."""

    INIT = "before OPTNEG"
    OPTIONS = "after OPTNEG"
    CONNECT = "CONNECT"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    HEADERS = "HEADER"
    END_OF_HEADERS = "EOH"
    BODY = "BODY"
    END_OF_MESSAGE = "end of message"
    UNKNOWN = "UNKNOWN"
    CLOSED = "closed"

    #: Members are singletons compared by identity: hash them so too (Enum's own hash is Python code).
    __hash__ = object.__hash__


class Scope(enum.Enum):
    """What a final reply closes, as the MTA acts on it."""

    #: Nothing: the message (if any) goes on.
    NONE = "nothing"
    #: The message: it is over (accepted, refused, discarded, or answered at its end).
    MESSAGE = "the message"
    #: The SMTP session: an answer at CONNECT or HELO covers every later command.
    CONNECTION = "the connection"


#: Protocol names of the commands, for messages (PROTOCOL.md §2.1).
COMMAND_NAMES: Final[Mapping[type, str]] = {
    Negotiate: "OPTNEG",
    Macros: "MACRO",
    Connect: "CONNECT",
    Helo: "HELO",
    MailFrom: "MAIL",
    RcptTo: "RCPT",
    Data: "DATA",
    Header: "HEADER",
    EndOfHeaders: "EOH",
    BodyChunk: "BODY",
    EndOfMessage: "BODYEOB",
    Unknown: "UNKNOWN",
    Abort: "ABORT",
    Quit: "QUIT",
    QuitNoClose: "QUIT_NC",
}


def describe(command: Command) -> str:
    """``RCPT ('R')``: how messages name a command."""
    return f"{COMMAND_NAMES[type(command)]} ({command.letter!r})"


#: Where each command may come and which stage it leads to: libmilter's state table
#: (PROTOCOL.md §5.2). ABORT, QUIT, QUIT_NC and MACRO are not stages; see ``_Session._order``.
TRANSITIONS: Final[Mapping[Stage, Mapping[type, Stage]]] = {
    Stage.INIT: {},  # OPTNEG moves the stage to OPTIONS when its reply is sent
    Stage.OPTIONS: {Connect: Stage.CONNECT, Unknown: Stage.UNKNOWN},
    Stage.CONNECT: {Helo: Stage.HELO, MailFrom: Stage.MAIL, Unknown: Stage.UNKNOWN},
    Stage.HELO: {Helo: Stage.HELO, MailFrom: Stage.MAIL, Unknown: Stage.UNKNOWN},
    Stage.MAIL: {RcptTo: Stage.RCPT, Unknown: Stage.UNKNOWN},
    Stage.RCPT: {
        RcptTo: Stage.RCPT, Data: Stage.DATA, Header: Stage.HEADERS, EndOfHeaders: Stage.END_OF_HEADERS,
        BodyChunk: Stage.BODY, EndOfMessage: Stage.END_OF_MESSAGE, Unknown: Stage.UNKNOWN,
    },
    Stage.DATA: {Header: Stage.HEADERS, EndOfHeaders: Stage.END_OF_HEADERS},
    Stage.HEADERS: {Header: Stage.HEADERS, EndOfHeaders: Stage.END_OF_HEADERS},
    Stage.END_OF_HEADERS: {BodyChunk: Stage.BODY, EndOfMessage: Stage.END_OF_MESSAGE},
    Stage.BODY: {BodyChunk: Stage.BODY, EndOfMessage: Stage.END_OF_MESSAGE},
    Stage.END_OF_MESSAGE: {MailFrom: Stage.MAIL, Unknown: Stage.UNKNOWN},
    # After UNKNOWN libmilter takes any of these, wherever UNKNOWN came from.
    Stage.UNKNOWN: {
        Helo: Stage.HELO, MailFrom: Stage.MAIL, RcptTo: Stage.RCPT, Data: Stage.DATA, BodyChunk: Stage.BODY,
        Unknown: Stage.UNKNOWN,
    },
    Stage.CLOSED: {},
}

#: What a final reply closes, by the command it answers and the verdict (PROTOCOL.md §5.3, and
#: libmilter's state after the reply). Missing pairs close nothing. A refused recipient or
#: unknown command leaves the message open; an answer at CONNECT or HELO covers the connection.
_ACCEPT_OR_REFUSE: Final = (Accept, Reject, TempFail, Shutdown)
_MESSAGE_VERDICTS: Final = (*_ACCEPT_OR_REFUSE, Discard)
CLOSES: Final[Mapping[type, Mapping[type, Scope]]] = {
    Connect: dict.fromkeys(_ACCEPT_OR_REFUSE, Scope.CONNECTION),
    Helo: dict.fromkeys(_ACCEPT_OR_REFUSE, Scope.CONNECTION),
    MailFrom: dict.fromkeys(_MESSAGE_VERDICTS, Scope.MESSAGE),
    RcptTo: {Accept: Scope.MESSAGE},
    Data: dict.fromkeys(_MESSAGE_VERDICTS, Scope.MESSAGE),
    Header: dict.fromkeys(_MESSAGE_VERDICTS, Scope.MESSAGE),
    EndOfHeaders: dict.fromkeys(_MESSAGE_VERDICTS, Scope.MESSAGE),
    BodyChunk: dict.fromkeys(_MESSAGE_VERDICTS, Scope.MESSAGE),
    EndOfMessage: dict.fromkeys((Continue, *_MESSAGE_VERDICTS), Scope.MESSAGE),
    Unknown: {Accept: Scope.MESSAGE},
}

#: Which final verdicts may answer which commands (negotiated flags aside): SKIP answers only
#: BODY; DISCARD only commands of a message; the rest answer anything.
ANSWERS: Final[Mapping[type, frozenset[type]]] = {
    Skip: frozenset({BodyChunk}),
    Discard: frozenset({MailFrom, RcptTo, Data, Header, EndOfHeaders, BodyChunk, EndOfMessage, Unknown}),
}


def closes(command: type, verdict: type) -> Scope:
    """What a final ``verdict`` answering ``command`` closes (the CLOSES table)."""
    return CLOSES.get(command, _NOTHING).get(verdict, Scope.NONE)


def can_answer(command: type, verdict: type) -> bool:
    """Whether a verdict of this kind may answer this kind of command (the ANSWERS table)."""
    allowed = ANSWERS.get(verdict)
    return allowed is None or command in allowed


_NOTHING: Final[Mapping[type, Scope]] = {}


# The NO flag that switches each stage off, for walking over it in ``transitions``.
_SKIPPED_BY: Final[Mapping[Stage, ProtocolFlag]] = {
    Stage.CONNECT: ProtocolFlag.NO_CONNECT,
    Stage.HELO: ProtocolFlag.NO_HELO,
    Stage.MAIL: ProtocolFlag.NO_MAIL,
    Stage.RCPT: ProtocolFlag.NO_RCPT,
    Stage.DATA: ProtocolFlag.NO_DATA,
    Stage.HEADERS: ProtocolFlag.NO_HEADERS,
    Stage.END_OF_HEADERS: ProtocolFlag.NO_EOH,
    Stage.BODY: ProtocolFlag.NO_BODY,
}


@functools.lru_cache(maxsize=64)
def transitions(skipped: ProtocolFlag) -> Mapping[Stage, Mapping[type, Stage]]:
    """TRANSITIONS with the stages switched off by NO flags walked over, as libmilter does.

    A command may also come where the MTA, not sending the switched-off ones, goes
    straight on: with NO_RCPT, DATA may follow MAIL.
    """
    skip = {stage for stage, flag in _SKIPPED_BY.items() if flag & skipped}

    def reach(stage: Stage, seen: frozenset[Stage]) -> dict[type, Stage]:
        out = dict(TRANSITIONS[stage])
        for target in set(TRANSITIONS[stage].values()) & skip:
            if target not in seen:
                for command, successor in reach(target, seen | {target}).items():
                    out.setdefault(command, successor)
        return out

    return {stage: reach(stage, frozenset({stage})) for stage in Stage}
