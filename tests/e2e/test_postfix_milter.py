"""txmilt's ``twistd milter`` daemon behind a real Postfix: verdicts, changes, macros, chains, OpenDKIM.

One private Postfix serves the whole module; each test points it at the
daemon (one per filter configuration, started on first use) it needs. The
daemons run the filters of ``tests/e2e/filters.py`` from TOML configs and are
reached through wire taps, so a test can also check the packets exchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from .bench import Bench, TappedMilter, header_fields, make_message, split_fields
from .filters import body_lines
from .opendkim import OpenDKIM
from .sink import SinkMessage
from .wiretap import Session

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_trouble")]

#: Postfix's own texts for a plain REJECT and TEMPFAIL from a milter.
REJECTED = (550, b"5.7.1 Command rejected")
TEMPFAILED = (451, b"4.7.1 Service unavailable - try again later")
#: The same as Postfix logs them (without the reply code, as regular expressions).
REJECTED_LOG = r"5\.7\.1 Command rejected"
TEMPFAILED_LOG = r"4\.7\.1 Service unavailable - try again later"
#: The smtpd banner and the macro j of the test Postfix.
MX = "mx.txmilt.test"
FILTERS = "tests.e2e.filters"


def _rule(stage: str, match: str, verdict: str, **reply: Any) -> dict[str, Any]:
    return {"stage": stage, "match": match, "verdict": verdict, **reply}


VERDICT_RULES = [
    _rule("connect", "127.0.0.2", "reject"),
    _rule("connect", "127.0.0.3", "tempfail"),
    _rule("connect", "127.0.0.4", "discard"),
    _rule("connect", "127.0.0.5", "reject", code=554, status="5.7.1", text=["go away", "really"]),
    _rule("connect", "127.0.0.6", "tempfail", code=421, status="4.7.0", text=["closing now"]),
    _rule("helo", "reject-helo", "reject"),
    _rule("helo", "tempfail-helo", "tempfail"),
    _rule("helo", "discard-helo", "discard"),
    _rule("helo", "custom-helo", "reject", code=550, status="5.7.1", text=["no HELO", "for you"]),
    _rule("mail", "reject-mail", "reject"),
    _rule("mail", "tempfail-mail", "tempfail"),
    _rule("mail", "discard-mail", "discard"),
    _rule("mail", "custom-mail", "tempfail", code=450, status="4.7.0", text=["try", "again"]),
    _rule("mail", "accept-mail", "accept"),
    _rule("rcpt", "reject-rcpt", "reject"),
    _rule("rcpt", "tempfail-rcpt", "tempfail"),
    _rule("rcpt", "discard-rcpt", "discard"),
    _rule("rcpt", "custom-rcpt", "reject", code=550, status="5.1.1", text=["no such user", "here, sorry"]),
    _rule("header", "X-Verdict: reject", "reject"),
    _rule("body", "TEMPFAIL-BODY", "tempfail"),
    _rule("eom", "reject-eom", "reject"),
    _rule("eom", "tempfail-eom", "tempfail"),
    _rule("eom", "discard-eom", "discard"),
    _rule("eom", "custom-eom", "reject", code=550, status="5.7.0", text=["line one", "100% spam", "line three"]),
]


# -------------------------------------------------------------------- daemons


@pytest.fixture(scope="module")
def verdicts(bench: Bench) -> TappedMilter:
    """One Verdicts filter with the rules above."""
    return bench.start_milter("verdicts", [{"name": "verdicts", "class": f"{FILTERS}:Verdicts",
                                            "options": {"rules": VERDICT_RULES}}])


def _mta_letters(session: Session) -> str:
    """What Postfix sent on one milter connection, without the macro packets."""
    return session.letters("mta").replace("D", "")


def _only_session(milter: TappedMilter) -> Session:
    (session,) = milter.tap.wait_closed(1)
    return session


def _reply(code: int, status: str, *lines: str) -> tuple[int, bytes]:
    """A multi-line reply as smtplib returns it: the text of each line, joined by LF."""
    return code, "\n".join(f"{status} {line}" for line in lines).encode()


# ---------------------------------------------------------------- pass-through


PASS_THROUGH = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>,\r\n"
    b"\tCarol <carol@example.net>\r\n"
    b"Subject: pass-through =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <TOKEN@txmilt.test>\r\n"
    b"Date: Sat, 21 Nov 2026 08:00:00 +0000\r\n"
    b"X-Spacing:   three spaces\r\n"
    b"X-Tight:tight\r\n"
    b"X-Tab:\ttab\r\n"
    b"X-Empty:\r\n"
    b"X-Raw-8bit: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    b"X-Long: " + b"x" * 900 + b"\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"First line.\r\n"
    b".A line that starts with a dot.\r\n"
    b"..Two dots.\r\n"
    b"\r\n"
    b"Trailing spaces   \r\n"
    b"Tab\tinside and a NUL-free 8-bit line: \xc3\xa9t\xc3\xa9\r\n"
    b"Last line without much.\r\n"
)


def test_pass_through_is_byte_identical(bench: Bench, verdicts: TappedMilter) -> None:
    """A filter that reads everything and changes nothing leaves headers and body byte for byte intact."""
    bench.use(verdicts)
    token = bench.token("pass")
    message = PASS_THROUGH.replace(b"TOKEN", token.encode())
    talk = bench.converse(message, recipients=["bob@example.net", "carol@example.net"],
                          mail_options=["BODY=8BITMIME"])
    assert talk.accepted, talk
    received = bench.delivered(token)
    assert received.data.endswith(message)
    prefix = received.data[: -len(message)]
    assert split_fields(prefix.removesuffix(b"\r\n")) == ["Received"]
    session = _only_session(verdicts)
    assert session.letters("milter").replace("c", "") == "O", "the filter answered only Continue"
    assert "L" in _mta_letters(session) and "B" in _mta_letters(session)


def test_large_header_in_one_packet(bench: Bench, verdicts: TappedMilter) -> None:
    """A 55 KB folded header reaches the filter in one packet and the sink unchanged.

    (With any milter configured, Postfix 3.7 cuts a header at about 60 KB, silently,
    before the milter sees it; so bigger headers are not tested here.)
    """
    bench.use(verdicts)
    token = bench.token("large-header")
    folded = "\r\n\t".join(f"word{n:06d} " * 7 for n in range(700))
    message = make_message("large header", token, headers=(f"X-Large: {folded}",))
    talk = bench.converse(message)
    assert talk.accepted, talk
    assert bench.delivered(token).data.endswith(message)
    sizes = [p.size for p in _only_session(verdicts).packets if p.sender == "mta" and p.letter == "L"]
    assert max(sizes) > 55_000


# ------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("source", "greeting", "mail", "logged"),
    [
        pytest.param("127.0.0.2", (554, f"{MX} ESMTP not accepting connections".encode()), REJECTED,
                     f"550 {REJECTED_LOG}", id="reject"),
        pytest.param("127.0.0.3", (220, f"{MX} ESMTP".encode()), TEMPFAILED,
                     f"451 {TEMPFAILED_LOG}", id="tempfail"),
        pytest.param("127.0.0.5", (554, f"{MX} ESMTP not accepting connections".encode()),
                     _reply(554, "5.7.1", "go away", "really"), r"554-5\.7\.1 go away..554 5\.7\.1 really",
                     id="custom-multiline"),
        pytest.param("127.0.0.6", (421, f"{MX} Service unavailable - try again later".encode()), None,
                     r"421 4\.7\.0 closing now", id="custom-421"),
    ],
)
def test_connect_verdicts(
    bench: Bench, verdicts: TappedMilter, source: str, greeting: tuple[int, bytes],
    mail: tuple[int, bytes] | None, logged: str,
) -> None:
    """A refusal at connect refuses the whole SMTP session; Postfix answers later commands with it."""
    bench.use(verdicts)
    mark = bench.postfix.log_mark()
    talk = bench.converse(make_message("connect", bench.token("connect")), source=source)
    assert talk.greeting == greeting
    if mail is not None:
        assert talk.mail == mail
    else:
        assert talk.ehlo is None  # 421: Postfix hung up after the greeting
    bench.wait_for_log(rf"milter-reject: CONNECT from unknown\[{re.escape(source)}\]: {logged}", mark)
    assert _mta_letters(_only_session(verdicts)) == "OC", "Postfix closes the milter socket without QUIT"


@pytest.mark.log_allows(r"returned Discard\(\) from (connect|helo), not a verdict legal there")
@pytest.mark.parametrize(("source", "helo"), [("127.0.0.4", "client.example.org"), ("127.0.0.1", "discard-helo")],
                         ids=["connect", "helo"])
def test_discard_before_mail_is_a_filter_error(bench: Bench, verdicts: TappedMilter, source: str, helo: str) -> None:
    """Discard at connect or helo is not a verdict there: the filter's fallback (tempfail) answers."""
    bench.use(verdicts)
    mark = verdicts.daemon.log_mark()
    talk = bench.converse(make_message("discard-early", bench.token("discard")), source=source, helo=helo)
    assert talk.mail == TEMPFAILED
    verdicts.wait_for_log(r"filter verdicts returned Discard\(\) from (connect|helo), not a verdict legal there;"
                          r" using fallback TempFail", mark)


