r"""An in-memory MTA for testing filters, and a filter that records what it receives.

``FakeMTA`` plays the MTA's side of one milter connection against a real
``MilterProtocol`` over a ``StringTransport``, with a ``task.Clock`` for time::

    mta = FakeMTA([MyFilter])
    result = mta.message("<alice@example.com>", ["<bob@example.net>"], [("Subject", "Hi")], b"Hi\r\n")
    assert result.delivered and ("X-Checked", "yes") in result.headers

Step methods (``connect``, ``helo``, ``mail_from`` ... ``quit``) send one
command each, preceded by the macro packet the chosen MTA profile would send,
and return what the milter answered to it. ``message`` runs a whole message
like the MTA would, stops where the MTA would, and applies the end-of-message
changes to a model of the message.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from txmilt.chain import FilterSpec
from txmilt.conversation import DEFAULT_CLIENT, Answer, Conversation, HangUp, Instruction, MacroState, Mail, Outcome
from txmilt.errors import ConfigurationError, LocalProtocolError
from txmilt.interfaces import IMilter
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
    Family,
    Header,
    Helo,
    Macros,
    MacroStage,
    MailFrom,
    Modification,
    Negotiate,
    NegotiateReply,
    Progress,
    ProtocolFlag,
    Quit,
    RcptTo,
    Reject,
    Response,
    Shutdown,
    Skip,
    TempFail,
    Unknown,
    Verdict,
)
from txmilt.mta import POSTFIX, SENDMAIL, MTAProfile
from txmilt.protocol import MilterFactory, MilterProtocol
from txmilt.recording import Call as Call
from txmilt.recording import RecordingMilter as RecordingMilter
from txmilt.recording import VerdictRule as VerdictRule
from txmilt.session import NEED_DATA, Disconnected, MTASession

__all__ = [
    "POSTFIX",
    "SENDMAIL",
    "Call",
    "FakeMTA",
    "MTAProfile",
    "MessageResult",
    "RecordingMilter",
    "Step",
    "VerdictRule",
]

_FINAL = (Continue, Accept, Reject, TempFail, Discard, Skip, Shutdown)


# ------------------------------------------------------------------- results


@dataclass
class Step:
    """One command the FakeMTA handled and the responses the milter sent for it."""

    #: The command.
    command: Command
    #: Everything the milter sent in answer, in order (modifications, progress, the final verdict).
    responses: list[Response] = field(default_factory=list)
    #: False if the milter switched this command off with a NO flag, so it was not sent.
    sent: bool = True
    #: The macro packet sent before the command, if any.
    macros: Macros | None = None

    @property
    def verdict(self) -> Verdict | None:
        """The final response, or None if none (yet, or because no reply was due)."""
        for response in reversed(self.responses):
            if isinstance(response, _FINAL):
                return response
        return None


@dataclass
class MessageResult:
    """What happened to one message sent with ``FakeMTA.message``, and the message after the milter's changes.

    Header values are stored as the MTA would store them, without the one
    space after the colon: ``("Subject", "Hello")`` stands for ``Subject: Hello``.
    Changes are applied only when the message was delivered.
    """

    #: The response that decided the message (Continue or Accept at end of message means delivered);
    #: None if the milter closed the connection without deciding.
    verdict: Verdict | None
    #: Every command sent for this message, with its responses: OPTNEG, CONNECT and HELO if they were
    #: sent for it, ABORT at the end, and commands the milter switched off (``sent`` False).
    steps: list[Step]
    #: The modification packets received at end of message, in order.
    modifications: list[Modification]
    #: The headers after the changes, as (name, value).
    headers: list[tuple[str, str]]
    #: The envelope sender after the changes.
    sender: str
    #: The sender's ESMTP arguments after the changes.
    sender_args: tuple[str, ...]
    #: Recipients accepted and added, with their ESMTP arguments, after the changes.
    recipients: list[tuple[str, tuple[str, ...]]]
    #: The body after the changes.
    body: bytes
    #: Recipients refused at RCPT, with the refusal.
    refused_recipients: list[tuple[str, Verdict]] = field(default_factory=list)
    #: The quarantine reason, if the milter quarantined the message.
    quarantined: str | None = None
    #: PROGRESS packets received while the message was processed.
    progress_count: int = 0

    @property
    def delivered(self) -> bool:
        """Whether the MTA would accept the message for delivery."""
        return isinstance(self.verdict, Continue | Accept)

    def responses(self, command: type[Command]) -> list[Response]:
        """All responses to commands of this type, in order."""
        return [r for step in self.steps if isinstance(step.command, command) for r in step.responses]


# ------------------------------------------------------------------ the MTA


FilterMember: TypeAlias = "FilterSpec | Callable[[], IMilter] | IMilter"


class FakeMTA:
    """An MTA in memory, talking to one ``MilterProtocol`` through a ``StringTransport``.

    ``milter`` is a ``MilterFactory`` or a sequence of filters (Milter
    subclasses, factories, ``FilterSpec`` or ready filter instances, which then
    serve this connection). Time passes only when ``clock`` is advanced; when
    a factory is given, it must have been built with that clock (by default
    the factory's own ``Clock`` is used).

    Negotiation happens with the first step. Each step returns the responses
    that arrived for it; responses a pending filter owes show up after
    ``clock.advance(...)`` and ``collect()``.
    """

    def __init__(
        self,
        milter: MilterFactory | Sequence[FilterMember],
        *,
        clock: Clock | None = None,
        profile: MTAProfile = POSTFIX,
        offer: Negotiate | None = None,
        macros: Mapping[str, str | None] | None = None,
        transport: StringTransportWithDisconnection | None = None,
    ) -> None:
        if isinstance(milter, MilterFactory):
            if clock is None:
                if not isinstance(milter.clock, Clock):
                    raise ConfigurationError(
                        "FakeMTA needs a factory built with a twisted.internet.task.Clock, or pass clock="
                    )
                clock = milter.clock
            factory = milter
        else:
            clock = Clock() if clock is None else clock
            factory = MilterFactory([_as_member(member) for member in milter], clock)
        #: The clock the milter's timeouts run on.
        self.clock: Clock = clock
        #: The factory that built the protocol.
        self.factory = factory
        #: The MTA profile in use.
        self.profile = profile
        #: The OPTNEG offer sent.
        self.offer = profile.offer if offer is None else offer
        peer = IPv4Address("TCP", "127.0.0.1", 40025)
        protocol = factory.buildProtocol(peer)
        if protocol is None:
            raise ConnectionRefusedError(f"{factory!r} refused the connection (connection limit reached)")
        assert isinstance(protocol, MilterProtocol)
        #: The milter's protocol instance.
        self.protocol: MilterProtocol = protocol
        #: The transport between the MTA and the protocol; ``value()`` holds everything the milter wrote.
        self.transport = transport if transport is not None else StringTransportWithDisconnection(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8891), peerAddress=peer
        )
        #: The MTA's side of the protocol state.
        self.session = MTASession()
        #: The SMTP session played towards the milter: macro values, what was sent, how it was decided.
        self.conversation = Conversation(profile, (self.session,), MacroState(profile, macros))
        #: Macro values overriding the profile's and the session's (keys without braces; None unsets).
        self.macros: dict[str, str | None] = self.conversation.macros.overrides
        #: Every response received, in order.
        self.replies: list[Response] = []
        #: Every command sent (macro packets included), in order.
        self.commands: list[Command] = []
        #: Every command handled by a step, with its responses.
        self.steps: list[Step] = []
        #: Commands not sent because the milter switched them off with a NO flag.
        self.skipped: list[Command] = []
        #: False once the connection is closed, by either side.
        self.connected = True
        self._sent = bytearray()
        self._read = 0
        self._reply_step: Step | None = None
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"<FakeMTA {self.profile.name} {self.protocol.connection_id} connected={self.connected}>"

    # -- state

    @property
    def sent(self) -> bytes:
        """Every byte sent to the milter."""
        return bytes(self._sent)

    @property
    def negotiated(self) -> NegotiateReply | None:
        """The milter's OPTNEG reply, once received."""
        return self.session.negotiated

    @property
    def leading_space(self) -> bool:
        """Whether header values travel with their leading space (HEADER_LEADING_SPACE negotiated)."""
        return bool(self.session.protocol & ProtocolFlag.HEADER_LEADING_SPACE)

    # -- the wire

    def send_raw(self, data: bytes) -> list[Response]:
        """Feed bytes to the milter as they are; the responses that arrived."""
        self._require_connection()
        self._sent += data
        self.protocol.dataReceived(data)
        return self.collect()

    def collect(self) -> list[Response]:
        """Read what the milter wrote since the last read; the new responses (after ``clock.advance``)."""
        data = self.transport.value()
        if len(data) > self._read:
            self.session.receive_data(data[self._read:])
            self._read = len(data)
        closed = not self.transport.connected
        if closed:
            self.session.receive_data(b"")
        new: list[Response] = []
        while True:
            event = self.session.next_event()
            if event is NEED_DATA or isinstance(event, Disconnected):
                break
            new.append(event)
        if closed:
            self.connected = False
        self.replies.extend(new)
        if self._reply_step is not None:
            self._reply_step.responses.extend(new)
            if not self.session.reply_due:
                self._reply_step = None
        return new

    def _require_connection(self) -> None:
        if not self.connected:
            raise LocalProtocolError(f"{self!r}: the connection is closed")

    def _send(self, *commands: Command) -> bytes:
        data = b"".join(self.session.send(command) for command in commands)
        self.commands.extend(commands)
        return data

    def _step(self, command: Command) -> Step:
        """Send ``command`` with its macro packet; the step, with the responses that arrived."""
        self._require_connection()
        if not isinstance(command, Negotiate) and self.session.negotiated is None:
            self.negotiate()
            self._require_connection()
        state = self.conversation.macros
        saved = state.snapshot()
        macros = state.prepare(command, self.session.negotiated)
        wanted = self.session.wants(type(command))
        try:
            data = self._send(*(p for p in (macros, command if wanted else None) if p is not None))
        except LocalProtocolError:
            state.restore(saved)
            raise
        step = Step(command, sent=wanted, macros=macros)
        self.steps.append(step)
        if wanted:
            self._reply_step = step if self.session.reply_due else None
        else:
            self.skipped.append(command)
        if data:
            self._sent += data
            self.protocol.dataReceived(data)
        self.collect()
        return step

    # -- macros

    def macro_value(self, name: str) -> str | None:
        """The value the MTA has now for macro ``name`` (``x`` or ``{x}``), or None if it has none."""
        return self.conversation.macros.value(name)

    def macro_names(self, stage: MacroStage) -> tuple[str, ...]:
        """The macro names sent for ``stage``: the milter's requested list, else the profile's."""
        return self.conversation.macros.names(stage, self.session.negotiated)

    # -- steps

    def negotiate(self) -> list[Response]:
        """Send the OPTNEG offer; the reply (empty if the milter closed the connection instead)."""
        return self._step(self.offer).responses

    def connect(
        self,
        hostname: str = "mail.example.com",
        address: str = "192.0.2.10",
        port: int = 54321,
        family: Family = Family.INET,
    ) -> list[Response]:
        """Send CONNECT for an SMTP client; family UNKNOWN sends neither port nor address."""
        command = Connect(hostname) if family is Family.UNKNOWN else Connect(hostname, family, port, address)
        self.conversation.connect_sent = True
        return self._step(command).responses

    def helo(self, name: str = "mail.example.com") -> list[Response]:
        """Send HELO with the client's HELO/EHLO name."""
        self.conversation.helo_sent = True
        return self._step(Helo(name)).responses

    def mail_from(self, address: str, *args: str) -> list[Response]:
        """Send MAIL; ``address`` as the client gave it, normally ``<in angle brackets>``."""
        return self._step(MailFrom(address, args)).responses

    def rcpt_to(self, address: str, *args: str) -> list[Response]:
        """Send RCPT for one recipient."""
        return self._step(RcptTo(address, args)).responses

    def data(self) -> list[Response]:
        """Send DATA."""
        return self._step(Data()).responses

    def header(self, name: str, value: str) -> list[Response]:
        """Send one HEADER; ``value`` goes on the wire exactly as given (see ``leading_space``)."""
        return self._step(Header(name, value)).responses

    def end_of_headers(self) -> list[Response]:
        """Send EOH."""
        return self._step(EndOfHeaders()).responses

    def body(self, data: bytes) -> list[Response]:
        """Send ``data`` as BODY packets of at most the profile's chunk size.

        Stops after a chunk whose reply is not Continue (Skip, a refusal) or is
        still pending; the responses of all chunks sent.
        """
        responses: list[Response] = []
        for step in self._body_steps(data):
            responses.extend(step.responses)
            if not self.connected or self.session.reply_due or not isinstance(step.verdict, Continue | None):
                break
        return responses

    def _body_steps(self, data: bytes) -> Iterator[Step]:
        size = self.profile.body_chunk_size
        for start in range(0, len(data), size):
            yield self._step(BodyChunk(data[start:start + size]))

    def end_of_message(self) -> list[Response]:
        """Send BODYEOB (empty); the modifications and the final verdict."""
        return self._step(EndOfMessage()).responses

    def unknown(self, line: str) -> list[Response]:
        """Send UNKNOWN with an SMTP command line the MTA did not recognise."""
        return self._step(Unknown(line)).responses

    def abort(self) -> list[Response]:
        """Send ABORT (no reply is due)."""
        return self._step(Abort()).responses

    def quit(self) -> list[Response]:
        """Send QUIT; the milter then closes the connection."""
        return self._step(Quit()).responses

    def disconnect(self) -> list[Response]:
        """Close the connection from the MTA's side without QUIT."""
        if self.transport.connected:
            self.transport.loseConnection()
        return self.collect()

    # -- waiting

    def wait(self) -> list[Response]:
        """Advance the clock, one scheduled call at a time, until the owed reply arrives; what arrived.

        This is the MTA waiting for a slow filter: the filters' own timeouts
        fire on the way. TimeoutError if a reply is owed and nothing is scheduled.
        """
        new = self.collect()
        while self.connected and self.session.reply_due:
            calls = self.clock.getDelayedCalls()
            if not calls:
                raise TimeoutError(f"{self!r}: the milter owes a reply and nothing is scheduled on the clock")
            when = min(call.getTime() for call in calls)
            self.clock.advance(max(0.0, when - self.clock.seconds()))
            new.extend(self.collect())
        return new

    def _waited(self, step: Step) -> Verdict | None:
        """The step's verdict once it arrived; Continue if no reply was due."""
        self.wait()
        if not self.connected and step.verdict is None:
            return None
        verdict = step.verdict
        return Continue() if verdict is None else verdict

    # -- whole messages

    def message(
        self,
        sender: str,
        recipients: Sequence[str | tuple[str, Sequence[str]]],
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        sender_args: Sequence[str] = (),
        helo: str | None = "mail.example.com",
        connect: bool = True,
    ) -> MessageResult:
        """Send one message as the MTA would, and the message as it would be stored.

        Runs CONNECT (if ``connect`` and not done yet) and HELO (if ``helo`` and
        not done yet), then MAIL, RCPT for each recipient, DATA, the headers,
        EOH, the body and end of message, waiting for pending filters by
        advancing the clock. Stops like the MTA at a message-level refusal; a
        refusal at RCPT refuses only that recipient, and the message stops
        when none is left. Ends with ABORT where the profile sends one (and
        wherever the message was abandoned mid-transaction).

        Header values are given without the space after the colon
        (``("Subject", "Hello")``); they are sent with it when the milter asked
        for leading space. ``body`` is sent as given (use CRLF line ends).
        """
        rcpts = [(r, ()) if isinstance(r, str) else (r[0], tuple(r[1])) for r in recipients]
        result = MessageResult(
            verdict=None, steps=[], modifications=[], headers=list(headers), sender=sender,
            sender_args=tuple(sender_args), recipients=[], body=body,
        )
        start = len(self.steps)
        try:
            # Once CONNECT or HELO decided the SMTP session, nothing more reaches the milter.
            if self.conversation.verdict is not None or (
                self.connected and (self.session.negotiated is not None or self._negotiated())
            ):
                mail = Mail(sender, rcpts, headers, body, tuple(sender_args))
                outcome = self._play(self.conversation.message(
                    mail, connect=DEFAULT_CLIENT if connect else None, helo=helo
                ))
                message = outcome.message
                result.verdict, result.refused_recipients = outcome.verdict, outcome.refused_recipients
                result.modifications = [change for _, changes in outcome.changes for change in changes]
                result.headers, result.body = message.headers, message.body
                result.sender, result.sender_args = message.sender, message.sender_args
                result.recipients, result.quarantined = message.recipients, message.quarantined
        finally:
            result.steps = self.steps[start:]
            result.progress_count = sum(
                isinstance(r, Progress) for step in result.steps for r in step.responses
            )
        return result

    def _play(self, conversation: Generator[Instruction, Answer, Outcome]) -> Outcome:
        """Carry out a conversation's instructions, waiting for each reply; its outcome."""
        try:
            instruction = next(conversation)
            while True:
                if isinstance(instruction, HangUp):
                    (self.quit if instruction.quit else self.disconnect)()
                    answer = Answer(None, connected=self.connected)
                else:
                    step = self._step(instruction.command)
                    verdict = self._waited(step)
                    changes = tuple(r for r in step.responses if isinstance(r, Modification))
                    answer = Answer(verdict, changes, self.connected)
                instruction = conversation.send(answer)
        except StopIteration as done:
            outcome: Outcome = done.value
            return outcome

    def _negotiated(self) -> bool:
        """Negotiate (if still connected); whether it succeeded."""
        if self.connected:
            self.negotiate()
        return self.connected and self.session.negotiated is not None

    # -- the message model


def _as_member(member: FilterMember) -> FilterSpec | Callable[[], IMilter]:
    """A chain member for ``member``; a ready filter instance serves this one connection."""
    if isinstance(member, FilterSpec):
        return member
    if IMilter.providedBy(member):
        instance = member
        return FilterSpec(lambda: instance, name=type(instance).__qualname__)
    return member
