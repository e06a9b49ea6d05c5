"""Differential: the example chain in sequential order against the same filters listed in ``smtpd_milters``.

One private Postfix runs the corpus of ``tests/e2e/corpus.py`` twice: with
``smtpd_milters`` naming one txmilt daemon per filter of examples/milter.toml,
in order (the MTA chains them itself), and with one txmilt daemon running
those filters with ``chain_order = "sequential"``. Every SMTP reply, every
delivered message (headers, body, envelope as the sink got it) and every held
message (released from the hold queue and delivered) must be the same. Only
what must differ is normalised: the queue id and date in Postfix's own
Received: header and its reply to DATA, and the SIZE= Postfix passes on (the
message size, which counts those). Both runs send the same Message-IDs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from .bench import DAEMON_TROUBLE, POSTFIX_TROUBLE, Bench, Conversation, TappedMilter, split_fields
from .corpus import CORPUS, Case, expected, lineups
from .sink import SinkMessage

pytestmark = pytest.mark.e2e

#: The stamp examples.header_stamp adds in the suite's Postfix, for a client on 127.0.0.1.
STAMP = "X-Filtered-By: txmilt on mx.txmilt.test (client 127.0.0.1)"
FOOTER = b"-- \r\nThis message was checked by txmilt.\r\n"
_QUEUED = re.compile(r"queued as (\w+)")


@dataclass(frozen=True)
class Outcome:
    """What became of one transaction, normalised: the replies, and the message as the sink got it."""

    replies: tuple[Any, ...]
    #: "delivered", "held" (delivered once released) or "refused".
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


def normal_reply(reply: tuple[int, bytes] | None) -> tuple[int, str] | None:
    """An SMTP reply without the queue id Postfix names after DATA."""
    if reply is None:
        return None
    return reply[0], _QUEUED.sub("queued as QUEUEID", reply[1].decode("utf-8", "replace"))


def normal_replies(talk: Conversation) -> tuple[Any, ...]:
    """Every reply of a transaction, normalised."""
    return (
        normal_reply(talk.greeting), normal_reply(talk.ehlo), normal_reply(talk.mail),
        tuple((rcpt, normal_reply(reply)) for rcpt, reply in talk.rcpt.items()), normal_reply(talk.data),
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


def outcome_of(talk: Conversation, held: bool, received: SinkMessage | None) -> Outcome:
    """One transaction's Outcome from its conversation and the sink's copy."""
    replies = normal_replies(talk)
    if received is None:
        return Outcome(replies, "refused")
    return Outcome(
        replies, "held" if held else "delivered", mail_from=received.mail_from,
        mail_options=tuple(re.sub(r"^SIZE=\d+$", "SIZE=N", o) for o in received.mail_options),
        rcpt_tos=tuple(received.rcpt_tos), rcpt_options=tuple(tuple(o) for o in received.rcpt_options),
        data=normal_data(received.data),
    )


def run_corpus(bench: Bench, milters: Sequence[TappedMilter], tokens: Mapping[str, str]) -> dict[str, Outcome]:
    """Send every case through Postfix with ``smtpd_milters`` = ``milters``; release what is held; collect.

    Each case's message carries its token from ``tokens`` (the same in every run,
    so that a filter may see and digest it); the sink is emptied afterwards.
    """
    bench.use(milters)
    talks: dict[str, Conversation] = {}
    for case in CORPUS:
        talks[case.name] = bench.converse(
            case.with_token(tokens[case.name]), sender=case.sender, recipients=case.recipients,
            mail_options=case.mail_options, rcpt_options=case.rcpt_options,
        )
    held = set(bench.postfix.hold_queue())
    if held:
        bench.postfix.release()
        bench.postfix.flush()
    outcomes = {}
    for name, talk in talks.items():
        queued = _QUEUED.search(talk.data[1].decode()) if talk.accepted and talk.data else None
        received = bench.delivered(tokens[name], timeout=30) if queued else None
        outcomes[name] = outcome_of(talk, queued is not None and queued.group(1) in held, received)
    bench.not_delivered("-nothing-else-")  # the queue has drained
    assert len(bench.sink.messages) == sum(o.kind != "refused" for o in outcomes.values()), "unexpected deliveries"
    bench.sink.clear()
    return outcomes


@dataclass
class Runs:
    """The corpus's outcomes per configuration, for one lineup of the filters, and what was logged amiss."""

    lineup: str
    tables: list[dict[str, Any]]
    listed: dict[str, Outcome]
    sequential: dict[str, Outcome]
    trouble: list[str]