@pytest.mark.parametrize(
    ("helo", "mail", "logged"),
    [
        pytest.param("reject-helo.example", REJECTED, f"550 {REJECTED_LOG}", id="reject"),
        pytest.param("tempfail-helo.example", TEMPFAILED, f"451 {TEMPFAILED_LOG}", id="tempfail"),
        pytest.param("custom-helo.example", _reply(550, "5.7.1", "no HELO", "for you"),
                     r"550-5\.7\.1 no HELO..550 5\.7\.1 for you", id="custom-multiline"),
    ],
)
def test_helo_verdicts(
    bench: Bench, verdicts: TappedMilter, helo: str, mail: tuple[int, bytes], logged: str
) -> None:
    """A refusal at HELO refuses the rest of the session with the filter's reply."""
    bench.use(verdicts)
    mark = bench.postfix.log_mark()
    talk = bench.converse(make_message("helo", bench.token("helo")), helo=helo)
    assert talk.mail == mail
    bench.wait_for_log(rf"milter-reject: EHLO from unknown\[127\.0\.0\.1\]: {logged}; proto=SMTP helo=<{helo}>", mark)
    bench.wait_for_log(rf"milter-reject: MAIL from unknown\[127\.0\.0\.1\]: {logged}", mark)


@pytest.mark.parametrize(
    ("sender", "mail"),
    [
        pytest.param("reject-mail@example.org", REJECTED, id="reject"),
        pytest.param("tempfail-mail@example.org", TEMPFAILED, id="tempfail"),
        pytest.param("custom-mail@example.org", _reply(450, "4.7.0", "try", "again"), id="custom-multiline"),
    ],
)
def test_mail_verdicts(bench: Bench, verdicts: TappedMilter, sender: str, mail: tuple[int, bytes]) -> None:
    """A refusal at MAIL refuses that transaction; the filter hears nothing more of it."""
    bench.use(verdicts)
    token = bench.token("mail")
    talk = bench.converse(make_message("mail", token), sender=sender)
    assert talk.mail == mail
    assert _mta_letters(_only_session(verdicts)).startswith("OCHM")
    bench.not_delivered(token, settle=0)


