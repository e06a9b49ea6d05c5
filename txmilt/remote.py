"""RemoteMilter: an external milter, reached over a socket, as one member of a chain.

The chain negotiates with the MTA before any remote connection exists, so a
RemoteMilter declares its needs statically: every event (it overrides every
callback), the actions it is configured with (all by default), the macros it
is configured to ask for (none by default: the MTA's own lists), and exact
header values (``leading_space``, on by default). At its first callback it
connects, offers the remote everything it can serve, and from then on acts
as the MTA towards it:

* commands the remote switched off (its NO flags) are answered Continue
  here, body chunks with Skip, so the chain stops sending them;
* macro values go out before each command, the names the remote asked for
  if it sent a list for that stage, otherwise everything visible then;
* header values are adapted to the remote's leading-space choice, both ways;
* its verdicts become the member's verdicts, its end-of-message changes are
  recorded on the chain's ``Changes`` (body chunks joined), its PROGRESS
  packets are passed on;
* when it cannot be reached, breaks the protocol, closes, or misses the
  member's timeout, that callback fails (the chain logs it and applies the
  fallback), the connection is dropped, and the fallback answers for it for
  the rest of the SMTP session, as Postfix and Sendmail treat a failed milter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, cast

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmilt.chain import FilterSpec
from txmilt.client import MilterClient, Reply, check_milter_address, connect_milter, milter_endpoint
from txmilt.codec import DEFAULT_FRAME_LIMIT
from txmilt.conditions import When
from txmilt.errors import ConfigurationError, MilterUnavailableError
from txmilt.interfaces import IMilter
from txmilt.messages import (
    ALL_ACTIONS,
    PROTOCOL_VERSION,
    Accept,
    Action,
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Command,
    Connect,
    Continue,
    Data,
    DeleteRecipient,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    Negotiate,
    NegotiateReply,
    ProtocolFlag,
    RcptTo,
    Reject,
    ReplaceBody,
    Shutdown,
    Skip,
    TempFail,
    Unknown,
    add_leading_space,
    strip_leading_space,
)
from txmilt.milter import Changes, FilterVerdict, Result
from txmilt.mta import MACRO_STAGES
from txmilt.session import COMMAND_NAMES, EMPTY_MACROS, NO_FLAG, NO_REPLY_FLAG, MacroView

#: Everything the client side can serve, whatever the MTA offered the chain.
_SERVED: Final = ProtocolFlag(
    sum(NO_FLAG.values()) | sum(NO_REPLY_FLAG.values()) | ProtocolFlag.SKIP | ProtocolFlag.HEADER_LEADING_SPACE
)
# Commands inside a message: once the remote has ended the message they are answered here.
_IN_MESSAGE: Final = (RcptTo, Data, Header, EndOfHeaders, BodyChunk, EndOfMessage)
# Commands whose refusal (or accept, or discard) ends the message for the remote.
_MESSAGE: Final = (MailFrom, *_IN_MESSAGE)
_SHUTDOWN: Final = TempFail("Server closing connection", code=421, status="4.7.0")
_CONTINUE: Final = Continue()


def _braced(name: str) -> str:
    return name if len(name) == 1 else f"{{{name}}}"


def _actions(value: Action | int | Sequence[str] | str) -> Action:
    """Action flags from flags, an int, or names such as ``["add_headers", "quarantine"]``."""
    if isinstance(value, Action | int):
        return Action(value)
    names = [value] if isinstance(value, str) else list(value)
    actions = Action.NONE
    for name in names:
        try:
            actions |= Action[name.upper()]
        except KeyError:
            known = ", ".join(str(flag.name).lower() for flag in Action if flag.value)
            raise ConfigurationError(f"unknown action {name!r}; known actions: {known}") from None
    return actions


def _macro_requests(value: Mapping[Any, Sequence[str] | str] | None) -> dict[MacroStage, tuple[str, ...]]:
    """Macro lists keyed by MacroStage, from stages or names such as ``{"connect": ["j", "{daemon_name}"]}``."""
    requests: dict[MacroStage, tuple[str, ...]] = {}
    for key, names in (value or {}).items():
        try:
            stage = key if isinstance(key, MacroStage) else MacroStage[str(key).upper()]
        except KeyError:
            known = ", ".join(stage.name.lower() for stage in MacroStage)
            raise ConfigurationError(f"unknown macro stage {key!r}; known stages: {known}") from None
        requests[stage] = tuple(names.replace(",", " ").split()) if isinstance(names, str) else tuple(names)
    return requests


@implementer(IMilter)
class RemoteMilter:
    """Proxies one SMTP session to an external milter at ``address``; one instance per MTA connection."""

    log = Logger()

    #: A remote milter may refuse anything, so nothing is declared reply-less.
    no_reply: frozenset[str] = frozenset()

    def __init__(
        self,
        address: str | IStreamClientEndpoint,
        *,
        name: str = "",
        timeout: float = FilterSpec.timeout,
        fallback: FilterVerdict | None = None,
        actions: Action | int | Sequence[str] | str = ALL_ACTIONS,
        macros: Mapping[Any, Sequence[str] | str] | None = None,
        leading_space: bool = True,
        rejected_recipients: bool = False,
        offer: Negotiate | None = None,
        frame_limit: int = DEFAULT_FRAME_LIMIT,
        reactor: IReactorTime | None = None,
    ) -> None:
        self._given_reactor = reactor
        self.address = address if isinstance(address, str) else repr(address)
        self.name = name or f"remote {self.address}"
        self._address = address
        if isinstance(address, str):
            check_milter_address(address)
        self._timeout = timeout
        self._fallback: FilterVerdict = fallback if fallback is not None else TempFail()
        #: Modifications the remote may make (SETSYMLIST is handled here, not by the MTA).
        self.actions = _actions(actions) & ~Action.SET_MACRO_LIST
        #: Macros to ask the MTA for; with none, the MTA sends its default lists.
        self.macro_requests = _macro_requests(macros)
        #: Take header values exactly as sent; adapted here to what the remote asked for.
        self.leading_space = leading_space
        #: Also pass on recipients the MTA rejected (if the remote asks for them).
        self.rejected_recipients = rejected_recipients
        self.macros: MacroView = EMPTY_MACROS
        self._offer = offer
        self._frame_limit = frame_limit
        self._mta_offer: Negotiate | None = None
        self._client: MilterClient | None = None
        self._connecting: Deferred[MilterClient] | None = None
        self._waiters: list[Deferred[MilterClient]] = []
        self._broken: str | None = None
        self._message_over = False
        self._closed = False

    @classmethod
    def spec(
        cls,
        address: str | IStreamClientEndpoint,
        *,
        name: str | None = None,
        timeout: float = FilterSpec.timeout,
        fallback: FilterVerdict | None = None,
        dry_run: bool = False,
        after_changes: bool = False,
        when: When | Mapping[str, Any] | None = None,
        **options: Any,
    ) -> FilterSpec:
        """A chain member that makes one RemoteMilter per MTA connection.

        ``options`` go to the constructor: ``actions``, ``macros``,
        ``leading_space``, ``rejected_recipients``, ``offer``, ``frame_limit``,
        ``reactor``. The address is checked now, so a typo fails at startup.
        """
        label = name or (address if isinstance(address, str) else repr(address))
        if isinstance(address, str):
            check_milter_address(address)
        fallback = fallback if fallback is not None else TempFail()
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigurationError(
                f"filter {label}: unknown remote option {sorted(unknown)[0]!r}; known: {', '.join(sorted(_OPTIONS))}"
            )
        options.setdefault("actions", ALL_ACTIONS)
        options["actions"] = _actions(options["actions"])
        options["macros"] = _macro_requests(options.get("macros"))
        factory: Callable[[], IMilter] = functools.partial(
            cls, address, name=label, timeout=timeout, fallback=fallback, **options
        )
        return FilterSpec(
            factory, name=label, timeout=timeout, fallback=fallback, dry_run=dry_run, after_changes=after_changes,
            when=when,
        )

    @property
    def _reactor(self) -> Any:
        """The reactor given, else the global one (imported only when first needed)."""
        if self._given_reactor is None:
            from twisted.internet import reactor

            self._given_reactor = reactor
        return self._given_reactor

    # -- negotiation

    def negotiated(self, offer: Negotiate, reply: NegotiateReply) -> None:
        """Learn what the MTA offered the chain (called by the chain, if it supports the hook)."""
        self._mta_offer = offer

    def remote_offer(self) -> Negotiate:
        """The OPTNEG offer sent to the remote: the configured actions and every option served here."""
        if self._offer is not None:
            return self._offer
        version = PROTOCOL_VERSION if self._mta_offer is None else min(self._mta_offer.version, PROTOCOL_VERSION)
        protocol = _SERVED | (ProtocolFlag.RCPT_REJECTED if self.rejected_recipients else ProtocolFlag.NONE)
        return Negotiate(version, self.actions | Action.SET_MACRO_LIST, protocol)

    # -- callbacks

    def connect(self, command: Connect) -> Result:
        """Forward CONNECT (connecting to the remote first)."""
        return self._forward(command)

    def helo(self, command: Helo) -> Result:
        """Forward HELO."""
        return self._forward(command)

    def mail_from(self, command: MailFrom) -> Result:
        """Forward MAIL; a new message begins."""
        self._message_over = False
        return self._forward(command)

    def rcpt_to(self, command: RcptTo) -> Result:
        """Forward RCPT (a recipient the MTA rejected only if the remote asked for those)."""
        return self._forward(command)

    def data(self, command: Data) -> Result:
        """Forward DATA."""
        return self._forward(command)

    def header(self, command: Header) -> Result:
        """Forward one header, its value adapted to the remote's leading-space choice."""
        return self._forward(command)

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        """Forward EOH."""
        return self._forward(command)

    def body(self, command: BodyChunk) -> Result:
        """Forward one body chunk; Skip once the remote wants no more."""
        return self._forward(command)

    def unknown(self, command: Unknown) -> Result:
        """Forward an unrecognised SMTP command."""
        return self._forward(command)

    def end_of_message(self, changes: Changes) -> Result:
        """Forward end of message; the remote's changes are recorded on ``changes``."""
        return self._forward(EndOfMessage(), changes)

    def abort(self) -> Result:
        """Forward ABORT."""
        self._message_over = False
        if self._broken is None and (self._client is not None or self._connecting is not None):
            self._ready().addCallback(lambda client: client.abort()).addErrback(lambda _: None)
        return None

    def reset(self) -> Result:
        """Nothing to do: the remote milter tracks its messages from the commands it is sent."""
        return None

    def close(self) -> Result:
        """Send QUIT and close the remote connection (drop it if it still owes a reply)."""
        self._closed = True
        if self._client is not None:
            if self._client.pending:
                self._client.close()
            else:
                self._client.quit()
        elif self._connecting is not None:
            self._connecting.cancel()
        return None

    # -- forwarding

    def _forward(self, command: Command, changes: Changes | None = None) -> Result:
        if self._broken is not None:
            return self._fallback
        if self._message_over and isinstance(command, _IN_MESSAGE):
            return _CONTINUE
        view = self.macros
        inner = self._ready().addCallback(self._send, command, view, changes)
        # Cancelling ``outer`` (an earlier filter refused, or the chain's timeout) leaves
        # ``inner`` alone: the command still goes out and its reply is read and dropped,
        # so the remote session stays in step.
        outer: Deferred[FilterVerdict | None] = Deferred(lambda _: None)

        def deliver(result: object) -> None:
            if isinstance(result, Failure):
                self._failed(result, COMMAND_NAMES[type(command)])
                if not outer.called:
                    outer.errback(result)
            elif not outer.called:
                outer.callback(cast(FilterVerdict, result))

        inner.addBoth(deliver)
        if not outer.called:
            outer.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out(command))
        return outer

    def _ready(self) -> Deferred[MilterClient]:
        """A fresh Deferred firing with the connected client; cancelling it leaves the connection be."""
        if self._client is not None:
            return succeed(self._client)
        waiter: Deferred[MilterClient] = Deferred()
        self._waiters.append(waiter)
        if self._connecting is None:
            address = self._address
            endpoint = milter_endpoint(address, self._reactor, self._timeout) if isinstance(address, str) else address
            self._connecting = connect_milter(
                endpoint, self._reactor, self.remote_offer(), timeout=self._timeout, frame_limit=self._frame_limit,
            )
            self._connecting.addCallbacks(self._connected, self._not_connected)
        return waiter

    def _connected(self, client: MilterClient) -> None:
        self._connecting = None
        if self._closed or self._broken is not None:
            client.quit()
            self._fail_waiters(Failure(MilterUnavailableError("closed before the remote milter answered")))
            return
        self._client = client
        self.log.debug("remote milter {name} at {address} negotiated {reply!r}",
                       name=self.name, address=self.address, reply=client.negotiated)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(client)

    def _not_connected(self, failure: Failure) -> None:
        self._connecting = None
        self._failed(failure, "connecting")
        self._fail_waiters(failure)

    def _fail_waiters(self, failure: Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    def _send(
        self, client: MilterClient, command: Command, view: MacroView, changes: Changes | None
    ) -> FilterVerdict | Deferred[FilterVerdict]:
        negotiated = client.negotiated
        assert negotiated is not None  # connect_milter hands out negotiated clients only
        remote_space = bool(negotiated.protocol & ProtocolFlag.HEADER_LEADING_SPACE)
        if (
            isinstance(command, RcptTo) and view.get("rcpt_mailer") == "error"
            and not negotiated.protocol & ProtocolFlag.RCPT_REJECTED
        ):
            return _CONTINUE
        if isinstance(command, Header) and remote_space != self.leading_space:
            adapt = add_leading_space if remote_space else strip_leading_space
            command = Header(command.name, adapt(command.value))
        on_progress = changes.progress if changes is not None else None
        sent = client.send(command, self._macro_pairs(command, view, negotiated), on_progress=on_progress)
        return sent.addCallback(self._verdict, command, changes, remote_space)

    def _macro_pairs(
        self, command: Command, view: MacroView, negotiated: NegotiateReply
    ) -> list[tuple[str, str]] | None:
        """The macro values to send before ``command``: those the remote listed, else all visible."""
        stage = MACRO_STAGES.get(command.letter)
        if stage is None:
            return None
        names = negotiated.macros.get(stage)
        if names is None:
            return [(_braced(name), view[name]) for name in view]
        return [(name, view[name]) for name in names if name in view]

    def _verdict(
        self, reply: Reply, command: Command, changes: Changes | None, remote_space: bool
    ) -> FilterVerdict:
        verdict = reply.verdict
        if verdict is None:
            return Skip() if reply.skipped and isinstance(command, BodyChunk) else _CONTINUE
        if isinstance(verdict, Shutdown):
            verdict = _SHUTDOWN
        if not isinstance(verdict, Continue | Accept | Reject | TempFail | Discard | Skip):
            raise MilterUnavailableError(f"remote milter answered {verdict!r}, which no MTA handles")
        if changes is not None and isinstance(verdict, Continue | Accept):
            # Try the changes on a scratch recorder first: one the chain refuses
            # fails the callback with nothing half-recorded.
            self._record(reply, Changes(changes.actions), remote_space)
            self._record(reply, changes, remote_space)
        if isinstance(command, _MESSAGE) and (
            isinstance(verdict, Accept | Discard)
            or (isinstance(verdict, Reject | TempFail) and not isinstance(command, RcptTo))
        ):
            self._message_over = True
        return verdict

    def _record(self, reply: Reply, changes: Changes, remote_space: bool) -> None:
        """Put the remote's end-of-message changes on the chain's recorder, in order."""

        def value(text: str, deleting: bool = False) -> str:
            if remote_space == self.leading_space or (deleting and not text):
                return text
            return add_leading_space(text) if self.leading_space else strip_leading_space(text)

        body: list[bytes] = []
        for edit in reply.modifications:
            if isinstance(edit, AddHeader):
                changes.add_header(edit.name, value(edit.value))
            elif isinstance(edit, InsertHeader):
                changes.insert_header(edit.name, value(edit.value), index=edit.index)
            elif isinstance(edit, ChangeHeader):
                changes.change_header(edit.name, value(edit.value, deleting=True), index=max(edit.index, 1))
            elif isinstance(edit, AddRecipient):
                changes.add_recipient(edit.address, edit.args)
            elif isinstance(edit, DeleteRecipient):
                changes.delete_recipient(edit.address)
            elif isinstance(edit, ChangeFrom):
                changes.change_from(edit.address, edit.args)
            elif isinstance(edit, ReplaceBody):
                body.append(edit.data)
        if body:
            changes.replace_body(b"".join(body))
        if reply.quarantine is not None:
            changes.quarantine(reply.quarantine)

    # -- failure

    def _timed_out(self, command: Command) -> Callable[[object, float], object]:
        def timed_out(result: object, timeout: float) -> object:
            what = COMMAND_NAMES[type(command)]
            self._break(f"gave no reply to {what} within {timeout}s")
            raise TimeoutError(f"remote milter {self.name} gave no reply to {what} within {timeout}s")

        return timed_out

    def _failed(self, failure: Failure, stage: str) -> None:
        if failure.check(CancelledError):
            return
        self._break(f"failed at {stage}: {failure.getErrorMessage()}")

    def _break(self, reason: str) -> None:
        """Give up on the remote for this SMTP session; the fallback answers from now on."""
        if self._broken is not None or self._closed:
            return
        self._broken = reason
        self.log.error(
            "remote milter {name} at {address} {reason}; using fallback {fallback!r} for the rest of this"
            " SMTP session", name=self.name, address=self.address, reason=reason, fallback=self._fallback,
        )
        client, self._client = self._client, None
        if client is not None:
            client.close()
        if self._connecting is not None:
            self._connecting.cancel()


_OPTIONS: Final = frozenset(
    {"actions", "macros", "leading_space", "rejected_recipients", "offer", "frame_limit", "reactor"}
)


#: A chain member proxying to the external milter at an address: RemoteMilter.spec under a short name.
remote_filter = RemoteMilter.spec

