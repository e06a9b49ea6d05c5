"""A fixed, varied corpus of SMTP transactions for the example chain of ``examples/milter.toml``.

Each :class:`Case` is one transaction: envelope, ESMTP options and a message
whose Message-ID carries the placeholder ``TOKEN`` (replaced per run so the
sink copy can be found), and what the example filters should make of it
(delivered, refused, held), so that a differential test also knows the
corpus did what it was meant to. The cases exercise each example filter:
trigger words (words), the quarantined sender domain (quarantine), the
aliased recipient (aliases), MIME shapes and charsets (disclaimer), and the
things an MTA may store differently: folding, long and 8-bit headers, many
headers, dots, empty and large bodies.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CORPUS", "Case", "example_filters", "expected", "lineups"]

ROOT = Path(__file__).resolve().parents[2]
#: The example chain's words and domains, as configured in examples/milter.toml.
QUARANTINED = "suspicious.example"
ALIAS = "sales@example.com"


def example_filters() -> list[dict[str, Any]]:
    """The ``[[filter]]`` tables of examples/milter.toml, in order."""
    with (ROOT / "examples" / "milter.toml").open("rb") as fh:
        return list(tomllib.load(fh)["filter"])


#: Header changes for every message (tests.e2e.filters.Editor) that Postfix and Sendmail place alike.
PORTABLE_EDITS = (
    ("insert_header", "X-Inserted", "at 1", 1),
    ("change_header", "To", "Changed <changed@example.net>", 1),
    ("delete_header", "Date", 1),
    ("change_header", "X-Folded", "changed\n\tand folded", 1),  # only some messages have one: appended to others
    ("add_header", "X-Added", "added"),
    ("add_header", "X-Added-Folded", "first line\n second line"),
    ("add_header", "X-Added-Utf8", "Grüße aus Köln"),
)
#: Header changes that Postfix and Sendmail place differently, as the chain models: Postfix appends a
#: header added under a name already present, or changed at a missing occurrence; Sendmail puts it before
#: the first one of that name.
PLACEMENT_EDITS = (
    ("change_header", "Subject", "the second subject, changed", 2),
    ("add_header", "X-Filtered-By", "the editor"),
)
#: An insert index beyond 1 also counts Sendmail's own hidden default headers (from its .cf), which the
#: chain cannot know.
LATE_INSERT = (("insert_header", "X-Inserted-Late", "at 4", 4),)

#: Headers added with an empty value (the MTA still stores a space after the colon).
EMPTY_VALUES = (("add_header", "X-Added-Empty", ""), ("insert_header", "X-Inserted-Empty", "", 1))

#: Refusals (tests.e2e.filters.Verdicts) at each stage, chosen by the sender, a recipient, a header,
#: the body or the Subject; "accept-mail" accepts the message at MAIL (the filter after goes on).
VERDICT_RULES = (
    {"stage": "mail", "match": "reject-mail", "verdict": "reject"},
    {"stage": "mail", "match": "accept-mail", "verdict": "accept"},
    {"stage": "rcpt", "match": "reject-rcpt", "verdict": "reject"},
    {"stage": "rcpt", "match": "tempfail-rcpt", "verdict": "tempfail"},
    {"stage": "rcpt", "match": "custom-rcpt", "verdict": "reject", "code": 550, "status": "5.1.1",
     "text": ["no such user", "here, sorry"]},
    {"stage": "header", "match": "X-Verdict: reject", "verdict": "reject"},
    {"stage": "body", "match": "TEMPFAIL-BODY", "verdict": "tempfail"},
    {"stage": "eom", "match": "reject-eom", "verdict": "reject"},
)


def lineups() -> dict[str, list[dict[str, Any]]]:
    """Orders of the example filters to compare, as ``[[filter]]`` tables, by label.

    ``examples``: as in examples/milter.toml. ``reversed``: the stamp and the
    disclaimer change the message before the others see it, and the quarantine
    comes before the word filter. ``two-footers``: a second disclaimer must see
    the first one's body, and the word filter both footers. ``edits``: header
    inserts, changes and deletes and a new body, then a filter that reports
    exactly what it was shown (tests.e2e.filters.Witness); ``placement-edits``:
    the same without an insert beyond index 1, which Sendmail counts in its own
    hidden headers; ``empty-values``: headers added with an empty value. ``verdicts``: refusals
    at each stage, then a filter that reports which commands still reached it.
    """
    examples = example_filters()
    assert [t["name"] for t in examples] == ["words", "quarantine", "aliases", "disclaimer", "stamp"], examples
    table = {t["name"]: t for t in examples}
    return {
        "examples": examples,
        "reversed": examples[::-1],
        "two-footers": [
            {**table["disclaimer"], "name": "first-footer", "options": {"footer": "First footer."}},
            table["stamp"],
            {**table["disclaimer"], "name": "second-footer", "options": {"footer": "Second footer."}},
            table["words"], table["quarantine"], table["aliases"],
        ],
        "edits": _edits("editor", PORTABLE_EDITS + PLACEMENT_EDITS + LATE_INSERT, table),
        "placement-edits": _edits("placement-editor", PORTABLE_EDITS + PLACEMENT_EDITS, table),
        "empty-values": _edits("empty-values", EMPTY_VALUES, table),
        "verdicts": [
            {"name": "verdicts", "class": "tests.e2e.filters:Verdicts", "options": {"rules": VERDICT_RULES}},
            {"name": "witness", "class": "tests.e2e.filters:Witness"},
        ],
    }


def _edits(name: str, edits: Sequence[Sequence[Any]], table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """[stamp, an Editor making ``edits``, disclaimer, a Witness reporting what it saw]."""
    editor = {"name": name, "class": "tests.e2e.filters:Editor", "options": {"edits": {"*": edits}}}
    return [table["stamp"], editor, table["disclaimer"], {"name": "witness", "class": "tests.e2e.filters:Witness"}]


def expected(case: Case, lineup: Sequence[dict[str, Any]], stops_at_quarantine: bool) -> str:
    """What ``lineup`` makes of ``case``: "delivered", "refused" (at end of DATA) or "held" (quarantined).

    ``stops_at_quarantine``: the MTA ends the milters' pass at a quarantine
    (Postfix), so a word filter after the quarantine never refuses.
    """
    names = [t["name"] for t in lineup]
    if "verdicts" in names:
        return case.verdict or "delivered"
    refused = case.refused and "words" in names
    held = case.quarantined and "quarantine" in names
    if refused and held and stops_at_quarantine and names.index("quarantine") < names.index("words"):
        return "held"
    if refused:
        return "refused"
    return "held" if held else "delivered"


@dataclass(frozen=True)
class Case:
    """One SMTP transaction and what the example chain does with it."""

    name: str
    message: bytes
    #: The word filter refuses it (a trigger word in the Subject or body).
    refused: bool = False
    #: What the Verdicts filter of the verdicts lineup makes of it, if it judges it.
    verdict: str = ""
    sender: str = "alice@example.org"
    recipients: Sequence[str] = ("bob@example.net",)
    mail_options: Sequence[str] = ()
    rcpt_options: Sequence[str] = ()
    notes: str = field(default="", compare=False)

    @property
    def quarantined(self) -> bool:
        """The quarantine filter holds it (the envelope sender is in the quarantined domain)."""
        return self.sender.endswith(QUARANTINED)

    def with_token(self, token: str) -> bytes:
        """The message with ``token`` in place of TOKEN."""
        return self.message.replace(b"TOKEN", token.encode())


def _message(
    *headers: str | bytes, body: bytes = b"Hello.\r\n", subject: str | bytes | None = "corpus message"
) -> bytes:
    """A CRLF message: From, To, Subject (unless None), Date, Message-ID with TOKEN, then ``headers``, then ``body``."""
    head: list[bytes] = [
        b"From: Alice <alice@example.org>",
        b"To: Bob <bob@example.net>",
        *([] if subject is None else [b"Subject: " + (subject if isinstance(subject, bytes) else subject.encode())]),
        b"Date: Sat, 21 Nov 2026 08:00:00 +0000",
        b"Message-ID: <TOKEN@txmilt.test>",
        *(h if isinstance(h, bytes) else h.encode() for h in headers),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_TEXT = ("MIME-Version: 1.0", "Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit")
_UTF8 = ("MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit")


def _multipart(kind: str, closed: bool = True) -> bytes:
    boundary = f"=={kind}-boundary=="
    body = (
        f"This is a multi-part message in MIME format.\r\n\r\n--{boundary}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\nThe text part.\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n<p>The HTML part.</p>\r\n\r\n"
    )
    if closed:
        body += f"--{boundary}--\r\n\r\nAn epilogue.\r\n"
    return _message("MIME-Version: 1.0", f'Content-Type: multipart/{kind};\r\n\tboundary="{boundary}"',
                    body=body.encode(), subject=f"multipart/{kind}")


def _lines(prefix: str, count: int, width: int = 70) -> bytes:
    line = (prefix * width)[:width]
    return b"".join(f"{line} {n:06d}\r\n".encode() for n in range(count))


CORPUS: tuple[Case, ...] = (
    # -- plain text
    Case("plain", _message(*_TEXT, body=b"A plain message.\r\nTwo lines.\r\n")),
    Case("no-mime-headers", _message(body=b"No MIME headers at all: text/plain by default.\r\n")),
    Case("several-recipients", _message(*_TEXT),
         recipients=("bob@example.net", "carol@example.net", "dave@example.org")),
    Case("empty-body", _message(*_TEXT, body=b"")),
    Case("blank-lines-body", _message(*_TEXT, body=b"\r\n\r\n\r\n")),
    Case("no-final-newline", _message(*_TEXT, body=b"The last line has no line end")),
    Case("dots", _message(*_TEXT, body=b".\r\n..\r\n.leading dot\r\n...three\r\nend\r\n")),
    Case("trailing-space", _message(*_TEXT, body=b"trailing spaces   \r\n\ttab line\t\r\n \r\n")),
    Case("no-subject", _message(*_TEXT, subject=None)),
    Case("empty-subject", _message(*_TEXT, subject="")),
    # -- charsets and transfer encodings
    Case("utf8-8bit", _message(*_UTF8, body="Grüße aus Köln, ça va? 日本語\r\n".encode()),
         mail_options=("BODY=8BITMIME",)),
    Case("latin1-8bit",
         _message("MIME-Version: 1.0", "Content-Type: text/plain; charset=iso-8859-1",
                  "Content-Transfer-Encoding: 8bit", body="Grüße, naïve café\r\n".encode("latin-1")),
         mail_options=("BODY=8BITMIME",)),
    Case("quoted-printable",
         _message("MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                  "Content-Transfer-Encoding: quoted-printable",
                  body=b"Gr=C3=BC=C3=9Fe, a soft=\r\nbreak and a long line " + b"x" * 60 + b"=\r\n\r\n")),
    Case("base64",
         _message("MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                  "Content-Transfer-Encoding: base64", body=b"SGVsbG8sIGJhc2U2NCB3b3JsZC4K\r\n")),
    Case("html-only", _message("MIME-Version: 1.0", "Content-Type: text/html; charset=us-ascii",
                               body=b"<html><body><p>HTML only: no footer.</p></body></html>\r\n")),
    # -- MIME structures
    Case("multipart-mixed", _multipart("mixed")),
    Case("multipart-alternative", _multipart("alternative")),
    Case("multipart-mixed-unclosed", _multipart("mixed", closed=False)),
    # -- headers an MTA might store differently
    Case("folded-headers", _message(
        *_TEXT, "X-Folded: first line\r\n\tsecond line\r\n  third line",
        subject="a folded\r\n subject that goes on")),
    Case("long-header", _message(*_TEXT, "X-Long: " + "y" * 900, subject="s" * 300)),
    Case("very-long-header", _message(*_TEXT, "X-Very-Long: " + "z" * 3000)),
    Case("eight-bit-header", _message(*_TEXT, "X-Raw: Gr\xfc\xdfe".encode("latin-1"),
                                      subject="Grüße aus Köln".encode())),
    Case("encoded-words", _message(*_TEXT, subject="=?utf-8?q?gr=C3=BC=C3=9Fe?= and =?utf-8?b?S8O2bG4=?=")),
    Case("odd-spacing", _message(*_TEXT, "X-Tight:tight", "X-Tab:\ttab", "X-Spaces:    spaces", "X-Empty:")),
    Case("many-headers", _message(*_TEXT, *(f"X-Header-{n:03d}: value {n}" for n in range(60)))),
    Case("existing-stamp", _message(*_TEXT, "X-Filtered-By: someone else earlier")),
    Case("duplicate-subjects", _message(*_TEXT, "Subject: a second subject"), notes="neither matches"),
    # -- words
    Case("subject-viagra", _message(*_TEXT, subject="Cheap VIAGRA here"), refused=True),
    Case("subject-casino", _message(*_TEXT, subject="Casino night"), refused=True),
    Case("subject-casinos", _message(*_TEXT, subject="casinos and casinoroyale"),
         notes=r"\bcasino\b does not match"),
    Case("second-subject-viagra", _message(*_TEXT, "Subject: viagra"), refused=True),
    Case("folded-subject-casino", _message(*_TEXT, subject="a folded subject about the\r\n\tcasino"),
         refused=True),
    Case("body-viagra", _message(*_TEXT, body=b"Line one.\r\nBuy viagra now.\r\n"), refused=True),
    Case("body-casino-late", _message(*_TEXT, body=_lines("a", 1200) + b"a casino at the end\r\n"),
         refused=True, notes="beyond the first 64 KiB body chunk"),
    Case("large-body", _message(*_TEXT, body=_lines("b", 3000)), notes="several body chunks, then a footer"),
    # -- quarantine
    Case("quarantined-sender", _message(*_TEXT), sender=f"mallory@{QUARANTINED}"),
    Case("quarantined-subdomain", _message(*_TEXT), sender=f"eve@mail.{QUARANTINED}"),
    Case("quarantined-and-aliased", _message(*_TEXT), sender=f"mallory@{QUARANTINED}",
         recipients=(ALIAS, "bob@example.net")),
    Case("quarantined-and-refused", _message(*_TEXT, subject="casino"), sender=f"mallory@{QUARANTINED}",
         refused=True),
    # -- aliases
    Case("alias", _message(*_TEXT), recipients=(ALIAS,)),
    Case("alias-and-others", _message(*_TEXT), recipients=("zed@example.net", ALIAS, "bob@example.net")),
    Case("alias-in-capitals", _message(*_TEXT), recipients=("SALES@Example.COM",)),
    Case("alias-twice", _message(*_TEXT), recipients=(ALIAS, ALIAS)),
    Case("alias-target-also-given", _message(*_TEXT), recipients=("alice@example.com", ALIAS)),
    Case("dsn-options", _message(*_TEXT), recipients=(ALIAS, "bob@example.net"),
         mail_options=("RET=HDRS", "ENVID=corpus-envid"), rcpt_options=("NOTIFY=SUCCESS,FAILURE",)),
    Case("null-sender", _message(*_TEXT), sender=""),
    # -- refusals by the Verdicts filter of the verdicts lineup (plain messages for the others)
    Case("rcpt-refused", _message(*_TEXT), recipients=("reject-rcpt@example.net", "bob@example.net")),
    Case("rcpt-tempfailed", _message(*_TEXT), recipients=("bob@example.net", "tempfail-rcpt@example.net")),
    Case("rcpt-refused-in-lines", _message(*_TEXT), recipients=("custom-rcpt@example.net", "carol@example.net")),
    Case("every-rcpt-refused", _message(*_TEXT), recipients=("reject-rcpt@example.net",), verdict="refused"),
    Case("mail-refused", _message(*_TEXT), sender="reject-mail@example.org", verdict="refused"),
    Case("mail-accepted", _message(*_TEXT), sender="accept-mail@example.org"),
    Case("header-refused", _message(*_TEXT, "X-Verdict: reject"), verdict="refused"),
    Case("body-tempfailed", _message(*_TEXT, body=b"a TEMPFAIL-BODY line\r\n"), verdict="refused"),
    Case("eom-refused", _message(*_TEXT, subject="reject-eom"), verdict="refused"),
)