def test_mail_discard(bench: Bench, verdicts: TappedMilter) -> None:
    """Discard at MAIL: Postfix accepts the message and silently drops it."""
    bench.use(verdicts)
    mark = bench.postfix.log_mark()
    token = bench.token("discard-mail")
    talk = bench.converse(make_message("mail", token), sender="discard-mail@example.org")
    assert talk.accepted, talk
    bench.wait_for_log(r"milter-discard: MAIL from unknown\[127\.0\.0\.1\]: milter triggers DISCARD action", mark)
    bench.not_delivered(token)


def test_mail_accept_ends_filtering_of_the_message(bench: Bench, verdicts: TappedMilter) -> None:
    """Accept at MAIL: the message is delivered and Postfix sends the filter nothing more of it."""
    bench.use(verdicts)
    token = bench.token("accept-mail")
    talk = bench.converse(make_message("reject-eom", token), sender="accept-mail@example.org")
    assert talk.accepted, talk
    bench.delivered(token)
    session = _only_session(verdicts)
    assert session.letters("milter") == "Occa"
    assert not set(_mta_letters(session)) & set("RTLNBE")


def test_rcpt_refusals_refuse_only_that_recipient(bench: Bench, verdicts: TappedMilter) -> None:
    """Refusals at RCPT refuse one recipient each, with their own replies; the others get the message."""
    bench.use(verdicts)
    mark = bench.postfix.log_mark()
    token = bench.token("rcpt")
    recipients = ["ok@example.net", "reject-rcpt@example.net", "tempfail-rcpt@example.net",
                  "custom-rcpt@example.net", "also-ok@example.net"]
    talk = bench.converse(make_message("rcpt", token), recipients=recipients)
    assert talk.rcpt == {
        "ok@example.net": (250, b"2.1.5 Ok"),
        "reject-rcpt@example.net": REJECTED,
        "tempfail-rcpt@example.net": TEMPFAILED,
        "custom-rcpt@example.net": _reply(550, "5.1.1", "no such user", "here, sorry"),
        "also-ok@example.net": (250, b"2.1.5 Ok"),
    }
    assert talk.accepted, talk
    assert sorted(bench.delivered(token).rcpt_tos) == ["also-ok@example.net", "ok@example.net"]
    bench.wait_for_log(r"milter-reject: RCPT from .*: 550-5\.1\.1 no such user..550 5\.1\.1 here, sorry;"
                       r" from=<alice@example\.org> to=<custom-rcpt@example\.net>", mark)


def test_rcpt_discard_drops_the_whole_message(bench: Bench, verdicts: TappedMilter) -> None:
    """Discard at RCPT drops the message for every recipient."""
    bench.use(verdicts)
    mark = bench.postfix.log_mark()
    token = bench.token("discard-rcpt")
    talk = bench.converse(make_message("rcpt", token), recipients=["ok@example.net", "discard-rcpt@example.net"])
    assert talk.rcpt == {"ok@example.net": (250, b"2.1.5 Ok"), "discard-rcpt@example.net": (250, b"2.1.5 Ok")}
    assert talk.accepted, talk
    bench.wait_for_log(r"milter-discard: RCPT from .*: milter triggers DISCARD action;.* to=<discard-rcpt@", mark)
    bench.not_delivered(token)


@pytest.mark.parametrize(
    ("subject", "headers", "body", "data", "logged"),
    [
        pytest.param("reject-eom", (), b"Hi.\r\n", REJECTED, REJECTED_LOG, id="eom-reject"),
        pytest.param("tempfail-eom", (), b"Hi.\r\n", TEMPFAILED, TEMPFAILED_LOG, id="eom-tempfail"),
        pytest.param("custom-eom", (), b"Hi.\r\n", _reply(550, "5.7.0", "line one", "100% spam", "line three"),
                     r"5\.7\.0 line one..550-5\.7\.0 100% spam..550 5\.7\.0 line three", id="eom-custom-multiline"),
        pytest.param("header", ("X-Verdict: reject",), b"Hi.\r\n", REJECTED, REJECTED_LOG,
                     id="header-reject"),
        pytest.param("body", (), b"Hi.\r\n" * 20000 + b"TEMPFAIL-BODY\r\n", TEMPFAILED,
                     TEMPFAILED_LOG, id="body-tempfail"),
    ],
)
def test_message_refused_after_data(
    bench: Bench, verdicts: TappedMilter, subject: str, headers: Sequence[str], body: bytes,
    data: tuple[int, bytes], logged: str,
) -> None:
    """A refusal at a header, a body chunk or end of message refuses the message after the final dot."""
    bench.use(verdicts)
    mark = bench.postfix.log_mark()
    token = bench.token(subject)
    talk = bench.converse(make_message(subject, token, headers=headers, body=body))
    assert talk.data == data
    # Postfix logs the reply without its first code, and CR LF between lines as "??".
    bench.wait_for_log(rf"milter-reject: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: {logged};", mark)
    bench.not_delivered(token, settle=0)


def test_eom_discard(bench: Bench, verdicts: TappedMilter) -> None:
    """Discard at end of message: accepted, then silently dropped."""
    bench.use(verdicts)
    mark = bench.postfix.log_mark()
    token = bench.token("discard-eom")
    talk = bench.converse(make_message("discard-eom", token))
    assert talk.accepted, talk
    bench.wait_for_log(r"milter-discard: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: milter triggers DISCARD", mark)
    bench.not_delivered(token)


# -------------------------------------------------------------------- changes


