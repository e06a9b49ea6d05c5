"""What the MTAs do that milters rely on: default macros per stage, profiles, and how they apply changes.

Pure data and functions (no Twisted): the chain uses them to ask for macros
without losing the MTA's defaults and to replay an edited message to a later
filter; ``txmilt.testing`` and ``txmilt.check`` use them to model the MTA.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from txmilt.messages import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    MAX_BODY_CHUNK,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    InsertHeader,
    MacroStage,
    Modification,
    Negotiate,
    Quarantine,
    ReplaceBody,
)


class MTA(enum.Enum):
    """An MTA whose milter behaviour txmilt models."""

    POSTFIX = "Postfix"
    SENDMAIL = "Sendmail"


_TLS: Final = ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}")

#: The macros each MTA sends at each stage when the milter asks for no list of its own
#: (Postfix's ``milter_*_macros`` defaults, Sendmail's ``confMILTER_MACROS_*`` of cf/m4/cfhead.m4).
DEFAULT_MACROS: Final[Mapping[MTA, Mapping[MacroStage, tuple[str, ...]]]] = types.MappingProxyType({
    MTA.POSTFIX: types.MappingProxyType({
        MacroStage.CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
        MacroStage.HELO: _TLS,
        MacroStage.MAIL: ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}",
                          "{mail_mailer}"),
        MacroStage.RCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
        MacroStage.DATA: ("i",),
        MacroStage.END_OF_HEADERS: ("i",),
        MacroStage.END_OF_MESSAGE: ("i",),
    }),
    MTA.SENDMAIL: types.MappingProxyType({
        MacroStage.CONNECT: ("j", "_", "{daemon_name}", "{if_name}", "{if_addr}"),
        MacroStage.HELO: _TLS,
        MacroStage.MAIL: ("i", "{auth_type}", "{auth_authen}", "{auth_ssf}", "{auth_author}", "{mail_mailer}",
                          "{mail_host}", "{mail_addr}"),
        MacroStage.RCPT: ("{rcpt_mailer}", "{rcpt_host}", "{rcpt_addr}"),
        MacroStage.END_OF_MESSAGE: ("{msg_id}",),
    }),
})


@dataclass(frozen=True)
class MTAProfile:
    """How one MTA talks to milters: what it offers, which macros it sends and when.

    Build variants with ``dataclasses.replace(POSTFIX, ...)``. Macro names in
    ``macro_names`` are spelled as the MTA sends them (``j``, ``{daemon_name}``);
    keys of ``macro_values`` are names without braces.
    """

    #: A label for messages and reprs.
    name: str
    #: The OPTNEG offer.
    offer: Negotiate
    #: Macro names sent before each stage's command unless the milter asked for others.
    macro_names: Mapping[MacroStage, tuple[str, ...]]
    #: Values of the macros that do not depend on the session (names without braces).
    macro_values: Mapping[str, str]
    #: Macro names sent before UNKNOWN, or None to send no macro packet there.
    unknown_macro_names: tuple[str, ...] | None = None
    #: Send a macro packet before every command that has one, even for an empty list (Postfix).
    always_send_macros: bool = False
    #: An empty list in the milter's OPTNEG reply means "use the default list" (Postfix), not "none".
    empty_request_means_default: bool = False
    #: Send ABORT after every finished message (Postfix).
    abort_after_message: bool = False
    #: Send ``D L`` (EOH list) before every header and ``D B`` (EOM list) before every body chunk (Postfix).
    macros_before_every_header_and_chunk: bool = False
    #: The queue id macro ``i`` has a value only from the first RCPT of a message on (Postfix).
    queue_id_from_rcpt: bool = False
    #: Close the milter socket without QUIT after a non-continue verdict at CONNECT or HELO (Postfix).
    drop_after_connection_verdict: bool = False
    #: Largest BODY packet the MTA sends.
    body_chunk_size: int = MAX_BODY_CHUNK
    #: Whose rules place added headers (see ``where_added``).
    mta: MTA = MTA.POSTFIX


#: Postfix 3.x with its default ``milter_*_macros`` (PROTOCOL.md §6).
POSTFIX: Final = MTAProfile(
    name="Postfix",
    offer=Negotiate(6, ALL_ACTIONS, ALL_PROTOCOL),
    macro_names=DEFAULT_MACROS[MTA.POSTFIX],
    macro_values=types.MappingProxyType({
        "j": "mx.example.net",
        "daemon_name": "mx.example.net",
        "daemon_addr": "192.0.2.1",
        "v": "Postfix 3.7.11",
        "i": "4XkZ1T0abcz",
        "mail_mailer": "smtp",
        "rcpt_mailer": "smtp",
    }),
    unknown_macro_names=(),
    always_send_macros=True,
    empty_request_means_default=True,
    abort_after_message=True,
    macros_before_every_header_and_chunk=True,
    queue_id_from_rcpt=True,
    drop_after_connection_verdict=True,
)

#: Sendmail 8.14-8.18 with the default ``confMILTER_MACROS_*`` of cf/m4/cfhead.m4 (PROTOCOL.md §6).
SENDMAIL: Final = MTAProfile(
    name="Sendmail",
    mta=MTA.SENDMAIL,
    offer=Negotiate(6, ALL_ACTIONS, ALL_PROTOCOL),
    macro_names=DEFAULT_MACROS[MTA.SENDMAIL],
    macro_values=types.MappingProxyType({
        "j": "mx.example.net",
        "daemon_name": "MTA",
        "if_name": "mx.example.net",
        "if_addr": "192.0.2.1",
        "i": "5A1BcDeF012345",
        "msg_id": "<202401011200.5A1BcDeF012345@mx.example.net>",
        "v": "8.17.1.9",
        "mail_mailer": "esmtp",
        "rcpt_mailer": "esmtp",
    }),
)


#: The macro stage whose list an MTA sends before each command letter (PROTOCOL.md §4.5).
MACRO_STAGES: Final[Mapping[str, MacroStage]] = types.MappingProxyType({
    "C": MacroStage.CONNECT,
    "H": MacroStage.HELO,
    "M": MacroStage.MAIL,
    "R": MacroStage.RCPT,
    "T": MacroStage.DATA,
    "N": MacroStage.END_OF_HEADERS,
    "E": MacroStage.END_OF_MESSAGE,
})


def possible_mtas(offer: Negotiate) -> tuple[MTA, ...]:
    """The MTAs that could have made ``offer``: only Postfix offers a version below 6."""
    return (MTA.POSTFIX,) if offer.version < 6 else (MTA.POSTFIX, MTA.SENDMAIL)


def default_macros(offer: Negotiate) -> dict[MacroStage, tuple[str, ...]]:
    """The macros a milter gets at each stage without a list of its own, for every MTA that fits ``offer``.

    Negotiation cannot tell Postfix from Sendmail, so the lists of both are
    joined; asking for a macro an MTA does not have costs nothing (it is not sent).
    """
    merged: dict[MacroStage, tuple[str, ...]] = {}
    for mta in possible_mtas(offer):
        for stage, names in DEFAULT_MACROS[mta].items():
            merged[stage] = union_of_names(merged.get(stage, ()), names)
    return merged


def bare_macro_name(name: str) -> str:
    """A macro name without its braces: ``{client_addr}`` is ``client_addr``; ``j`` stays ``j``."""
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


def union_of_names(*lists: Iterable[str]) -> tuple[str, ...]:
    """Macro names of all ``lists`` in first-seen order; ``x`` and ``{x}`` count as one name."""
    seen: set[str] = set()
    out: list[str] = []
    for names in lists:
        for name in names:
            key = bare_macro_name(name)
            if key not in seen:
                seen.add(key)
                out.append(name)
    return tuple(out)


def mta_of_version(version: str | None) -> MTA | None:
    """Which MTA sent the ``v`` macro ``version`` (Postfix: ``Postfix 3.7.11``; Sendmail: ``8.17.1``)."""
    if not version:
        return None
    if version.lower().startswith("postfix"):
        return MTA.POSTFIX
    if version[0].isdigit():
        return MTA.SENDMAIL
    return None


# ------------------------------------------------------------------ editing


def bare_address(address: str) -> str:
    """An envelope address without its angle brackets."""
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def _as_is(value: str) -> str:
    return value


#: A header list as the MTA keeps it: ``None`` stands for its own Received: header, hidden from milters.
HeaderList = list["tuple[str, str] | None"]


def where_added(keys: Sequence[str], name: str, mta: MTA | None) -> int:
    """Where an MTA puts a header added by name (ADDHEADER, or CHGHEADER at a missing occurrence).

    ``keys`` are the lower-case names of its list in order. Postfix appends;
    Sendmail puts a header whose name is already there right before the first
    of that name (its headers.c ``addheader``), and appends the others.
    """
    if mta is MTA.SENDMAIL:
        key = name.lower()
        for position, existing in enumerate(keys):
            if existing == key:
                return position
    return len(keys)


def apply_header_edit(
    headers: HeaderList, edit: Modification, value: Callable[[str], str] = _as_is, mta: MTA | None = None
) -> None:
    """Apply one header modification to ``headers`` as ``mta`` does (Postfix if None; PROTOCOL.md §3.3).

    ``headers[0]`` is normally ``None``, the MTA's hidden Received: header, which
    INSHEADER indexes count and CHGHEADER indexes do not; ``value`` turns a value
    from the wire into the form kept in ``headers``. (Sendmail also counts the
    hidden default headers of its .cf in INSHEADER indexes; those are not modelled.)
    """
    if isinstance(edit, AddHeader):
        headers.insert(where_added(_keys(headers), edit.name, mta), (edit.name, value(edit.value)))
    elif isinstance(edit, InsertHeader):
        headers.insert(min(edit.index, len(headers)), (edit.name, value(edit.value)))
    elif isinstance(edit, ChangeHeader):
        key = edit.name.lower()
        found = [n for n, h in enumerate(headers) if h is not None and h[0].lower() == key]
        index = max(edit.index, 1)
        if index <= len(found):
            if edit.value:
                headers[found[index - 1]] = (edit.name, value(edit.value))
            else:
                del headers[found[index - 1]]
        elif edit.value:
            headers.insert(where_added(_keys(headers), edit.name, mta), (edit.name, value(edit.value)))


def _keys(headers: HeaderList) -> list[str]:
    return [h[0].lower() if h is not None else "" for h in headers]


@dataclass
class Message:
    """A message as the MTA holds it while milters change it.

    Header values are kept in one form throughout (as the milter saw them, or
    as stored without the space after the colon: the caller's choice).
    """

    #: The headers, in order, as (name, value).
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: The body, CRLF line ends.
    body: bytes = b""
    #: The envelope sender, normally in angle brackets.
    sender: str = ""
    #: The sender's ESMTP arguments.
    sender_args: tuple[str, ...] = ()
    #: The envelope recipients with their ESMTP arguments.
    recipients: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    #: The quarantine reason, if a milter quarantined the message.
    quarantined: str | None = None


def apply_modifications(
    message: Message, modifications: Sequence[Modification], value: Callable[[str], str] = _as_is,
    mta: MTA | None = None,
) -> None:
    """Apply one milter's end-of-message modifications to ``message``, in order, as ``mta`` does.

    The first REPLBODY packet replaces the body and later ones append to it;
    DELRCPT removes a recipient whatever its angle brackets.
    """
    headers: HeaderList = [None, *message.headers]
    replaced = False
    for change in modifications:
        if isinstance(change, AddHeader | InsertHeader | ChangeHeader):
            apply_header_edit(headers, change, value, mta)
        elif isinstance(change, ChangeFrom):
            message.sender, message.sender_args = change.address, change.args or ()
        elif isinstance(change, AddRecipient):
            message.recipients.append((change.address, change.args or ()))
        elif isinstance(change, DeleteRecipient):
            gone = bare_address(change.address)
            message.recipients = [r for r in message.recipients if bare_address(r[0]) != gone]
        elif isinstance(change, ReplaceBody):
            message.body = (message.body if replaced else b"") + change.data
            replaced = True
        elif isinstance(change, Quarantine):
            message.quarantined = change.reason
    message.headers = [h for h in headers if h is not None]
