"""What txmilt-check found, as one JSON-ready dict: the text output is written from the same dict."""

from __future__ import annotations

import base64
import difflib
from collections.abc import Sequence
from typing import Any, TypeAlias

from txmilt.check.message import render_message
from txmilt.check.play import Exchange, Played
from txmilt.check.status import exit_status, verdict_name
from txmilt.conversation import Mail, raw_header_value
from txmilt.messages import (
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Command,
    Connect,
    DeleteRecipient,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    Modification,
    NegotiateReply,
    ProtocolFlag,
    Quarantine,
    RcptTo,
    Reject,
    ReplaceBody,
    TempFail,
    Unknown,
    Verdict,
)
from txmilt.mta import MTAProfile
from txmilt.session import COMMAND_NAMES, NO_FLAG, NO_REPLY_FLAG

__all__ = ["JSON", "check_report", "describe_command", "milter_report", "smtp_reply"]

JSON: TypeAlias = dict[str, Any]

_OPTIONS = (
    ProtocolFlag.SKIP, ProtocolFlag.RCPT_REJECTED, ProtocolFlag.HEADER_LEADING_SPACE, ProtocolFlag.MDS_256K,
    ProtocolFlag.MDS_1M,
)


def _flag_names(flags: ProtocolFlag | int, members: Sequence[ProtocolFlag]) -> list[str]:
    return [str(member.name) for member in members if flags & member]


def milter_report(address: str, negotiated: NegotiateReply | None) -> JSON:
    """A milter's address and what it negotiated: actions, the events it receives, options, macros."""
    if negotiated is None:
        return {"address": address}
    protocol = negotiated.protocol
    return {
        "address": address,
        "version": negotiated.version,
        "actions": [str(action.name) for action in type(negotiated.actions) if action & negotiated.actions],
        "events": [COMMAND_NAMES[kind] for kind, flag in NO_FLAG.items() if not protocol & flag],
        "no_reply": [COMMAND_NAMES[kind] for kind, flag in NO_REPLY_FLAG.items() if protocol & flag],
        "options": _flag_names(protocol, _OPTIONS),
        "macros": {MacroStage(stage).name.lower(): list(names) for stage, names in sorted(negotiated.macros.items())},
    }


def smtp_reply(verdict: Verdict | None) -> list[str]:
    """The custom SMTP reply a refusal carries, line by line (none without one)."""
    if isinstance(verdict, Reject | TempFail) and verdict.custom:
        return verdict.reply_text().replace("%%", "%").split("\r\n")
    return []


def describe_command(command: Command, leading_space: bool = False) -> str:
    """What a command carries, in a few words (``<alice@example.org>``, ``Subject: Hi``, ``812 bytes``).

    A header reads as in the message: ``leading_space`` says whether its value
    was sent with the space after the colon.
    """
    if isinstance(command, Connect):
        return f"{command.hostname} [{command.address}]" if command.address else command.hostname
    if isinstance(command, Helo):
        return command.name
    if isinstance(command, MailFrom | RcptTo):
        return " ".join((command.address, *command.args))
    if isinstance(command, Header):
        return f"{command.name}:{command.value if leading_space else raw_header_value(command.value)}"
    if isinstance(command, BodyChunk):
        return f"{len(command.data)} bytes"
    if isinstance(command, Unknown):
        return command.line
    return ""


def _change(change: Modification, leading_space: bool) -> JSON:
    if isinstance(change, AddHeader | InsertHeader | ChangeHeader):
        value = change.value if leading_space else raw_header_value(change.value)
        entry: JSON = {"name": change.name, "value": change.value, "header": f"{change.name}:{value}"}
        if isinstance(change, AddHeader):
            return {"change": "add_header", **entry}
        kind = "insert_header" if isinstance(change, InsertHeader) else "change_header"
        if isinstance(change, ChangeHeader) and not change.value:
            kind = "delete_header"
        return {"change": kind, "index": change.index, **entry}
    if isinstance(change, ChangeFrom):
        return {"change": "change_from", "address": change.address, "args": list(change.args or ())}
    if isinstance(change, AddRecipient):
        return {"change": "add_recipient", "address": change.address, "args": list(change.args or ())}
    if isinstance(change, DeleteRecipient):
        return {"change": "delete_recipient", "address": change.address}
    if isinstance(change, ReplaceBody):
        return {"change": "replace_body", "bytes": len(change.data)}
    assert isinstance(change, Quarantine)
    return {"change": "quarantine", "reason": change.reason}