Headers = list[str]
HEADER_CASES: dict[str, tuple[list[list[Any]], Callable[[Headers], Headers]]] = {
    "add": ([["add_header", "X-Added", "yes"]], lambda h: [*h, "X-Added: yes"]),
    "insert-0": ([["insert_header", "X-Top", "top", 0]], lambda h: ["X-Top: top", *h]),
    "insert-1": ([["insert_header", "X-One", "one", 1]], lambda h: [h[0], "X-One: one", *h[1:]]),
    "insert-3": ([["insert_header", "X-Three", "three", 3]], lambda h: [*h[:3], "X-Three: three", *h[3:]]),
    "insert-past-end": ([["insert_header", "X-Last", "last", 1000]], lambda h: [*h, "X-Last: last"]),
    "change-2": ([["change_header", "X-Multi", "changed", 2]],
                 lambda h: [f if f != "X-Multi: two" else "X-Multi: changed" for f in h]),
    # The name is matched case-insensitively, and Postfix writes the header with the name as the milter spelled it.
    "change-case": ([["change_header", "x-multi", "lower", 1]],
                    lambda h: [f if f != "X-Multi: one" else "x-multi: lower" for f in h]),
    "change-absent": ([["change_header", "X-Absent", "new", 1]], lambda h: [*h, "X-Absent: new"]),
    "change-folded": ([["change_header", "X-Folded", "new\n\tfolded value", 1]],
                      lambda h: [f if not f.startswith("X-Folded:") else "X-Folded: new\r\n\tfolded value"
                                 for f in h]),
    "delete-1": ([["delete_header", "X-Multi", 1]], lambda h: [f for f in h if f != "X-Multi: one"]),
    "delete-absent": ([["delete_header", "X-Absent", 1]], lambda h: h),
    "change-first": ([["change_header", "From", "Zed <zed@example.org>", 1]],
                     lambda h: ["From: Zed <zed@example.org>" if f.startswith("From:") else f for f in h]),
    "delete-first": ([["delete_header", "From", 1]], lambda h: [f for f in h if not f.startswith("From:")]),
    "several": (
        [["delete_header", "X-Multi", 1], ["insert_header", "X-Top", "top", 0], ["add_header", "X-Added", "yes"],
         ["change_header", "X-Multi", "still two", 1]],
        lambda h: ["X-Top: top", *[f.replace("X-Multi: two", "X-Multi: still two") for f in h if f != "X-Multi: one"],
                   "X-Added: yes"],
    ),
}
EDITS: dict[str, list[list[Any]]] = {
    **{subject: ops for subject, (ops, _) in HEADER_CASES.items()},
    "recipients": [["add_recipient", "<carol@example.com>"], ["add_recipient", "<dave@example.com>", ["NOTIFY=NEVER"]],
                   ["delete_recipient", "<bob@example.net>"]],
    "delete-bare": [["delete_recipient", "bob@example.net"]],
    "delete-other-case": [["delete_recipient", "<BOB@Example.NET>"]],
    "sender": [["change_from", "<new@example.com>"]],
    "sender-args": [["change_from", "<new@example.com>", ["RET=HDRS", "ENVID=env42"]]],
    "body-small": [["replace_body", "Replaced body.\r\n\r\nWith a blank line.\r\n"]],
    "body-large": [["replace_body_lines", "replacement line", 12000]],
    "body-empty": [["replace_body", ""]],
    "quarantine": [["quarantine", "held by the txmilt e2e tests"]],
}
EDIT_HEADERS = ("X-Multi: one", "X-Multi: two", "X-Folded: first\r\n\tsecond")


@pytest.fixture(scope="module")
def editor(bench: Bench) -> TappedMilter:
    """One Editor filter making the changes of EDITS."""
    return bench.start_milter("editor", [{"name": "editor", "class": f"{FILTERS}:Editor", "options": {"edits": EDITS}}])


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_changes(bench: Bench, editor: TappedMilter, case: str) -> None:
    """Header add, insert, change and delete land exactly where the milter protocol says."""
    bench.use(editor)
    token = bench.token(case)
    talk = bench.converse(make_message(case, token, headers=EDIT_HEADERS))
    assert talk.accepted, talk
    original = [
        "Received", "From: Alice <alice@example.org>", "To: Bob <bob@example.net>", f"Subject: {case}",
        f"Message-ID: <{token}@txmilt.test>", *EDIT_HEADERS,
    ]
    assert header_fields(bench.delivered(token)) == HEADER_CASES[case][1](original)


def test_recipient_changes(bench: Bench, editor: TappedMilter) -> None:
    """Recipients added (one with NOTIFY=NEVER, which Postfix passes on) and deleted reach the envelope."""
    bench.use(editor)
    mark = bench.postfix.log_mark()
    token = bench.token("recipients")
    talk = bench.converse(make_message("recipients", token), recipients=["bob@example.net", "erin@example.net"])
    assert talk.accepted, talk
    received = bench.delivered(token)
    options = dict(zip(received.rcpt_tos, received.rcpt_options, strict=True))
    assert sorted(options) == ["carol@example.com", "dave@example.com", "erin@example.net"]
    assert "NOTIFY=NEVER" in options["dave@example.com"]
    assert not [o for o in options["carol@example.com"] if o.startswith("NOTIFY=")]
    bench.wait_for_log(r"to=<dave@example\.com>, relay=.*status=sent", mark)
    assert re.search(r"to=<bob@example\.net>", bench.postfix.log_text()[mark:]) is None


@pytest.mark.parametrize(("case", "left"), [("delete-bare", ["erin@example.net"]),
                                          ("delete-other-case", ["bob@example.net", "erin@example.net"])])
def test_delete_recipient_matching(bench: Bench, editor: TappedMilter, case: str, left: list[str]) -> None:
    """Postfix matches a deleted recipient with or without angle brackets, but not in another letter case."""
    bench.use(editor)
    token = bench.token(case)
    talk = bench.converse(make_message(case, token), recipients=["bob@example.net", "erin@example.net"])
    assert talk.accepted, talk
    assert sorted(bench.delivered(token).rcpt_tos) == left


