"""An MTA's side of an SMTP session towards its milters, sans-IO: macros, command order, where it stops.

``Conversation`` plays messages towards one milter, or towards several in turn
as Postfix's ``smtpd_milters = a, b`` does: each SMTP command goes to the
milters in order until one does not continue, and each milter receives the
message content with the earlier milters' changes applied. It holds no
sockets: ``message()`` is a generator that yields what to do next (``Send`` a
command to milter *n*, ``HangUp`` on milter *n*), is sent each command's
``Answer``, and returns the ``Outcome``. ``MacroState.prepare`` gives the
macro packet the MTA sends before a command. ``txmilt.testing.FakeMTA``
drives a conversation in memory, ``txmilt-check`` over real sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from txmilt.messages import (
    Abort,
    Accept,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    Macros,
    MacroStage,
    MailFrom,
    Modification,
    NegotiateReply,
    ProtocolFlag,
    RcptTo,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
    strip_leading_space,
)
from txmilt.mta import MACRO_STAGES, Message, MTAProfile, apply_modifications, bare_address, bare_macro_name
from txmilt.session import MTASession

__all__ = [
    "DEFAULT_CLIENT",
    "DEFAULT_HELO",
    "Answer",
    "Conversation",
    "HangUp",
    "Instruction",
    "MacroState",
    "Mail",
    "Outcome",
    "Send",
    "raw_header_value",
]

#: The SMTP client an MTA model pretends to serve unless told otherwise.
DEFAULT_CLIENT: Final = Connect("mail.example.com", Family.INET, 54321, "192.0.2.10")
#: Its HELO name.
DEFAULT_HELO: Final = "mail.example.com"

# Postfix also sends the EOH list before each header and the EOM list before each body chunk.
_PER_ITEM_STAGE: Final[Mapping[str, MacroStage]] = {"L": MacroStage.END_OF_HEADERS, "B": MacroStage.END_OF_MESSAGE}


def raw_header_value(value: str) -> str:
    """A stored header value as it follows the colon: after one space, unless it is empty."""
    return " " + value if value else value


def _domain(address: str) -> str:
    return bare_address(address).rpartition("@")[2]


# ------------------------------------------------------------------ macros


class MacroState:
    """The macro values an MTA has during one SMTP session, and the packet it sends before each command."""

    def __init__(self, profile: MTAProfile, overrides: Mapping[str, str | None] | None = None) -> None:
        self.profile = profile
        #: Values overriding the profile's and the session's (keys without braces; None unsets).
        self.overrides: dict[str, str | None] = {bare_macro_name(k): v for k, v in (overrides or {}).items()}
        self._values: dict[str, str] = {}
        self._rcpt_seen = False

    def snapshot(self) -> tuple[dict[str, str], bool]:
        """The session-dependent state, for ``restore`` when a command could not be sent after all."""
        return dict(self._values), self._rcpt_seen

    def restore(self, snapshot: tuple[dict[str, str], bool]) -> None:
        """Go back to a ``snapshot``."""
        values, self._rcpt_seen = snapshot
        self._values = dict(values)

    def track(self, command: Command) -> None:
        """Update the session-dependent values (client, HELO name, addresses) for ``command``."""
        values = self._values
        if isinstance(command, Connect):
            values.update({"client_name": command.hostname, "client_ptr": command.hostname})
            if command.family in (Family.INET, Family.INET6):
                values.update({
                    "_": f"{command.hostname} [{command.address}]",
                    "client_addr": command.address,
                    "client_port": str(command.port),
                })
            else:
                values["_"] = command.hostname
        elif isinstance(command, Helo):
            values["s"] = command.name
        elif isinstance(command, MailFrom):
            self._rcpt_seen = False
            values.update({"mail_addr": bare_address(command.address), "mail_host": _domain(command.address)})
        elif isinstance(command, RcptTo):
            self._rcpt_seen = True
            values.update({"rcpt_addr": bare_address(command.address), "rcpt_host": _domain(command.address)})

    def value(self, name: str) -> str | None:
        """The value the MTA has now for macro ``name`` (``x`` or ``{x}``), or None if it has none."""
        key = bare_macro_name(name)
        if key in self.overrides:
            return self.overrides[key]
        if key == "i" and self.profile.queue_id_from_rcpt and not self._rcpt_seen:
            return None
        if key in self._values:
            return self._values[key]
        return self.profile.macro_values.get(key)

    def names(self, stage: MacroStage, negotiated: NegotiateReply | None) -> tuple[str, ...]:
        """The macro names sent for ``stage``: the milter's requested list, else the profile's."""
        requested = negotiated.macros.get(stage) if negotiated is not None else None
        if requested is not None and (requested or not self.profile.empty_request_means_default):
            return tuple(requested)
        return tuple(self.profile.macro_names.get(stage, ()))

    def packet(self, command: Command, negotiated: NegotiateReply | None) -> Macros | None:
        """The macro packet the MTA sends before ``command`` to a milter that negotiated ``negotiated``."""
        letter = command.letter
        names: tuple[str, ...] | None
        if letter in MACRO_STAGES:
            names = self.names(MACRO_STAGES[letter], negotiated)
        elif letter in _PER_ITEM_STAGE and self.profile.macros_before_every_header_and_chunk:
            names = self.names(_PER_ITEM_STAGE[letter], negotiated)
        elif letter == "U":
            names = self.profile.unknown_macro_names
        else:
            names = None
        if names is None or not (names or self.profile.always_send_macros):
            return None
        pairs = []
        for name in names:
            value = self.value(name)
            if value is not None:
                pairs.append((name, value))
        return Macros(letter, tuple(pairs))

    def prepare(self, command: Command, negotiated: NegotiateReply | None) -> Macros | None:
        """Track ``command``, then the macro packet to send before it."""
        self.track(command)
        return self.packet(command, negotiated)


# ------------------------------------------------------------ instructions

_CONTINUE: Final = Continue()


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``command``, after its macro packet, to milter number ``milter``; answer with what came back."""

    milter: int
    command: Command


