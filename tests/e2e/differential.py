"""Running a corpus through an MTA and comparing what became of each message, for differential tests.

An :class:`Outcome` is one transaction, normalised: every SMTP reply, and the
message as the sink got it (envelope, headers, body), or that it was refused.
Only what necessarily differs between two runs of the same message is
normalised away: the queue id and date in the MTA's own Received: header and
in its replies, and the SIZE= it passes on (which counts them).
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .bench import Conversation, converse, split_fields, transact, wait_delivered
from .corpus import Case, lineups
from .milterd import MilterDaemon
from .sink import SinkMessage, SMTPSink

__all__ = ["Outcome", "Runs", "assert_same", "lineup_daemons", "normal_data", "run_corpus"]

#: Where Postfix ("queued as ID") and Sendmail ("2.0.0 ID Message accepted") name the queue id after DATA.
_QUEUE_ID = re.compile(r"queued as (\w+)|^\d\.\d\.\d (\w+)(?= Message accepted)")


@dataclass(frozen=True)
class Outcome:
    """What became of one transaction, normalised: the replies, and the message as the sink got it."""

    replies: tuple[Any, ...]
    #: "delivered", "held" (delivered once released from quarantine) or "refused".
    kind: str
    mail_from: str | None = None
    mail_options: tuple[str, ...] = ()
    rcpt_tos: tuple[str, ...] = ()
    rcpt_options: tuple[tuple[str, ...], ...] = ()
    data: bytes = b""

    @property
    def fields(self) -> list[str]:
        """The delivered header fields."""
        return split_fields(self.data.partition(b"\r\n\r\n")[0])

    @property
    def body(self) -> bytes:
        """The delivered body."""
        return self.data.partition(b"\r\n\r\n")[2]


@dataclass
class Runs:
    """A corpus's outcomes through the MTA's own chaining and through one sequential chain, for one lineup."""

    lineup: str
    tables: list[dict[str, Any]]
    listed: dict[str, Outcome]
    sequential: dict[str, Outcome]
    #: What was logged during the runs that should not have been.
    trouble: list[str]


def queue_id(talk: Conversation) -> str | None:
    """The queue id the MTA named when it took the message (None if it did not)."""
    if not talk.accepted or talk.data is None:
        return None
    found = _QUEUE_ID.search(talk.data[1].decode("utf-8", "replace"))
    return (found.group(1) or found.group(2)) if found else None


def _normal_reply(reply: tuple[int, bytes] | None) -> tuple[int, str] | None:
    if reply is None:
        return None
    code, text = reply[0], reply[1].decode("utf-8", "replace")
    text = _QUEUE_ID.sub(lambda m: m.group(0).replace(m.group(1) or m.group(2), "QUEUEID"), text)
    if code == 220:
        text = re.sub(r";.*", "; DATE", text)  # Sendmail's greeting has the time
    return code, text


def _normal_replies(talk: Conversation) -> tuple[Any, ...]:
    return (
        _normal_reply(talk.greeting), _normal_reply(talk.ehlo), _normal_reply(talk.mail),
        tuple((rcpt, _normal_reply(reply)) for rcpt, reply in talk.rcpt.items()), _normal_reply(talk.data),
    )


def normal_data(data: bytes) -> bytes:
    """The message with the MTA's Received: header without its queue id and date."""
    head, separator, body = data.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    for index, field in enumerate(fields):
        if field.startswith(b"Received: from "):
            field = re.sub(rb"\bid \w+", b"id QUEUEID", field)
            fields[index] = re.sub(rb";\s*[^;]*$", b"; DATE", field)
    return b"\r\n".join(fields) + separator + body


def _outcome(talk: Conversation, held: bool, received: SinkMessage | None) -> Outcome:
    replies = _normal_replies(talk)
    if received is None:
        return Outcome(replies, "refused")
    return Outcome(
        replies, "held" if held else "delivered", mail_from=received.mail_from,
        mail_options=tuple(re.sub(r"^SIZE=\d+$", "SIZE=N", o) for o in received.mail_options),
        rcpt_tos=tuple(received.rcpt_tos), rcpt_options=tuple(tuple(o) for o in received.rcpt_options),
        data=normal_data(received.data),
    )