@pytest.mark.parametrize(("case", "options"), [("sender", []), ("sender-args", ["ENVID=env42", "RET=HDRS"])])
def test_sender_change(bench: Bench, editor: TappedMilter, case: str, options: list[str]) -> None:
    """The envelope sender is replaced; Postfix keeps the RET and ENVID arguments."""
    bench.use(editor)
    mark = bench.postfix.log_mark()
    token = bench.token(case)
    talk = bench.converse(make_message(case, token))
    assert talk.accepted, talk
    received = bench.delivered(token)
    assert received.mail_from == "new@example.com"
    assert sorted(o for o in received.mail_options if not o.startswith("SIZE=")) == options
    bench.wait_for_log(r"from=<new@example\.com>, size=", mark)


@pytest.mark.parametrize(
    ("case", "body", "packets"),
    [
        ("body-small", b"Replaced body.\r\n\r\nWith a blank line.\r\n", 1),
        ("body-large", body_lines("replacement line", 12000), math.ceil(12000 * 26 / 65535)),
        ("body-empty", b"", 1),
    ],
)
def test_body_replacement(bench: Bench, editor: TappedMilter, case: str, body: bytes, packets: int) -> None:
    """The body is replaced, a large one in several REPLBODY packets of at most 64 KiB."""
    bench.use(editor)
    token = bench.token(case)
    talk = bench.converse(make_message(case, token, body=b"Original body.\r\n" * 10))
    assert talk.accepted, talk
    assert bench.delivered(token).body() == body
    replbody = [p for p in _only_session(editor).packets if p.letter == "b"]
    assert [p.size for p in replbody] == [min(65535, len(body) - 65535 * n) for n in range(packets)]


def test_quarantine_holds_the_message(bench: Bench, editor: TappedMilter) -> None:
    """Quarantine puts the message on Postfix's hold queue instead of delivering it."""
    bench.use(editor)
    mark = bench.postfix.log_mark()
    token = bench.token("quarantine")
    talk = bench.converse(make_message("quarantine", token))
    assert talk.accepted, talk
    found = bench.wait_for_log(r"(\w+): milter-hold: END-OF-MESSAGE from .*: milter triggers HOLD action", mark)
    queue_id = found.group(1)
    try:
        assert bench.postfix.hold_queue() == [queue_id]
        assert not [m for m in bench.sink.messages if token.encode() in m.data]
    finally:
        bench.postfix.delete(queue_id, "hold")


@pytest.fixture(scope="module")
def leading_space(bench: Bench) -> TappedMilter:
    """An Editor and a SpaceEditor (which wants header values with their leading space) in one chain."""
    plain = [["echo", "X-Spacing"], ["echo", "X-Tight"], ["add_header", "X-Plain", "plain"]]
    spaced = [["echo", "X-Spacing"], ["echo", "X-Tight"], ["add_header", "X-Raw", "raw"],
              ["add_header", "X-Wide", "  wide"]]
    return bench.start_milter("leading-space", [
        {"name": "plain", "class": f"{FILTERS}:Editor", "options": {"edits": {"spacing": plain}}},
        {"name": "spaced", "class": f"{FILTERS}:SpaceEditor", "options": {"edits": {"spacing": spaced}}},
    ])


def test_leading_space_per_filter(bench: Bench, leading_space: TappedMilter) -> None:
    """Each filter sees and writes header values in its own leading-space convention, as Postfix stores them."""
    bench.use(leading_space)
    token = bench.token("spacing")
    talk = bench.converse(make_message("spacing", token, headers=("X-Spacing:  two spaces", "X-Tight:tight")))
    assert talk.accepted, talk
    assert header_fields(bench.delivered(token))[-7:] == [
        'X-Echo-X-Spacing: [" two spaces"]',
        'X-Echo-X-Tight: ["tight"]',
        "X-Plain: plain",
        'X-Echo-X-Spacing: ["  two spaces"]',
        'X-Echo-X-Tight: ["tight"]',
        "X-Raw:raw",
        "X-Wide:  wide",
    ]
    offer = _only_session(leading_space).packets[0]
    assert (offer.sender, offer.letter) == ("mta", "O")


# ---------------------------------------------------------- macros and sessions


@pytest.fixture(scope="module")
def reporter(bench: Bench) -> TappedMilter:
    """One Reporter filter: what it saw comes back in X-Report-* headers."""
    return bench.start_milter("reporter", [{"name": "reporter", "class": f"{FILTERS}:Reporter"}])


def _report(message: SinkMessage, part: str) -> Any:
    (value,) = message.parsed().get_all(f"X-Report-{part}", [])
    return json.loads(str(value))


def _queue_id(message: SinkMessage) -> str:
    found = re.search(rb"by mx\.txmilt\.test \(Postfix(?:, from userid \d+)?\)(?: with E?SMTP)?\s+id (\w+)",
                      message.data)
    assert found is not None, message.data[:400]
    return found.group(1).decode()


def test_requested_macros(bench: Bench, reporter: TappedMilter) -> None:
    """Postfix sends the macros the filter asked for in negotiation, stage by stage."""
    bench.use(reporter)
    token = bench.token("macros")
    talk = bench.converse(make_message("macros", token))
    assert talk.accepted, talk
    received = bench.delivered(token)
    queue_id = _queue_id(received)
    assert _report(received, "Connection") == {
        "hostname": "[127.0.0.1]", "family": "4", "address": "127.0.0.1", "helo": "client.example.org",
        "macros": {"j": MX, "{client_addr}": "127.0.0.1", "{daemon_name}": MX, "{client_name}": "unknown"},
        "helo_macros": {"{tls_version}": None, "{cipher}": None},
        "messages": 1,
    }
    assert _report(received, "Macros") == {
        # Postfix has no queue id before the first accepted recipient, and no {msg_id}.
        "mail": {"i": None, "{auth_type}": None, "{auth_authen}": None, "{mail_addr}": "alice@example.org"},
        "rcpt": {"i": None, "{rcpt_addr}": "bob@example.net", "{rcpt_mailer}": "smtp"},
        "data": {"i": queue_id},
        "end_of_headers": {"i": queue_id},
        "end_of_message": {"i": queue_id, "{msg_id}": None},
    }
    offer, answer = _only_session(reporter).packets[:2]
    # Postfix offers protocol 6, every action and every protocol step (PROTOCOL.md §4.4) ...
    assert (offer.letter, offer.payload) == ("O", bytes.fromhex("00000006 000001ff 001fffff"))
    # ... and txmilt answers with the macro lists after the three numbers.
    assert answer.letter == "O" and b"{client_addr}" in answer.payload[12:]