@dataclass(frozen=True, slots=True)
class HangUp:
    """Close the connection to milter number ``milter``: after QUIT if ``quit``, else at once (Postfix)."""

    milter: int
    quit: bool


#: What ``Conversation.message`` asks its driver to do.
Instruction: TypeAlias = Send | HangUp


@dataclass(frozen=True, slots=True)
class Answer:
    """What came back for one ``Send`` (or ``HangUp``)."""

    #: The final reply; Continue for a command that gets none (switched off, no reply due, ABORT);
    #: None if none came because the connection closed.
    verdict: Verdict | None = _CONTINUE
    #: The end-of-message modifications that came before the verdict, in order (QUARANTINE included).
    modifications: tuple[Modification, ...] = ()
    #: Whether the milter's connection is still open.
    connected: bool = True


@dataclass(frozen=True)
class Mail:
    """One message to play: envelope and content.

    Header values are given as the MTA stores them, without the space after
    the colon (``("Subject", "Hello")``); folded lines joined by bare LF. The
    body has CRLF line ends. Recipients come with their ESMTP arguments.
    """

    sender: str
    recipients: Sequence[tuple[str, tuple[str, ...]]]
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    sender_args: tuple[str, ...] = ()


@dataclass
class Outcome:
    """How one message ended, and the message as the MTA would store it."""

    #: The response that decided the message (Continue or Accept at the end: delivered);
    #: None if a milter closed the connection without deciding.
    verdict: Verdict | None
    #: The message, with the changes of every milter that let it through applied.
    message: Message
    #: The number of the milter whose answer ended the message early, or None.
    decided_by: int | None = None
    #: Recipients refused at RCPT, with the refusal.
    refused_recipients: list[tuple[str, Verdict]] = field(default_factory=list)
    #: The end-of-message modifications as received, (milter number, modifications), in milter order.
    changes: list[tuple[int, tuple[Modification, ...]]] = field(default_factory=list)

    @property
    def delivered(self) -> bool:
        """Whether the MTA would accept the message for delivery."""
        return isinstance(self.verdict, Continue | Accept)


_Steps: TypeAlias = Generator[Instruction, Answer, bool]


