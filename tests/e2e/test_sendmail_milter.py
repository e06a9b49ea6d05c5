"""txmilt behind a private Sendmail (Debian's, unpacked beside Postfix): changes, macros, verdicts, no ABORT.

Skipped unless ``tests/e2e/install-sendmail.sh`` has unpacked Sendmail (see
tests/e2e/sendmail.py for why it is not installed as a package).
"""

from __future__ import annotations

import json
import re
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .bench import TappedMilter, header_fields, make_message, wait_delivered
from .milterd import MilterDaemon
from .sendmail import PrivateSendmail, sendmail_available
from .sink import SinkMessage, SMTPSink

pytestmark = pytest.mark.e2e

FILTERS = "tests.e2e.filters"
MESSAGE_HEADERS = ("Date: Sat, 21 Nov 2026 08:00:00 +0000", "X-Multi: one", "X-Multi: two")


@dataclass
class SendmailBench:
    """A private Sendmail relaying to a sink, with one txmilt daemon (behind a wire tap) as its milter."""

    sendmail: PrivateSendmail
    sink: SMTPSink
    milter: TappedMilter

    def smtp(self) -> smtplib.SMTP:
        """An SMTP client connected to Sendmail."""
        host, port = self.sendmail.smtp_address
        return smtplib.SMTP(host, port, local_hostname="client.example.org", timeout=60)

    def delivered(self, token: str, timeout: float = 20.0) -> SinkMessage:
        """The message carrying ``token``, once the sink has it."""
        return wait_delivered(self.sink, token, timeout)


@pytest.fixture(scope="module")
def sendmail_bench() -> Iterator[SendmailBench]:
    """Sendmail, a sink, and a chain: Verdicts, Reporter, Editor."""
    reason = sendmail_available()
    if reason is not None:
        pytest.skip(reason)
    rules = [
        {"stage": "rcpt", "match": "custom-rcpt", "verdict": "reject", "code": 550, "status": "5.1.1",
         "text": ["no such user", "here, sorry"]},
        {"stage": "eom", "match": "reject-eom", "verdict": "reject"},
    ]
    edits = {"edit": [["insert_header", "X-Top", "top", 0], ["change_header", "X-Multi", "changed", 2],
                      ["add_header", "X-Added", "yes"]]}
    daemon = MilterDaemon([
        {"name": "verdicts", "class": f"{FILTERS}:Verdicts", "options": {"rules": rules}},
        {"name": "reporter", "class": f"{FILTERS}:Reporter"},
        {"name": "editor", "class": f"{FILTERS}:Editor", "options": {"edits": edits}},
    ], name="sendmail-chain")
    with SMTPSink() as sink, daemon:
        milter = TappedMilter(daemon)
        try:
            with PrivateSendmail(f"inet:{milter.tap.port}@127.0.0.1", sink.address) as sendmail:
                yield SendmailBench(sendmail, sink, milter)
        finally:
            milter.tap.stop()


def _report(message: SinkMessage, part: str) -> Any:
    (value,) = message.parsed().get_all(f"X-Report-{part}", [])
    return json.loads(str(value))


def test_sendmail_applies_changes_and_sends_macros(sendmail_bench: SendmailBench) -> None:
    """Through Sendmail, insert at 0 lands above its Received:, change and add apply; macros arrive."""
    bench = sendmail_bench
    bench.milter.tap.clear()
    token = f"sendmail-edit-{id(bench)}"
    with bench.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.net"],
                               make_message("edit", token, headers=MESSAGE_HEADERS)) == {}
    received = bench.delivered(token)
    fields = header_fields(received)
    assert fields[:2] == ["X-Top: top", "Received"]
    assert fields[2:9] == [
        "From: Alice <alice@example.org>", "To: Bob <bob@example.net>", "Subject: edit",
        f"Message-ID: <{token}@txmilt.test>", "Date: Sat, 21 Nov 2026 08:00:00 +0000",
        "X-Multi: one", "X-Multi: changed",
    ]
    assert fields[-1] == "X-Added: yes"
    queue_id = re.search(rb"with ESMTP id (\w+)", received.data)
    assert queue_id is not None
    macros = _report(received, "Macros")
    # Unlike Postfix, Sendmail has the queue id from MAIL on, and a {msg_id} at end of message.
    assert macros["mail"]["i"] == macros["end_of_message"]["i"] == queue_id.group(1).decode()
    assert macros["end_of_message"]["{msg_id}"] == f"<{token}@txmilt.test>"
    connection = _report(received, "Connection")
    assert connection["macros"]["j"] == "mx.sendmail.test"
    assert connection["macros"]["{client_addr}"] == "127.0.0.1"
    assert connection["macros"]["{daemon_name}"] == "MTA"


def test_sendmail_verdicts(sendmail_bench: SendmailBench) -> None:
    """A multi-line refusal at RCPT reaches the client line by line; a refusal at end of message refuses it."""
    bench = sendmail_bench
    token = f"sendmail-rcpt-{id(bench)}"
    with bench.smtp() as client:
        refused = client.sendmail("alice@example.org", ["ok@example.net", "custom-rcpt@example.net"],
                                  make_message("rcpt", token, headers=MESSAGE_HEADERS))
        # Sendmail puts the address into the first line.
        assert refused == {
            "custom-rcpt@example.net": (550, b"5.1.1 <custom-rcpt@example.net>... no such user\n5.1.1 here, sorry"),
        }
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", ["ok@example.net"], make_message("reject-eom", token + "-x"))
        # Sendmail's own default text after the final dot (Postfix says 550 there).
        assert (info.value.smtp_code, info.value.smtp_error) == (554, b"5.7.1 Command rejected")
    assert bench.delivered(token).rcpt_tos == ["ok@example.net"]


def test_sendmail_sends_no_abort_after_a_message(sendmail_bench: SendmailBench) -> None:
    """Sendmail goes from one message's end straight to the next MAIL (Postfix sends ABORT in between)."""
    bench = sendmail_bench
    bench.milter.tap.clear()
    tokens = [f"sendmail-session-{n}-{id(bench)}" for n in range(2)]
    with bench.smtp() as client:
        for number, token in enumerate(tokens):
            assert client.sendmail(f"s{number}@example.org", ["bob@example.net"], make_message("s", token)) == {}
    reports = [_report(bench.delivered(token), "Connection")["messages"] for token in tokens]
    assert reports == [1, 2]
    (session,) = bench.milter.tap.wait_closed(1)
    letters = session.letters("mta").replace("D", "")
    assert letters.count("E") == 2 and "A" not in letters, letters
    assert re.fullmatch(r"OCHMRTL+NB+EMRTL+NB+EQ", letters), letters