def test_several_messages_on_one_connection(bench: Bench, reporter: TappedMilter) -> None:
    """Messages on one SMTP session are filtered apart: ABORT after each resets the filter's message."""
    bench.use(reporter)
    tokens = [bench.token(f"session-{n}") for n in range(3)]
    with bench.smtp() as client:
        assert client.sendmail("first@example.org", ["one@example.net"], make_message("1", tokens[0])) == {}
        assert client.mail("aborted@example.org")[0] == 250
        assert client.rcpt("aborted@example.net")[0] == 250
        assert client.rset()[0] == 250
        assert client.sendmail("second@example.org", ["two@example.net", "three@example.net"],
                               make_message("2", tokens[1], body=b"Second body.\r\n")) == {}
        assert client.sendmail("third@example.org", ["four@example.net"], make_message("3", tokens[2])) == {}
    received = [bench.delivered(token) for token in tokens]
    reports = [_report(m, "Message") for m in received]
    assert [r["mail"][0] for r in reports] == ["<first@example.org>", "<second@example.org>", "<third@example.org>"]
    assert [[rcpt for rcpt, _ in r["rcpt"]] for r in reports] == [
        ["<one@example.net>"], ["<two@example.net>", "<three@example.net>"], ["<four@example.net>"],
    ]
    assert reports[1]["sha256"] == hashlib.sha256(b"Second body.\r\n").hexdigest()
    assert [_report(m, "Connection")["messages"] for m in received] == [1, 2, 3]
    assert [_report(m, "Macros")["end_of_message"]["i"] for m in received] == [_queue_id(m) for m in received]
    letters = _mta_letters(_only_session(reporter))
    assert letters.count("O") == 1 and letters.count("E") == 3
    # Postfix sends ABORT after every message it finished, and for the RSET.
    assert re.fullmatch(r"OCH(MRTL+NBEA+){1}MRA+(MR+TL+NBEA+){2}Q", letters), letters


def test_non_smtp_submission(bench: Bench, reporter: TappedMilter) -> None:
    """Mail submitted with Postfix's sendmail command goes through non_smtpd_milters as a local session."""
    bench.use(reporter)
    token = bench.token("pickup")
    bench.postfix.sendmail(make_message("pickup", token), "alice@example.org", ["bob@example.net"])
    received = bench.delivered(token)
    connection = _report(received, "Connection")
    assert (connection["hostname"], connection["address"]) == ("localhost", "127.0.0.1")
    message = _report(received, "Message")
    # Unlike SMTP mail, the envelope addresses come without angle brackets.
    assert (message["mail"], message["rcpt"]) == (["alice@example.org", []], [["bob@example.net", []]])
    macros = _report(received, "Macros")
    # The queue file exists before the simulated MAIL, so i is there from the start.
    assert macros["mail"]["i"] == macros["end_of_message"]["i"] == _queue_id(received)


