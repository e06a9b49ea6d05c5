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

Besides the example chain in its own order, the lineups of corpus.py put the
same filters in reverse order, a second disclaimer after the first, header
edits before a filter that reports what it was shown, and refusals at each
stage before it; each runs the whole corpus both ways.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from . import differential
from .bench import DAEMON_TROUBLE, POSTFIX_TROUBLE, Bench, TappedMilter
from .corpus import CORPUS, Case, expected, lineups
from .differential import Outcome, Runs

pytestmark = pytest.mark.e2e

#: The stamp examples.header_stamp adds in the suite's Postfix, for a client on 127.0.0.1.
STAMP = "X-Filtered-By: txmilt on mx.txmilt.test (client 127.0.0.1)"
FOOTER = b"-- \r\nThis message was checked by txmilt.\r\n"


def run_corpus(
    bench: Bench,
    milters: Sequence[TappedMilter],
    tokens: Mapping[str, str],
    cases: Sequence[Case] = CORPUS,
    one_connection: bool = False,
) -> dict[str, Outcome]:
    """The ``cases`` through Postfix with ``smtpd_milters`` = ``milters``; held messages released and delivered."""
    bench.use(milters)

    def release() -> None:
        bench.postfix.release()
        bench.postfix.flush()

    return differential.run_corpus(
        cases, tokens, address=bench.postfix.smtp_address, sink=bench.sink, held=bench.postfix.hold_queue,
        release=release, drained=lambda: not bench.postfix.queue(), one_connection=one_connection,
    )


#: The lineups of tests/e2e/corpus.py run through Postfix (placement-edits is a part of edits).
LINEUPS = ("examples", "reversed", "two-footers", "edits", "verdicts")


@pytest.fixture(scope="module")
def daemons(bench: Bench) -> dict[str, TappedMilter]:
    """Every daemon the lineups need, started at once: one per filter by its name, and ``sequential-<lineup>``."""
    unstarted = differential.lineup_daemons([*LINEUPS, "empty-values"])
    return dict(zip(unstarted, bench.start_milters(list(unstarted.values())), strict=True))


@pytest.fixture(scope="module", params=LINEUPS)
def runs(request: pytest.FixtureRequest, bench: Bench, daemons: dict[str, TappedMilter]) -> Runs:
    """The corpus through ``smtpd_milters`` = one daemon per filter of a lineup, then one sequential daemon."""
    label: str = request.param
    tables = lineups()[label]
    listed = [daemons[table["name"]] for table in tables]
    sequential = daemons[f"sequential-{label}"]
    involved = [*listed, sequential]
    postfix_mark = bench.postfix.log_mark()
    daemon_marks = [d.daemon.log_mark() for d in involved]
    tokens = {case.name: bench.token(f"{label}-{case.name}") for case in CORPUS}
    result = Runs(label, tables, run_corpus(bench, listed, tokens), run_corpus(bench, [sequential], tokens), [])
    result.trouble = POSTFIX_TROUBLE.findall(bench.postfix.log_text()[postfix_mark:])
    for daemon, mark in zip(involved, daemon_marks, strict=True):
        result.trouble += [f"[{daemon.name}] {line}" for line in DAEMON_TROUBLE.findall(daemon.daemon.output()[mark:])]
    return result


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_sequential_chain_is_smtpd_milters(runs: Runs, case: Case) -> None:
    """The sequential chain gives the replies and delivers the message that Postfix's own chaining does."""
    listed, chained = runs.listed[case.name], runs.sequential[case.name]
    assert listed.kind == expected(case, runs.tables, stops_at_quarantine=True), listed
    differential.assert_same(chained, listed)


def test_the_filters_did_their_work(runs: Runs) -> None:
    """The comparison is not between two chains that did nothing: each filter left its mark."""
    outcomes = runs.listed
    if runs.lineup == "verdicts":
        refused = outcomes["rcpt-refused"]
        assert refused.rcpt_tos == ("bob@example.net",)
        assert "X-Witness-Envelope: from=<alice@example.org> to=<bob@example.net>" in refused.fields
        assert refused.replies[3][0] == ("reject-rcpt@example.net", (550, "5.7.1 Command rejected"))
        assert any(f.startswith("X-Witness: ") for f in outcomes["mail-accepted"].fields)
        return
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


#: Transactions one after another on one connection: a held, a refused, an aliased and a plain message.
SESSION = ("quarantined-and-aliased", "subject-viagra", "alias", "rcpt-refused", "body-casino-late", "plain")


@pytest.mark.parametrize("label", ["examples", "verdicts"])
def test_one_connection(bench: Bench, daemons: dict[str, TappedMilter], label: str) -> None:
    """Several messages on one SMTP connection: nothing of one message leaks into the next, as with Postfix's own."""
    cases = [case for case in CORPUS if case.name in SESSION]
    listed = [daemons[table["name"]] for table in lineups()[label]]
    tokens = {case.name: bench.token(f"session-{label}-{case.name}") for case in cases}
    alone = run_corpus(bench, listed, tokens, cases, one_connection=True)
    chained = run_corpus(bench, [daemons[f"sequential-{label}"]], tokens, cases, one_connection=True)
    for case in cases:
        assert alone[case.name].kind == expected(case, lineups()[label], stops_at_quarantine=True), case.name
        differential.assert_same(chained[case.name], alone[case.name])


def test_empty_header_value(bench: Bench, daemons: dict[str, TappedMilter]) -> None:
    """A header added with an empty value is stored, and shown to the filters after, as Postfix does alone.

    Alone, Postfix stores 'X-Added-Empty: ' (milter8.c: without SMFIP_HDR_LEADSPC it writes name, ':', ' ',
    value). In a chain with a leading_space member (the Witness here, or any remote member) the chain
    negotiates LEADSPC and must add that space itself, also to an empty value (this test found that it did not).
    """
    cases = [case for case in CORPUS if case.name == "plain"]
    listed = [daemons[table["name"]] for table in lineups()["empty-values"]]
    tokens = {"plain": bench.token("empty-values")}
    alone = run_corpus(bench, listed, tokens, cases)["plain"]
    chained = run_corpus(bench, [daemons["sequential-empty-values"]], tokens, cases)["plain"]
    assert {"X-Added-Empty: ", "X-Inserted-Empty: "} <= set(alone.fields)
    differential.assert_same(chained, alone)


def test_nothing_went_wrong(runs: Runs) -> None:
    """Neither Postfix nor a daemon logged a warning or an error during the runs."""
    assert not runs.trouble, "\n".join(runs.trouble)


def _body(message: bytes) -> bytes:
    return message.partition(b"\r\n\r\n")[2]


CORPUS_BY_NAME = {case.name: case for case in CORPUS}
