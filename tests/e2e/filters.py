"""Filters for the end-to-end tests, chosen and configured from a ``twistd milter`` TOML config.

Every filter takes its behaviour from keyword options (``options = {...}`` in a
``[[filter]]`` table) and picks what to do per message from what the SMTP
client sent (client address, HELO name, sender, recipient, Subject), so one
daemon serves many tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from txmilt.messages import (
    Accept,
    Action,
    BodyChunk,
    Connect,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    Header,
    Helo,
    MacroStage,
    MailFrom,
    RcptTo,
    Reject,
    Skip,
    TempFail,
)
from txmilt.milter import Changes, FilterVerdict, Milter, Result

#: Every modification, without SETSYMLIST (the chain asks for that itself when it sends macro lists).
EDIT_ACTIONS = (
    Action.ADD_HEADERS | Action.CHANGE_BODY | Action.ADD_RECIPIENTS | Action.DELETE_RECIPIENTS
    | Action.CHANGE_HEADERS | Action.QUARANTINE | Action.CHANGE_FROM | Action.ADD_RECIPIENTS_WITH_ARGS
)

#: The stages a Verdicts rule can name, and what its ``match`` is looked for in.
STAGES = ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom")


def make_verdict(rule: Mapping[str, Any]) -> FilterVerdict:
    """The verdict a rule names: ``verdict`` plus, for reject/tempfail, optional ``code``, ``status``, ``text``."""
    name = rule["verdict"]
    if name in ("reject", "tempfail"):
        cls = Reject if name == "reject" else TempFail
        if "text" in rule or "code" in rule or "status" in rule:
            text = rule.get("text", ())
            return cls(text if isinstance(text, str) else tuple(text), code=rule.get("code"), status=rule.get("status"))
        return cls()
    simple: dict[str, FilterVerdict] = {
        "continue": Continue(), "accept": Accept(), "discard": Discard(), "skip": Skip(),
    }
    return simple[name]


class Verdicts(Milter):
    """Answers a rule's verdict at its stage when the stage's text contains the rule's ``match``.

    ``rules`` is a list of tables ``{stage, match, verdict[, code, status, text]}``. The text
    looked at: connect, the client address; helo, the HELO name; mail and rcpt, the address;
    header, ``Name: value``; data, eoh and eom, the Subject; body, the chunk.
    """

    def __init__(self, rules: Sequence[Mapping[str, Any]] = ()) -> None:
        for rule in rules:
            if rule["stage"] not in STAGES:
                raise ValueError(f"unknown stage {rule['stage']!r}; known: {', '.join(STAGES)}")
            make_verdict(rule)  # fail at startup, not at the first message
        self.rules = [dict(rule) for rule in rules]
        self.subject = ""

    def _judge(self, stage: str, text: str) -> Result:
        for rule in self.rules:
            if rule["stage"] == stage and rule["match"] in text:
                return make_verdict(rule)
        return None

    def connect(self, command: Connect) -> Result:
        return self._judge("connect", command.address)

    def helo(self, command: Helo) -> Result:
        return self._judge("helo", command.name)

    def mail_from(self, command: MailFrom) -> Result:
        self.subject = ""
        return self._judge("mail", command.address)

    def rcpt_to(self, command: RcptTo) -> Result:
        return self._judge("rcpt", command.address)

    def data(self, command: Data) -> Result:
        return self._judge("data", self.subject)

    def header(self, command: Header) -> Result:
        if command.name.lower() == "subject":
            self.subject = command.value
        return self._judge("header", f"{command.name}: {command.value}")

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        return self._judge("eoh", self.subject)

    def body(self, command: BodyChunk) -> Result:
        return self._judge("body", command.data.decode("utf-8", "replace"))

    def end_of_message(self, changes: Changes) -> Result:
        return self._judge("eom", self.subject)

    def abort(self) -> Result:
        self.subject = ""
        return None


#: Editor operations that are one Changes method called with the listed arguments.
_PLAIN_EDITS = frozenset(
    {"add_header", "insert_header", "change_header", "delete_header", "add_recipient", "delete_recipient",
     "change_from", "quarantine"}
)
_EDITS = _PLAIN_EDITS | {"replace_body", "replace_body_lines", "echo"}


def body_lines(prefix: str, count: int) -> bytes:
    """``count`` numbered CRLF lines starting with ``prefix`` (a body of a predictable size)."""
    return b"".join(f"{prefix} {number:08d}\r\n".encode() for number in range(count))


class Editor(Milter):
    """Makes the end-of-message changes listed for the message's Subject.

    ``edits`` maps a Subject (or ``"*"``, for every message) to a list of operations,
    each a list: ``["add_header", name, value]``, ``["insert_header", name, value, index]``,
    ``["change_header", name, value, index]``, ``["delete_header", name, index]``,
    ``["add_recipient", address]`` or ``[..., address, [args]]``, ``["delete_recipient", address]``,
    ``["change_from", address]`` or ``[..., address, [args]]``, ``["quarantine", reason]``,
    ``["replace_body", text]``, ``["replace_body_lines", prefix, count]`` (see body_lines), and
    ``["echo", name]``: add ``X-Echo-<name>`` holding, as JSON, the values of the headers called
    ``name`` as this filter saw them.
    """

    actions = EDIT_ACTIONS

    def __init__(self, edits: Mapping[str, Sequence[Sequence[Any]]] | None = None) -> None:
        self.edits = {subject: [list(op) for op in ops] for subject, ops in (edits or {}).items()}
        for ops in self.edits.values():
            for op in ops:
                if op[0] not in _EDITS:
                    raise ValueError(f"unknown edit {op[0]!r}; known: {', '.join(sorted(_EDITS))}")
        self.headers: list[tuple[str, str]] = []

    def mail_from(self, command: MailFrom) -> Result:
        self.headers = []
        return None

    def header(self, command: Header) -> Result:
        self.headers.append((command.name, command.value))
        return None

    def abort(self) -> Result:
        self.headers = []
        return None

    def end_of_message(self, changes: Changes) -> Result:
        subject = next((value for name, value in self.headers if name.lower() == "subject"), "").strip()
        for op in [*self.edits.get("*", ()), *self.edits.get(subject, ())]:
            name, args = op[0], op[1:]
            if name == "replace_body":
                changes.replace_body(str(args[0]).encode())
            elif name == "replace_body_lines":
                changes.replace_body(body_lines(str(args[0]), int(args[1])))
            elif name == "echo":
                values = [value for header, value in self.headers if header.lower() == str(args[0]).lower()]
                # With leading_space the filter supplies the space after the colon itself.
                changes.add_header(f"X-Echo-{args[0]}", (" " if self.leading_space else "") + json.dumps(values))
            else:
                getattr(changes, name)(*args)
        self.headers = []
        return None


class SpaceEditor(Editor):
    """An Editor that sees header values with their leading space and supplies it when adding."""

    leading_space = True


class Reporter(Milter):
    """Reports what it saw as JSON in three headers added at end of message.

    ``X-Report-Connection``: the CONNECT and HELO arguments, the connection's macros and
    how many messages this connection has carried; ``X-Report-Message``: the envelope,
    the number of headers, body chunks and bytes, and the body's SHA-256;
    ``X-Report-Macros``: the macros it asked for, per message stage (``null`` when absent).
    With ``skip_body`` it answers Skip to the first body chunk.
    """

    actions = Action.ADD_HEADERS
    macro_requests: ClassVar[Mapping[MacroStage, Sequence[str]]] = {
        MacroStage.CONNECT: ("j", "{client_addr}", "{daemon_name}", "{client_name}"),
        MacroStage.HELO: ("{tls_version}", "{cipher}"),
        MacroStage.MAIL: ("i", "{auth_type}", "{auth_authen}", "{mail_addr}"),
        MacroStage.RCPT: ("i", "{rcpt_addr}", "{rcpt_mailer}"),
        MacroStage.DATA: ("i",),
        MacroStage.END_OF_HEADERS: ("i",),
        MacroStage.END_OF_MESSAGE: ("i", "{msg_id}"),
    }

    def __init__(self, skip_body: bool = False, header_prefix: str = "X-Report") -> None:
        self.skip_body = skip_body
        self.header_prefix = header_prefix
        self.connection: dict[str, Any] = {}
        self.messages = 0
        self._reset()

    def _reset(self) -> None:
        self.message: dict[str, Any] = {"rcpt": [], "headers": 0, "chunks": 0, "bytes": 0}
        self.macros_seen: dict[str, dict[str, str | None]] = {}
        self.digest = hashlib.sha256()

    def _values(self, stage: MacroStage) -> dict[str, str | None]:
        return {name: self.macros.get(name) for name in self.macro_requests.get(stage, ())}

    def _see(self, stage: MacroStage) -> None:
        self.macros_seen[stage.name.lower()] = self._values(stage)

    def connect(self, command: Connect) -> Result:
        self.connection = {"hostname": command.hostname, "family": command.family.value, "address": command.address}
        self.connection["macros"] = self._values(MacroStage.CONNECT)
        return None

    def helo(self, command: Helo) -> Result:
        self.connection["helo"] = command.name
        self.connection["helo_macros"] = self._values(MacroStage.HELO)
        return None

    def mail_from(self, command: MailFrom) -> Result:
        self._reset()
        self.message["mail"] = [command.address, list(command.args)]
        self._see(MacroStage.MAIL)
        return None

    def rcpt_to(self, command: RcptTo) -> Result:
        self.message["rcpt"].append([command.address, list(command.args)])
        self._see(MacroStage.RCPT)
        return None

    def data(self, command: Data) -> Result:
        self._see(MacroStage.DATA)
        return None

    def header(self, command: Header) -> Result:
        self.message["headers"] += 1
        return None

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        self._see(MacroStage.END_OF_HEADERS)
        return None

    def body(self, command: BodyChunk) -> Result:
        self.message["chunks"] += 1
        self.message["bytes"] += len(command.data)
        self.digest.update(command.data)
        return Skip() if self.skip_body else None

    def end_of_message(self, changes: Changes) -> Result:
        self._see(MacroStage.END_OF_MESSAGE)
        self.messages += 1
        reports = {
            "Connection": {**self.connection, "messages": self.messages},
            "Message": {**self.message, "sha256": self.digest.hexdigest()},
            "Macros": self.macros_seen,
        }
        for part, report in reports.items():
            changes.add_header(f"{self.header_prefix}-{part}", json.dumps(report, sort_keys=True))
        self._reset()
        return None

    def abort(self) -> Result:
        self._reset()
        return None


class ClientStamp(Milter):
    """Asks for ``{client_addr}`` alone at connect and adds ``X-Client-Addr`` with the value it got."""

    actions = Action.ADD_HEADERS
    macro_requests: ClassVar[Mapping[MacroStage, Sequence[str]]] = {MacroStage.CONNECT: ("{client_addr}",)}

    def __init__(self) -> None:
        self.client: str | None = None

    def connect(self, command: Connect) -> Result:
        self.client = self.macros.get("client_addr")
        return None

    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header("X-Client-Addr", self.client or "(none)")
        return None


class Witness(Milter):
    """Adds ``X-Witness`` summing up the headers and body it saw (counts and SHA-256 prefixes), and
    ``X-Witness-Envelope`` naming the sender and recipients it was given.

    Put after filters that change the message, it shows whether the MTA (or the
    chain) showed it their changes, and exactly how: header values as stored,
    with the space after the colon; after filters that refuse, which commands
    still reached it.
    """

    actions = Action.ADD_HEADERS
    leading_space = True

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sender = ""
        self.recipients: list[str] = []
        self.headers: list[tuple[str, str]] = []
        self.body_digest = hashlib.sha256()
        self.body_size = 0

    def mail_from(self, command: MailFrom) -> Result:
        self._reset()
        self.sender = command.address
        return None

    def rcpt_to(self, command: RcptTo) -> Result:
        self.recipients.append(command.address)
        return None

    def header(self, command: Header) -> Result:
        self.headers.append((command.name, command.value))
        return None

    def body(self, command: BodyChunk) -> Result:
        self.body_digest.update(command.data)
        self.body_size += len(command.data)
        return None

    def end_of_message(self, changes: Changes) -> Result:
        seen = json.dumps(self.headers).encode("utf-8", "surrogateescape")
        changes.add_header("X-Witness", (
            f" headers={len(self.headers)} {hashlib.sha256(seen).hexdigest()[:16]}"
            f" body={self.body_size} {self.body_digest.hexdigest()[:16]}"
        ))
        changes.add_header("X-Witness-Envelope", f" from={self.sender} to={','.join(self.recipients)}")
        self._reset()
        return None

    def abort(self) -> Result:
        self._reset()
        return None


class Troublemaker(Milter):
    """A coroutine end of message that is slow or fails, chosen by the message's Subject.

    ``delays`` maps a Subject to seconds to wait before continuing; a Subject in
    ``crash`` makes it raise.
    """

    def __init__(self, delays: Mapping[str, float] | None = None, crash: Sequence[str] = ()) -> None:
        self.delays = dict(delays or {})
        self.crash = frozenset(crash)
        self.subject = ""

    def header(self, command: Header) -> Result:
        if command.name.lower() == "subject":
            self.subject = command.value.strip()
        return None

    async def end_of_message(self, changes: Changes) -> FilterVerdict | None:
        subject, self.subject = self.subject, ""
        if subject in self.crash:
            raise RuntimeError(f"Troublemaker crashes for Subject {subject!r}, as configured")
        delay = self.delays.get(subject)
        if delay:
            from twisted.internet import reactor

            await deferLater(cast(IReactorTime, reactor), delay, lambda: None)
        return None