def test_bdat_chunks(bench: Bench, reporter: TappedMilter) -> None:
    """A message sent with BDAT (CHUNKING) in several chunks is filtered like one sent with DATA."""
    bench.use(reporter)
    token = bench.token("bdat")
    message = make_message("bdat", token, body=b"First chunk's body line.\r\n" * 100 + b"Last line.\r\n")
    chunks = [message[:1000], message[1000:]]
    with socket.create_connection(bench.postfix.smtp_address, timeout=30) as sock:
        replies = sock.makefile("rb")

        def command(line: bytes, payload: bytes = b"") -> bytes:
            sock.sendall(line + b"\r\n" + payload)
            lines = [replies.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(replies.readline())
            return b"".join(lines)

        assert replies.readline().startswith(b"220 ")
        assert b"CHUNKING" in command(b"EHLO client.example.org")
        assert command(b"MAIL FROM:<alice@example.org>").startswith(b"250 ")
        assert command(b"RCPT TO:<bob@example.net>").startswith(b"250 ")
        assert command(b"BDAT %d" % len(chunks[0]), chunks[0]).startswith(b"250 ")
        assert re.match(rb"250 2\.0\.0 Ok: \d+ bytes queued", command(b"BDAT %d LAST" % len(chunks[1]), chunks[1]))
        assert command(b"QUIT").startswith(b"221 ")
    received = bench.delivered(token)
    body = message.partition(b"\r\n\r\n")[2]
    assert received.body() == body
    assert _report(received, "Message")["sha256"] == hashlib.sha256(body).hexdigest()
    # One DATA command for the whole BDAT sequence.
    assert _mta_letters(_only_session(reporter)).count("T") == 1


def test_five_mebibyte_message(bench: Bench, reporter: TappedMilter) -> None:
    """A 5 MiB message reaches the filter in 64 KiB chunks and the sink unchanged."""
    bench.use(reporter)
    token = bench.token("big")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 12 + b"\r\n"  # 746 octets
    body = line * (5 * 1024 * 1024 // len(line) + 1)
    talk = bench.converse(make_message("big", token, body=body))
    assert talk.accepted, talk
    received = bench.delivered(token, timeout=60)
    assert received.body() == body
    report = _report(received, "Message")
    chunks = math.ceil(len(body) / 65535)
    assert (report["bytes"], report["chunks"], report["sha256"]) == (
        len(body), chunks, hashlib.sha256(body).hexdigest(),
    )
    sizes = [p.size for p in _only_session(reporter).packets if p.sender == "mta" and p.letter == "B"]
    assert len(sizes) == chunks and set(sizes[:-1]) == {65535}


@pytest.fixture(scope="module")
def skipper(bench: Bench) -> TappedMilter:
    """A Reporter that answers Skip to the first body chunk."""
    return bench.start_milter("skipper", [{"name": "skipper", "class": f"{FILTERS}:Reporter",
                                           "options": {"skip_body": True}}])


def test_skip_stops_body_chunks(bench: Bench, skipper: TappedMilter) -> None:
    """Skip on the first body chunk: Postfix sends no more chunks, and the message is still delivered."""
    bench.use(skipper)
    token = bench.token("skip")
    body = body_lines("a body of several chunks", 10000)
    talk = bench.converse(make_message("skip", token, body=body))
    assert talk.accepted, talk
    received = bench.delivered(token)
    assert received.body() == body
    assert _report(received, "Message")["chunks"] == 1
    session = _only_session(skipper)
    assert len(body) > 3 * 65535
    assert _mta_letters(session).count("B") == 1
    assert session.letters("milter").count("s") == 1


# -------------------------------------------------------------------- chains


@pytest.fixture(scope="module")
def chain(bench: Bench) -> TappedMilter:
    """gate (accepts early for some mail), editor (adds headers), judge (rejects some mail), in that order."""
    added = [["add_header", "X-Second", "still here"]]
    return bench.start_milter("chain", [
        {"name": "gate", "class": f"{FILTERS}:Verdicts", "options": {"rules": [
            _rule("mail", "accept-early", "accept"), _rule("eom", "chain-accept-eom", "accept"),
        ]}},
        {"name": "editor", "class": f"{FILTERS}:Editor", "options": {"edits": {
            "chain-reject": [["add_header", "X-Never", "seen"], ["replace_body", "never\r\n"]],
            "chain-accept": added, "chain-accept-eom": added,
        }}},
        {"name": "judge", "class": f"{FILTERS}:Verdicts", "options": {"rules": [
            _rule("eom", "chain-reject", "reject", code=554, status="5.7.1", text="judged"),
        ]}},
    ])


def test_chain_refusal_drops_earlier_changes(bench: Bench, chain: TappedMilter) -> None:
    """One filter changes the message, a later one rejects it: rejected, nothing delivered, no change sent."""
    bench.use(chain)
    token = bench.token("chain-reject")
    talk = bench.converse(make_message("chain-reject", token))
    assert talk.data == (554, b"5.7.1 judged")
    bench.not_delivered(token, settle=0)
    answers = _only_session(chain).letters("milter")
    assert answers.endswith("cy") and not set(answers) & set("hime+2-bq"), answers


@pytest.mark.parametrize(("sender", "subject"), [("accept-early@example.org", "chain-accept"),
                                                 ("alice@example.org", "chain-accept-eom")],
                         ids=["accept-at-mail", "accept-at-eom"])
def test_chain_accepting_filter_leaves_others_working(
    bench: Bench, chain: TappedMilter, sender: str, subject: str
) -> None:
    """One filter accepts; the others still see the message and their changes arrive."""
    bench.use(chain)
    token = bench.token(subject)
    talk = bench.converse(make_message(subject, token), sender=sender)
    assert talk.accepted, talk
    assert header_fields(bench.delivered(token))[-1] == "X-Second: still here"
    answers = _only_session(chain).letters("milter")
    assert "a" not in answers, "Postfix must not hear Accept while other filters still work"
    assert answers.endswith("hc")


@pytest.fixture(scope="module")
def rebase(bench: Bench) -> TappedMilter:
    """Two Editors whose header changes both refer to the message as it arrived."""
    return bench.start_milter("rebase", [
        {"name": "first", "class": f"{FILTERS}:Editor", "options": {"edits": {"rebase": [
            ["delete_header", "X-Multi", 1], ["insert_header", "X-First", "1", 1], ["add_header", "X-First-End", "1"],
        ]}}},
        {"name": "second", "class": f"{FILTERS}:Editor", "options": {"edits": {"rebase": [
            # Within one filter, each change applies to the result of its earlier ones (as in Postfix):
            # after its insert at 1, index 5 is right before Message-ID.
            ["change_header", "X-Multi", "second's two", 2], ["insert_header", "X-Second", "2", 1],
            ["insert_header", "X-Before-Message-ID", "2", 5],
        ]}}},
    ])


def test_chain_rebases_header_indexes(bench: Bench, rebase: TappedMilter) -> None:
    """Each filter's header indexes mean the message it saw, even after an earlier filter's insert or delete."""
    bench.use(rebase)
    token = bench.token("rebase")
    talk = bench.converse(make_message("rebase", token, headers=EDIT_HEADERS))
    assert talk.accepted, talk
    assert header_fields(bench.delivered(token)) == [
        "Received", "X-First: 1", "X-Second: 2", "From: Alice <alice@example.org>", "To: Bob <bob@example.net>",
        "Subject: rebase", "X-Before-Message-ID: 2", f"Message-ID: <{token}@txmilt.test>",
        "X-Multi: second's two", "X-Folded: first\r\n\tsecond", "X-First-End: 1",
    ]


# ------------------------------------------------------------------- OpenDKIM


@pytest.fixture(scope="module")
def dkim_chain(bench: Bench, opendkim: OpenDKIM) -> TappedMilter:
    """An Editor that stamps every message, then OpenDKIM as a remote chain member."""
    return bench.start_milter(f"dkim-{opendkim.canonicalization.replace('/', '-')}", [
        {"name": "stamp", "class": f"{FILTERS}:Editor",
         "options": {"edits": {"*": [["add_header", "X-Stamp", "txmilt"]]}}},
        {"name": "opendkim", "remote": opendkim.spec, "timeout": 10},
    ])


def test_opendkim_in_a_chain_signs(bench: Bench, opendkim: OpenDKIM, dkim_chain: TappedMilter) -> None:
    """A real OpenDKIM behind txmilt's RemoteMilter signs the message; the signature verifies.

    With simple header canonicalization the signed headers must reach OpenDKIM exactly as
    Postfix stores them, odd spacing after the colon included.
    """
    dkim: Any = importlib.import_module("dkim")
    bench.use(dkim_chain)
    token = bench.token("dkim")
    message = (
        b"From:Alice <alice@example.org>\r\n"
        b"To:\tBob <bob@example.net>\r\n"
        b"Subject:   signed by OpenDKIM through txmilt\r\n"
        b"Date: Sat, 21 Nov 2026 08:00:00 +0000\r\n"
        b"Message-ID: <" + token.encode() + b"@txmilt.test>\r\n"
        b"\r\n"
        b"Hello DKIM.\r\n\r\n  Indented line with trailing space \r\n"
    )
    talk = bench.converse(message, sender="alice@example.org")
    assert talk.accepted, talk
    received = bench.delivered(token)
    fields = header_fields(received)
    name, _, value = fields[0].partition(":")
    tags = dict(tag.strip().split("=", 1) for tag in re.sub(r"\s+", "", value).split(";") if tag)
    assert name == "DKIM-Signature"
    assert (tags["d"], tags["s"], tags["c"], tags["a"]) == (
        "example.org", "txmilt", opendkim.canonicalization, "rsa-sha256",
    )
    assert {"from", "to", "subject", "date"} <= set(tags["h"].lower().split(":"))
    assert fields[1] == "Received" and fields[-1] == "X-Stamp: txmilt"
    assert received.data.endswith(message.partition(b"\r\n\r\n")[2])
    assert dkim.verify(received.data, dnsfunc=opendkim.dnsfunc) is True
    tampered = received.data.replace(b"Hello DKIM.", b"Hello DKIM!")
    assert dkim.verify(tampered, dnsfunc=opendkim.dnsfunc) is False
    respaced = received.data.replace(b"Subject:   signed", b"Subject:  signed")
    assert dkim.verify(respaced, dnsfunc=opendkim.dnsfunc) is (opendkim.canonicalization == "relaxed/simple")


# ------------------------------------------------------------ failing filters


@pytest.fixture(scope="module")
def trouble(bench: Bench) -> TappedMilter:
    """Filters that are slow, hang, crash, or only pretend (dry run); Postfix waits 1 s per read."""
    return bench.start_milter(
        "trouble",
        [
            {"name": "slowpoke", "class": f"{FILTERS}:Troublemaker", "timeout": 3,
             "options": {"delays": {"slow": 2.0, "hang": 60}}},
            {"name": "crasher", "class": f"{FILTERS}:Troublemaker", "fallback": "accept",
             "options": {"crash": ["crash"]}},
            {"name": "pretender", "class": f"{FILTERS}:Verdicts", "dry_run": True,
             "options": {"rules": [_rule("eom", "dry-run", "reject")]}},
        ],
        daemon={"progress_interval": 0.3},
        postfix_options={"content_timeout": "1s"},
    )


def test_slow_filter_keeps_postfix_waiting_with_progress(bench: Bench, trouble: TappedMilter) -> None:
    """An end of message slower than Postfix's 1 s content timeout succeeds: PROGRESS restarts Postfix's timer."""
    bench.use(trouble)
    token = bench.token("slow")
    talk = bench.converse(make_message("slow", token))
    assert talk.accepted, talk
    bench.delivered(token)
    assert _only_session(trouble).letters("milter").count("p") >= 4


@pytest.mark.log_allows(r"filter slowpoke timed out after 3(\.0)?s in end_of_message")
def test_filter_timeout_gives_its_fallback(bench: Bench, trouble: TappedMilter) -> None:
    """A filter past its own timeout gets its fallback verdict (tempfail by default)."""
    bench.use(trouble)
    mark = trouble.daemon.log_mark()
    token = bench.token("hang")
    talk = bench.converse(make_message("hang", token))
    assert talk.data == TEMPFAILED
    trouble.wait_for_log(r"filter slowpoke timed out after 3(\.0)?s in end_of_message", mark)
    bench.not_delivered(token, settle=0)


@pytest.mark.log_allows(r"filter crasher failed in end_of_message", r"Traceback", r"RuntimeError: Troublemaker")
def test_crashing_filter_gets_its_configured_fallback(bench: Bench, trouble: TappedMilter) -> None:
    """A filter that raises is logged with its traceback and answers its fallback (configured: accept)."""
    bench.use(trouble)
    mark = trouble.daemon.log_mark()
    token = bench.token("crash")
    talk = bench.converse(make_message("crash", token))
    assert talk.accepted, talk
    bench.delivered(token)
    trouble.wait_for_log(r"(?s)filter crasher failed in end_of_message.*RuntimeError: Troublemaker crashes", mark)


def test_dry_run_filter_only_logs(bench: Bench, trouble: TappedMilter) -> None:
    """A dry-run filter's refusal is logged, not sent: the message is delivered."""
    bench.use(trouble)
    mark = trouble.daemon.log_mark()
    token = bench.token("dry-run")
    talk = bench.converse(make_message("dry-run", token))
    assert talk.accepted, talk
    bench.delivered(token)
    trouble.wait_for_log(r"evaluation: filter pretender would answer Reject\(", mark)