def _changes(milter: int, modifications: Sequence[Modification], leading_space: bool = False) -> list[JSON]:
    """One entry per change; a body replaced in several packets is one change."""
    out: list[JSON] = []
    for change in modifications:
        entry = _change(change, leading_space)
        if entry["change"] == "replace_body" and out and out[-1]["change"] == "replace_body":
            out[-1]["bytes"] += entry["bytes"]
            continue
        out.append({"milter": milter + 1, **entry})
    return out


def _exchange(exchange: Exchange, leading_space: bool) -> JSON:
    reply = exchange.reply
    entry: JSON = {
        "milter": exchange.milter + 1,
        "command": COMMAND_NAMES[type(exchange.command)],
        "argument": describe_command(exchange.command, leading_space),
        "sent": not reply.skipped,
        "reply": None if reply.verdict is None else verdict_name(reply.verdict),
        "ms": round(exchange.seconds * 1000, 3),
        "macros": None if exchange.macros is None else dict(exchange.macros.pairs),
    }
    if isinstance(exchange.command, BodyChunk):
        entry["bytes"] = len(exchange.command.data)
    if smtp_reply(reply.verdict):
        entry["smtp_reply"] = smtp_reply(reply.verdict)
    if reply.modifications or reply.quarantine is not None:
        changes = reply.modifications + ((Quarantine(reply.quarantine),) if reply.quarantine is not None else ())
        entry["changes"] = len(_changes(exchange.milter, changes))
    if reply.progress:
        entry["progress"] = reply.progress
    return entry


def _leading_space(negotiated: NegotiateReply | None) -> bool:
    return negotiated is not None and bool(negotiated.protocol & ProtocolFlag.HEADER_LEADING_SPACE)


def _deciding(played: Played) -> Exchange | None:
    """The exchange whose reply decided the message, if a milter's answer ended it."""
    outcome = played.outcome
    for exchange in reversed(played.exchanges):
        if exchange.milter == outcome.decided_by and exchange.reply.verdict == outcome.verdict:
            return exchange
    return None


def _diff(before: bytes, after: bytes) -> str:
    def lines(message: bytes) -> list[str]:
        return message.decode("utf-8", "replace").removesuffix("\r\n").split("\r\n")

    diff = difflib.unified_diff(
        lines(before), lines(after), "message as given", "message after the milters", lineterm=""
    )
    return "\n".join(diff)


def check_report(
    addresses: Sequence[str],
    negotiated: Sequence[NegotiateReply | None],
    profile: MTAProfile,
    client: Connect,
    helo: str,
    mail: Mail,
    played: Played,
) -> JSON:
    """Everything one checked message shows: milters, each exchange, the verdict, the changes, the result."""
    outcome = played.outcome
    message = outcome.message
    deciding = _deciding(played)
    status = exit_status(outcome.verdict)
    before = render_message(mail.headers, mail.body)
    after = render_message(message.headers, message.body)
    return {
        "mode": "check",
        "profile": profile.name,
        "milters": [milter_report(a, n) for a, n in zip(addresses, negotiated, strict=True)],
        "client": {"name": client.hostname, "address": client.address, "port": client.port, "helo": helo},
        "envelope": {"sender": mail.sender, "recipients": [address for address, _ in mail.recipients]},
        "stages": [_exchange(e, _leading_space(negotiated[e.milter])) for e in played.exchanges],
        "verdict": {
            "reply": verdict_name(outcome.verdict),
            "smtp_reply": smtp_reply(outcome.verdict),
            "milter": None if outcome.decided_by is None else outcome.decided_by + 1,
            "stage": None if deciding is None else COMMAND_NAMES[type(deciding.command)],
            "argument": None if deciding is None else describe_command(
                deciding.command, _leading_space(negotiated[deciding.milter])
            ),
            "delivered": outcome.delivered,
        },
        "refused_recipients": [
            {"recipient": address, "reply": verdict_name(verdict), "smtp_reply": smtp_reply(verdict)}
            for address, verdict in outcome.refused_recipients
        ],
        "changes": [
            entry for milter, changes in outcome.changes
            for entry in _changes(milter, changes, _leading_space(negotiated[milter]))
        ],
        "result": {
            "sender": message.sender,
            "recipients": [" ".join((address, *args)) for address, args in message.recipients],
            "quarantine": message.quarantined,
            "message": after.decode("utf-8", "replace"),
            "message_base64": base64.b64encode(after).decode("ascii"),
            "diff": _diff(before, after) if outcome.delivered else "",
        },
        "ms": round(sum(exchange.seconds for exchange in played.exchanges) * 1000, 3),
        "exit_status": int(status),
    }