@pytest.fixture(scope="module")
def solo(bench: Bench) -> Callable[[dict[str, Any]], TappedMilter]:
    """A daemon running one ``[[filter]]`` table, started on first use, by the filter's name."""
    started: dict[str, TappedMilter] = {}

    def daemon(table: dict[str, Any]) -> TappedMilter:
        if table["name"] not in started:
            started[table["name"]] = bench.start_milter(f"solo-{table['name']}", [table])
        return started[table["name"]]

    return daemon


@pytest.fixture(scope="module", params=list(lineups()))
def runs(request: pytest.FixtureRequest, bench: Bench, solo: Callable[[dict[str, Any]], TappedMilter]) -> Runs:
    """The corpus through ``smtpd_milters`` = one daemon per filter of a lineup, then one sequential daemon."""
    label: str = request.param
    tables = lineups()[label]
    listed = [solo(table) for table in tables]
    sequential = bench.start_milter(f"sequential-{label}", tables, daemon={"chain_order": "sequential"})
    daemons = [*listed, sequential]
    postfix_mark = bench.postfix.log_mark()
    daemon_marks = [d.daemon.log_mark() for d in daemons]
    tokens = {case.name: bench.token(f"{label}-{case.name}") for case in CORPUS}
    result = Runs(label, tables, run_corpus(bench, listed, tokens), run_corpus(bench, [sequential], tokens), [])
    result.trouble = POSTFIX_TROUBLE.findall(bench.postfix.log_text()[postfix_mark:])
    for daemon, mark in zip(daemons, daemon_marks, strict=True):
        result.trouble += [f"[{daemon.name}] {line}" for line in DAEMON_TROUBLE.findall(daemon.daemon.output()[mark:])]
    return result


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_sequential_chain_is_smtpd_milters(runs: Runs, case: Case) -> None:
    """The sequential chain gives the replies and delivers the message that Postfix's own chaining does."""
    listed, chained = runs.listed[case.name], runs.sequential[case.name]
    assert listed.kind == expected(case, runs.tables, stops_at_quarantine=True), listed
    assert chained.replies == listed.replies
    assert (chained.kind, chained.mail_from, chained.rcpt_tos) == (listed.kind, listed.mail_from, listed.rcpt_tos)
    assert (chained.mail_options, chained.rcpt_options) == (listed.mail_options, listed.rcpt_options)
    assert chained.fields == listed.fields
    assert chained.body == listed.body
    assert chained.data == listed.data


def test_the_filters_did_their_work(runs: Runs) -> None:
    """The comparison is not between two chains that did nothing: each filter left its mark."""
    outcomes = runs.listed
    assert all(STAMP in o.fields for o in outcomes.values() if o.kind == "delivered")
    assert outcomes["multipart-mixed"].body != _body(CORPUS_BY_NAME["multipart-mixed"].message)
    plain = outcomes["plain"]
    if runs.lineup == "edits":
        assert "Date: Sat, 21 Nov 2026 08:00:00 +0000" not in plain.fields
        assert {"X-Inserted: at 1", "X-Added: added", "To: Changed <changed@example.net>"} <= set(plain.fields)
        assert all(any(f.startswith("X-Witness: headers=") for f in o.fields) for o in outcomes.values())
        return
    assert outcomes["alias"].rcpt_tos == ("alice@example.com", "bob@example.com")
    refusal = outcomes["subject-viagra"].replies[-1]
    assert refusal[0] == 550 and "Rejected: the subject contains 'VIAGRA'." in refusal[1]
    held = outcomes["quarantined-and-aliased"]
    if runs.lineup == "reversed":
        assert plain.body.endswith(FOOTER)
        assert held.rcpt_tos == ("alice@example.com", "bob@example.com", "bob@example.net")
        assert STAMP in held.fields and held.body.endswith(FOOTER)
    elif runs.lineup == "examples":
        assert plain.body.endswith(FOOTER)
        # Postfix ends the milters' pass at the quarantine: no alias, footer or stamp.
        assert held.rcpt_tos == ("sales@example.com", "bob@example.net")
        assert STAMP not in held.fields and not held.body.endswith(FOOTER)
    else:
        # The second disclaimer saw the first one's footer.
        assert plain.body.endswith(b"\r\n-- \r\nFirst footer.\r\n\r\n-- \r\nSecond footer.\r\n")


def test_nothing_went_wrong(runs: Runs) -> None:
    """Neither Postfix nor a daemon logged a warning or an error during the runs."""
    assert not runs.trouble, "\n".join(runs.trouble)


def _body(message: bytes) -> bytes:
    return message.partition(b"\r\n\r\n")[2]


CORPUS_BY_NAME = {case.name: case for case in CORPUS}
