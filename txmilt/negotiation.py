"""Option negotiation (PROTOCOL.md §4): what a filter needs, the reply to an offer, and checking a reply.

Pure functions over the OPTNEG messages; the sessions and the chain use them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from txmilt.errors import NegotiationError, ProtocolError, RemoteProtocolError
from txmilt.messages import (
    INTERNAL_PROTOCOL_BITS,
    PROTOCOL_VERSION,
    Action,
    BodyChunk,
    Connect,
    Data,
    EndOfHeaders,
    Header,
    Helo,
    MacroStage,
    MailFrom,
    Negotiate,
    NegotiateReply,
    ProtocolFlag,
    RcptTo,
    Unknown,
)

#: The flag that switches each command off (``SMFIP_NO*``).
NO_FLAG: Final[Mapping[type, ProtocolFlag]] = {
    Connect: ProtocolFlag.NO_CONNECT,
    Helo: ProtocolFlag.NO_HELO,
    MailFrom: ProtocolFlag.NO_MAIL,
    RcptTo: ProtocolFlag.NO_RCPT,
    Data: ProtocolFlag.NO_DATA,
    Header: ProtocolFlag.NO_HEADERS,
    EndOfHeaders: ProtocolFlag.NO_EOH,
    BodyChunk: ProtocolFlag.NO_BODY,
    Unknown: ProtocolFlag.NO_UNKNOWN,
}

#: The flag that silences the reply to each command (``SMFIP_NR_*``).
NO_REPLY_FLAG: Final[Mapping[type, ProtocolFlag]] = {
    Connect: ProtocolFlag.NR_CONNECT,
    Helo: ProtocolFlag.NR_HELO,
    MailFrom: ProtocolFlag.NR_MAIL,
    RcptTo: ProtocolFlag.NR_RCPT,
    Data: ProtocolFlag.NR_DATA,
    Header: ProtocolFlag.NR_HEADER,
    EndOfHeaders: ProtocolFlag.NR_EOH,
    BodyChunk: ProtocolFlag.NR_BODY,
    Unknown: ProtocolFlag.NR_UNKNOWN,
}

#: Protocol bits a milter may ask for without the MTA noticing when they are missing.
OPTIONAL_PROTOCOL_BITS: Final = ProtocolFlag(
    sum(NO_FLAG.values()) | sum(NO_REPLY_FLAG.values()) | ProtocolFlag.SKIP
)
#: Events never negotiated away: the session needs MAIL to see where messages begin.
TRACKING_EVENTS: Final = ProtocolFlag.NO_MAIL

@dataclass(frozen=True)
class Requirements:
    """What a filter (or a chain of them) needs from the MTA.

    ``protocol`` bits must be granted (leading space, rejected recipients);
    ``optional`` bits (events switched off, replies silenced, SKIP) are taken
    where the MTA offers them. NO_MAIL is never granted, required or not: the
    session needs MAIL to see where messages begin.
    """

    actions: Action = Action.NONE
    protocol: ProtocolFlag = ProtocolFlag.NONE
    optional: ProtocolFlag = ProtocolFlag.NONE
    macros: Mapping[MacroStage, tuple[str, ...]] = field(default_factory=dict)


def offered(offer: Negotiate) -> tuple[Action, ProtocolFlag]:
    """The actions and protocol bits an offer really grants (libmilter's defaults for 0)."""
    actions = offer.actions or Action(0x0F)
    protocol = (offer.protocol or ProtocolFlag(0x3F)) & ~INTERNAL_PROTOCOL_BITS
    return actions, protocol


def _flag_names(flags: enum.IntFlag) -> str:
    named = [flag for flag in type(flags) if flag.value and flag in flags]
    rest = int(flags) & ~sum(int(flag) for flag in named)
    return ", ".join([str(flag.name) for flag in named] + ([hex(rest)] if rest else []))


def negotiate(offer: Negotiate, needs: Requirements) -> NegotiateReply:
    """The OPTNEG reply for ``needs``; NegotiationError if the MTA lacks something needed."""
    if offer.version < 2:
        raise NegotiationError(f"MTA offers protocol version {offer.version}; version 2 or later is needed")
    actions, protocol = offered(offer)
    wanted_actions = needs.actions
    if needs.macros:
        wanted_actions |= Action.SET_MACRO_LIST
    missing = wanted_actions & ~actions
    if missing:
        raise NegotiationError(f"MTA does not offer actions {_flag_names(missing)} (it offers {actions:#x})")
    missing_bits = needs.protocol & ~protocol
    if missing_bits:
        raise NegotiationError(
            f"MTA does not offer protocol options {_flag_names(missing_bits)} (it offers {protocol:#x})"
        )
    granted = (needs.protocol | (needs.optional & protocol)) & ~TRACKING_EVENTS
    macros = {stage: tuple(names) for stage, names in needs.macros.items()}
    return NegotiateReply(min(offer.version, PROTOCOL_VERSION), wanted_actions, granted, macros)


def check_negotiation(
    offer: Negotiate, reply: NegotiateReply, error: type[ProtocolError] = RemoteProtocolError
) -> None:
    """Raise ``error`` unless ``reply`` is a legal answer to ``offer`` (as Sendmail checks)."""
    actions, protocol = offered(offer)
    if not 2 <= reply.version <= offer.version:
        raise error(f"OPTNEG reply version {reply.version} is not between 2 and the offered {offer.version}")
    if reply.actions & ~actions:
        raise error(f"OPTNEG reply asks for actions {_flag_names(reply.actions & ~actions)} not offered")
    extra = reply.protocol & ~INTERNAL_PROTOCOL_BITS & ~protocol
    if extra:
        raise error(f"OPTNEG reply asks for protocol options {_flag_names(extra)} not offered")
    if reply.macros and not reply.actions & Action.SET_MACRO_LIST:
        raise error("OPTNEG reply lists macros without the SETSYMLIST action")