class Conversation:
    """One SMTP session as an MTA plays it towards its milters (``sessions``, one per milter, in order).

    The sessions are read, never written: which milter asked for leading space
    in header values, and whether it still holds an open message at the end.
    """

    def __init__(self, profile: MTAProfile, sessions: Sequence[MTASession], macros: MacroState | None = None) -> None:
        self.profile = profile
        self.sessions = sessions
        #: The macro values of the session.
        self.macros = MacroState(profile) if macros is None else macros
        #: Whether CONNECT and HELO went out.
        self.connect_sent = False
        self.helo_sent = False
        #: The verdict that decided the whole SMTP session at CONNECT or HELO, and whose it was.
        self.verdict: Verdict | None = None
        self.decided_by: int | None = None
        self._retired: set[int] = set()  # milters that accepted the whole SMTP session
        self._gone: set[int] = set()  # milters whose connection is closed

    def message(
        self, mail: Mail, *, connect: Connect | None = DEFAULT_CLIENT, helo: str | None = DEFAULT_HELO
    ) -> Generator[Instruction, Answer, Outcome]:
        """Play one message as the MTA would; the outcome.

        CONNECT (if given and not sent yet) and HELO (likewise) come first,
        then MAIL, RCPT for each recipient, DATA (each to every milter in turn
        until one does not continue), then for each milter in turn the
        headers, EOH, the body in chunks and end of message, with the earlier
        milters' changes applied. A refusal at RCPT refuses only that
        recipient; the message stops when none is left. Accept retires that
        milter for the message (the session at CONNECT or HELO); when every
        milter has accepted, the message is accepted. ABORT follows where
        the profile sends one, or wherever a milter still holds the message.
        """
        recipients = [(address, tuple(args)) for address, args in mail.recipients]
        outcome = Outcome(None, Message(list(mail.headers), mail.body, mail.sender, mail.sender_args, []))
        if self.verdict is not None:
            outcome.verdict, outcome.decided_by = self.verdict, self.decided_by
            if isinstance(self.verdict, Accept):
                outcome.message.recipients = recipients
            return outcome
        if connect is not None and not self.connect_sent:
            self.connect_sent = True
            if (yield from self._session_command(connect, recipients, outcome)):
                return outcome
        if helo is not None and not self.helo_sent:
            self.helo_sent = True
            if (yield from self._session_command(Helo(helo), recipients, outcome)):
                return outcome
        yield from self._transaction(mail, recipients, outcome)
        return outcome

    # -- the steps

    def _active(self, accepted: set[int]) -> list[int]:
        """The milters that still filter this message, in order."""
        return [m for m in range(len(self.sessions)) if m not in self._retired | self._gone | accepted]

    def _send(self, milter: int, command: Command) -> Generator[Instruction, Answer, Answer]:
        answer = yield Send(milter, command)
        if not answer.connected:
            self._gone.add(milter)
        return answer

    def _hang_up(self, milter: int, quit: bool) -> Generator[Instruction, Answer, None]:
        if milter not in self._gone:
            yield HangUp(milter, quit)
            self._gone.add(milter)

    def _session_command(
        self, command: Connect | Helo, recipients: list[tuple[str, tuple[str, ...]]], outcome: Outcome
    ) -> _Steps:
        """Send CONNECT or HELO to each milter in turn; whether a verdict decided the whole session."""
        for milter in self._active(set()):
            answer = yield from self._send(milter, command)
            verdict = answer.verdict
            if isinstance(verdict, Continue):
                continue
            if verdict is None:
                outcome.verdict, outcome.decided_by = None, milter
                return True
            refused = not isinstance(verdict, Accept)
            if not refused:
                self._retired.add(milter)
            if self.profile.drop_after_connection_verdict or refused:
                yield from self._hang_up(milter, quit=not self.profile.drop_after_connection_verdict)
            if not refused and self._active(set()):
                continue  # the others still filter
            self.verdict, self.decided_by = verdict, milter
            outcome.verdict, outcome.decided_by = verdict, milter
            if not refused:
                outcome.message.recipients = list(recipients)
            return True
        return False

    def _fan_out(
        self, command: Command, accepted: set[int]
    ) -> Generator[Instruction, Answer, tuple[Answer, int | None]]:
        """Send ``command`` to each milter in turn until one does not continue; the deciding answer and milter."""
        last = None
        for milter in self._active(accepted):
            answer = yield from self._send(milter, command)
            if isinstance(answer.verdict, Accept) and answer.connected:
                accepted.add(milter)
                last = milter
            elif not isinstance(answer.verdict, Continue) or not answer.connected:
                return answer, milter
        if not self._active(accepted):
            return Answer(Accept()), last
        return Answer(), None

    def _stopped(self, answer: Answer, milter: int | None, outcome: Outcome) -> _Steps:
        """Whether the message ends with this answer (not Continue, or the milter is gone); if so, end it."""
        verdict = answer.verdict if answer.connected else None
        if isinstance(verdict, Continue):
            return False
        outcome.verdict, outcome.decided_by = verdict, milter
        yield from self._end_message(verdict, milter)
        return True

    def _transaction(
        self, mail: Mail, recipients: list[tuple[str, tuple[str, ...]]], outcome: Outcome
    ) -> Generator[Instruction, Answer, None]:
        accepted: set[int] = set()
        message = outcome.message
        answer, milter = yield from self._fan_out(MailFrom(mail.sender, mail.sender_args), accepted)
        if isinstance(answer.verdict, Accept):
            message.recipients = list(recipients)
        if (yield from self._stopped(answer, milter, outcome)):
            return
        refuser = None
        for number, (address, args) in enumerate(recipients):
            answer, milter = yield from self._fan_out(RcptTo(address, args), accepted)
            if isinstance(answer.verdict, Reject | TempFail) and answer.connected:
                outcome.refused_recipients.append((address, answer.verdict))
                refuser = milter
                continue
            message.recipients.append((address, args))
            if isinstance(answer.verdict, Accept):
                message.recipients.extend(recipients[number + 1:])
            if (yield from self._stopped(answer, milter, outcome)):
                return
        if not message.recipients:
            last = outcome.refused_recipients[-1][1] if outcome.refused_recipients else None
            yield from self._stopped(Answer(last), refuser, outcome)
            return
        answer, milter = yield from self._fan_out(Data(), accepted)
        if (yield from self._stopped(answer, milter, outcome)):
            return
        for milter in range(len(self.sessions)):
            if milter not in self._active(accepted):
                continue
            answer, finished = yield from self._content(milter, message)
            if finished:
                outcome.changes.append((milter, answer.modifications))
                if isinstance(answer.verdict, Continue | Accept):
                    apply_modifications(message, answer.modifications, self._stored(milter), self.profile.mta)
                    if isinstance(answer.verdict, Accept):
                        accepted.add(milter)
                    continue
                outcome.verdict, outcome.decided_by = answer.verdict, milter
                yield from self._end_message(answer.verdict, milter)
                return
            if isinstance(answer.verdict, Accept) and answer.connected:
                accepted.add(milter)
                continue
            yield from self._stopped(answer, milter, outcome)
            return
        everyone = not self._active(accepted)
        outcome.verdict = Accept() if everyone else Continue()
        yield from self._end_message(outcome.verdict, None)

    def _content(self, milter: int, message: Message) -> Generator[Instruction, Answer, tuple[Answer, bool]]:
        """Headers, EOH, body and end of message to one milter; its last answer, and whether that was EOM's."""
        leading = self._leading_space(milter)
        for name, value in message.headers:
            wire = raw_header_value(value) if leading else value
            answer = yield from self._send(milter, Header(name, wire))
            if not isinstance(answer.verdict, Continue) or not answer.connected:
                return answer, False
        answer = yield from self._send(milter, EndOfHeaders())
        if not isinstance(answer.verdict, Continue) or not answer.connected:
            return answer, False
        size = self.profile.body_chunk_size
        for offset in range(0, len(message.body), size):
            answer = yield from self._send(milter, BodyChunk(message.body[offset:offset + size]))
            if isinstance(answer.verdict, Skip) and answer.connected:
                break
            if not isinstance(answer.verdict, Continue) or not answer.connected:
                return answer, False
        answer = yield from self._send(milter, EndOfMessage())
        return answer, True

    def _end_message(self, verdict: Verdict | None, decider: int | None) -> Generator[Instruction, Answer, None]:
        """What the MTA sends each milter once a message is over: ABORT, or a hang-up after SHUTDOWN."""
        for milter in range(len(self.sessions)):
            if milter in self._gone or milter in self._retired:
                continue
            if milter == decider and isinstance(verdict, Shutdown) and self.profile.drop_after_connection_verdict:
                yield from self._hang_up(milter, quit=False)
            elif self.profile.abort_after_message or self.sessions[milter].in_transaction:
                yield from self._send(milter, Abort())

    # -- header values

    def _leading_space(self, milter: int) -> bool:
        return bool(self.sessions[milter].protocol & ProtocolFlag.HEADER_LEADING_SPACE)

    def _stored(self, milter: int) -> Callable[[str], str]:
        """How a header value from this milter's modifications is stored: without the space after the colon."""
        return strip_leading_space if self._leading_space(milter) else _as_sent


def _as_sent(value: str) -> str:
    return value