def run_corpus(
    cases: Sequence[Case],
    tokens: Mapping[str, str],
    *,
    address: tuple[str, int],
    sink: SMTPSink,
    held: Callable[[], Collection[str]],
    release: Callable[[], None],
    drained: Callable[[], bool],
    timeout: float = 30.0,
    one_connection: bool = False,
) -> dict[str, Outcome]:
    """Send every case to the MTA at ``address``; release what it ``held``; collect what ``sink`` got.

    Each case has an SMTP connection of its own, or with ``one_connection`` they
    all go over one, one transaction after another.

    Each message carries its token from ``tokens`` (the same in every run, so a
    filter may see and digest it). Once everything arrived and the MTA's queue
    has ``drained``, the sink must hold nothing else; it is emptied for the next run.
    """
    if one_connection:
        talks = _converse_on_one_connection(address, cases, tokens)
    else:
        talks = {
            case.name: converse(address, case.with_token(tokens[case.name]), sender=case.sender,
                                recipients=case.recipients, mail_options=case.mail_options,
                                rcpt_options=case.rcpt_options)
            for case in cases
        }
    quarantined = set(held())
    if quarantined:
        release()
    outcomes = {}
    for name, talk in talks.items():
        queued = queue_id(talk)
        received = wait_delivered(sink, tokens[name], timeout) if queued is not None else None
        outcomes[name] = _outcome(talk, queued in quarantined, received)
    deadline = time.monotonic() + timeout
    while not drained():
        assert time.monotonic() < deadline, "the MTA's queue did not drain"
        time.sleep(0.05)
    assert len(sink.messages) == sum(o.kind != "refused" for o in outcomes.values()), "unexpected deliveries"
    sink.clear()
    return outcomes


def _converse_on_one_connection(
    address: tuple[str, int], cases: Sequence[Case], tokens: Mapping[str, str]
) -> dict[str, Conversation]:
    """Every case as one transaction of a single SMTP connection; RSET after one that stopped short."""
    client = smtplib.SMTP(timeout=60, local_hostname="client.example.org")
    try:
        greeting = client.connect(*address)
        ehlo = client.ehlo()
        talks = {}
        for case in cases:
            talk = transact(client, Conversation(greeting, ehlo), case.with_token(tokens[case.name]), case.sender,
                            case.recipients, case.mail_options, case.rcpt_options)
            if talk.data is None:
                client.rset()
            talks[case.name] = talk
        client.quit()
        return talks
    finally:
        client.close()


def assert_same(chained: Outcome, listed: Outcome) -> None:
    """The chain's outcome is the MTA's own chaining's, part by part (so a failure names the part)."""
    assert chained.replies == listed.replies
    assert (chained.kind, chained.mail_from, chained.rcpt_tos) == (listed.kind, listed.mail_from, listed.rcpt_tos)
    assert (chained.mail_options, chained.rcpt_options) == (listed.mail_options, listed.rcpt_options)
    assert chained.fields == listed.fields
    assert chained.body == listed.body
    assert chained.data == listed.data


def lineup_daemons(labels: Sequence[str], prefix: str = "") -> dict[str, MilterDaemon]:
    """Daemons (not started) for the lineups ``labels``: one per filter, by the filter's name, and one
    running each lineup in sequential order, as ``sequential-<label>``."""
    daemons: dict[str, MilterDaemon] = {}
    for label in labels:
        for table in lineups()[label]:
            if table["name"] not in daemons:
                daemons[table["name"]] = MilterDaemon([table], name=f"{prefix}solo-{table['name']}")
        daemons[f"sequential-{label}"] = MilterDaemon(
            lineups()[label], {"chain_order": "sequential"}, name=f"{prefix}sequential-{label}"
        )
    return daemons
