"""The example filters, each driven through FakeMTA as a user would test them."""

from __future__ import annotations

import ast
import asyncio
import base64
import email
import email.policy
import functools
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from examples.alias_rewriter import AliasRewriter
from examples.disclaimer import Disclaimer
from examples.header_stamp import HeaderStamp
from examples.policy_check import PolicyCheck, verdict
from examples.quarantine_sender import QuarantineSender
from examples.word_rejecter import SubjectOnlyRejecter, WordRejecter
from txmilt.config import read_config
from txmilt.interfaces import IMilter
from txmilt.messages import Continue, MailFrom, Reject, Response, Skip, TempFail
from txmilt.testing import FakeMTA

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "milter.toml"
SENDER = "<alice@example.com>"
RCPT = ["<bob@example.net>"]
HEADERS = [("From", "Alice <alice@example.com>"), ("Subject", "Lunch")]


class ExampleInterfaceTests(SynchronousTestCase):
    def test_all_provide_imilter(self) -> None:
        """Every example filter provides IMilter."""
        for cls in (HeaderStamp, WordRejecter, SubjectOnlyRejecter, AliasRewriter, Disclaimer, QuarantineSender,
                    PolicyCheck):
            self.assertTrue(verifyObject(IMilter, cls()))

    def test_example_config_loads(self) -> None:
        """examples/milter.toml names every example in order, with options that construct."""
        config = read_config(str(EXAMPLE_CONFIG))
        names = [spec.name for spec in config.filters]
        self.assertEqual(names, ["words", "quarantine", "aliases", "disclaimer", "stamp"])

    def test_example_chain(self) -> None:
        """The example chain stamps, rewrites aliases and adds the footer in one pass."""
        config = read_config(str(EXAMPLE_CONFIG))
        result = FakeMTA(config.filters).message(
            SENDER, ["<sales@example.com>"], [*HEADERS, ("Content-Type", "text/plain")], b"Hi\r\n"
        )
        self.assertEqual(result.verdict, Continue())
        self.assertEqual([r for r, _ in result.recipients], ["<alice@example.com>", "<bob@example.com>"])
        self.assertIn("X-Filtered-By", [name for name, _ in result.headers])
        self.assertIn(b"checked by txmilt", result.body)


class ExampleImportTests(SynchronousTestCase):
    def test_examples_import_from_txmilt_only(self) -> None:
        """The examples import txmilt names from the package itself, as the README does."""
        for path in EXAMPLE_CONFIG.parent.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("txmilt"):
                    self.assertEqual(node.module, "txmilt", path.name)
                if isinstance(node, ast.Import):
                    self.assertFalse([a.name for a in node.names if a.name.startswith("txmilt")], path.name)

    def test_package_names_load_lazily(self) -> None:
        """``import txmilt`` loads no Twisted, and reaching txmilt.serve installs no reactor."""
        code = (
            "import sys, txmilt; assert 'twisted' not in sys.modules, 'twisted imported';"
            "txmilt.serve; txmilt.Milter; assert 'twisted.internet.reactor' not in sys.modules, 'reactor installed'"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              cwd=EXAMPLE_CONFIG.parent.parent)
        self.assertEqual(done.returncode, 0, done.stderr)


class HeaderStampTests(SynchronousTestCase):
    def test_stamp_names_client(self) -> None:
        """The stamp carries the host from macro j and the client address."""
        mta = FakeMTA([HeaderStamp], macros={"j": "mx.example.net", "{client_addr}": "192.0.2.7"})
        result = mta.message(SENDER, RCPT, HEADERS, b"Hi\r\n")
        self.assertIn(("X-Filtered-By", "txmilt on mx.example.net (client 192.0.2.7)"), result.headers)

    def test_stamp_without_macros(self) -> None:
        """Without macros the stamp falls back to the CONNECT address."""
        mta = FakeMTA([functools.partial(HeaderStamp, header="X-Stamp")], macros={"j": None, "{client_addr}": None})
        result = mta.message(SENDER, RCPT, HEADERS, b"Hi\r\n")
        self.assertIn(("X-Stamp", "txmilt (client 192.0.2.10)"), result.headers)

    def test_one_stamp_per_message(self) -> None:
        """Two messages on one connection get one stamp each."""
        mta = FakeMTA([HeaderStamp])
        for _ in range(2):
            result = mta.message(SENDER, RCPT, HEADERS, b"Hi\r\n")
            self.assertEqual([name for name, _ in result.headers].count("X-Filtered-By"), 1)


class WordRejecterTests(SynchronousTestCase):
    def test_subject_rejected_with_multiline_reply(self) -> None:
        """A spammy subject is refused with a three-line 550 5.7.1 reply."""
        result = FakeMTA([WordRejecter]).message(SENDER, RCPT, [("Subject", "Win at the CASINO")], b"x\r\n")
        self.assertIsInstance(result.verdict, Reject)
        assert isinstance(result.verdict, Reject)
        self.assertEqual((result.verdict.code, result.verdict.status), (550, "5.7.1"))
        self.assertEqual(len(result.verdict.text), 3)
        self.assertIn("CASINO", result.verdict.text[0])
        self.assertFalse(result.delivered)

    def test_body_match_across_chunks(self) -> None:
        """A word split over two body chunks is still found."""
        body = b"a" * (65535 - 3) + b"viagra\r\n"
        result = FakeMTA([WordRejecter]).message(SENDER, RCPT, HEADERS, body)
        self.assertIsInstance(result.verdict, Reject)

    def test_clean_mail_passes(self) -> None:
        """Mail without the words is accepted unchanged."""
        result = FakeMTA([WordRejecter]).message(SENDER, RCPT, HEADERS, b"See you at noon.\r\n")
        self.assertEqual(result.verdict, Continue())
        self.assertEqual(result.body, b"See you at noon.\r\n")

    def test_custom_patterns(self) -> None:
        """Patterns come from the constructor (the config file's options)."""
        rejecter = functools.partial(WordRejecter, patterns=["lunch"], reply=["Not hungry."])
        result = FakeMTA([rejecter]).message(SENDER, RCPT, HEADERS, b"x\r\n")
        assert isinstance(result.verdict, Reject)
        self.assertEqual(result.verdict.text[-1], "Not hungry.")

    def test_state_reset_between_messages(self) -> None:
        """The body kept from one message does not join the next one's (reset() clears it)."""
        mta = FakeMTA([WordRejecter])
        self.assertEqual(mta.message(SENDER, RCPT, HEADERS, b"ends with via").verdict, Continue())
        self.assertEqual(mta.message(SENDER, RCPT, HEADERS, b"gra starts this one").verdict, Continue())

    def test_subject_only_skips_body(self) -> None:
        """SubjectOnlyRejecter answers the first body chunk with Skip."""
        mta = FakeMTA([SubjectOnlyRejecter])
        result = mta.message(SENDER, RCPT, HEADERS, b"viagra " * 30000)
        self.assertEqual(result.verdict, Continue())
        responses = [response for step in result.steps for response in step.responses]
        self.assertEqual(responses.count(Skip()), 1)


class AliasRewriterTests(SynchronousTestCase):
    def test_alias_expanded(self) -> None:
        """An alias recipient is deleted and replaced by its targets; others stay."""
        aliases = {"team@example.net": ["ann@example.net", "ben@example.net"]}
        result = FakeMTA([functools.partial(AliasRewriter, aliases=aliases)]).message(
            SENDER, ["<Team@example.net>", "<carl@example.net>"], HEADERS, b"Hi\r\n"
        )
        self.assertEqual(
            sorted(r for r, _ in result.recipients),
            ["<ann@example.net>", "<ben@example.net>", "<carl@example.net>"],
        )

    def test_no_alias_no_change(self) -> None:
        """Without aliases among the recipients nothing changes."""
        result = FakeMTA([AliasRewriter]).message(SENDER, RCPT, HEADERS, b"Hi\r\n")
        self.assertEqual(result.modifications, [])

    def test_state_reset_between_messages(self) -> None:
        """A rewrite in one message does not leak into the next."""
        mta = FakeMTA([AliasRewriter])
        mta.message(SENDER, ["<sales@example.com>"], HEADERS, b"Hi\r\n")
        result = mta.message(SENDER, RCPT, HEADERS, b"Hi\r\n")
        self.assertEqual(result.modifications, [])


class QuarantineSenderTests(SynchronousTestCase):
    def test_listed_domain_quarantined(self) -> None:
        """Mail from a listed domain (or a subdomain) is held and still accepted."""
        for sender in ("<x@suspicious.example>", "<y@mail.suspicious.example>"):
            result = FakeMTA([QuarantineSender]).message(sender, RCPT, HEADERS, b"Hi\r\n")
            self.assertIsNotNone(result.quarantined)
            self.assertEqual(result.verdict, Continue())

    def test_other_domain_passes(self) -> None:
        """Mail from other domains is not held."""
        result = FakeMTA([QuarantineSender]).message("<x@notsuspicious.example>", RCPT, HEADERS, b"Hi\r\n")
        self.assertIsNone(result.quarantined)


class DisclaimerTests(SynchronousTestCase):
    def send(self, headers: list[tuple[str, str]], body: bytes) -> bytes:
        return FakeMTA([Disclaimer]).message(SENDER, RCPT, [*HEADERS, *headers], body).body

    def test_plain_text(self) -> None:
        """A plain text body gets the footer after a signature separator."""
        body = self.send([("Content-Type", "text/plain; charset=us-ascii")], b"Hello\r\n")
        self.assertEqual(body, b"Hello\r\n\r\n-- \r\nThis message was checked by txmilt.\r\n")

    def test_no_content_type_is_text(self) -> None:
        """A body without Content-Type is text/plain and gets the footer."""
        self.assertTrue(self.send([], b"Hello").endswith(b"checked by txmilt.\r\n"))

    def test_base64_text(self) -> None:
        """A base64 text body is decoded, extended and encoded again."""
        encoded = base64.encodebytes("Grüße\r\n".encode()).replace(b"\n", b"\r\n")
        body = self.send(
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Transfer-Encoding", "base64")], encoded
        )
        self.assertIn(b"checked by txmilt", base64.b64decode(body))
        self.assertTrue(base64.b64decode(body).startswith("Grüße".encode()))

    def test_multipart_mixed_gets_part(self) -> None:
        """A multipart/mixed body gets a new text part before the closing boundary."""
        raw = b"--XX\r\nContent-Type: text/plain\r\n\r\nHi\r\n--XX--\r\n"
        body = self.send([("MIME-Version", "1.0"), ("Content-Type", 'multipart/mixed; boundary="XX"')], raw)
        message = email.message_from_bytes(
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="XX"\r\n\r\n' + body,
            policy=email.policy.default,
        )
        parts = [part.get_content().strip() for part in message.iter_parts()]
        self.assertEqual(parts, ["Hi", "This message was checked by txmilt."])

    def test_alternative_and_html_untouched(self) -> None:
        """multipart/alternative and HTML bodies pass unchanged."""
        raw = b"--B\r\nContent-Type: text/plain\r\n\r\nHi\r\n--B--\r\n"
        self.assertEqual(self.send([("Content-Type", 'multipart/alternative; boundary="B"')], raw), raw)
        self.assertEqual(self.send([("Content-Type", "text/html")], b"<p>Hi</p>"), b"<p>Hi</p>")

    def test_oversized_body_untouched(self) -> None:
        """A body over max_body passes unchanged."""
        small = functools.partial(Disclaimer, max_body=10)
        result = FakeMTA([small]).message(SENDER, RCPT, HEADERS, b"0123456789abcdef\r\n")
        self.assertEqual(result.body, b"0123456789abcdef\r\n")


#: What the test policy service answers for each recipient (DUNNO for the others).
POLICY_ANSWERS = {
    "spam@example.net": "REJECT No spam here",
    "grey@example.net": "DEFER_IF_PERMIT Greylisted, try again later",
    "custom@example.net": "554 5.7.1 Not this one",
}


class PolicyService:
    """A Postfix policy service for one test: answers by recipient, records the requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = {}
        while line := (await reader.readline()).decode().strip():
            name, _, value = line.partition("=")
            request[name] = value
        self.requests.append(request)
        writer.write(f"action={POLICY_ANSWERS.get(request['recipient'], 'DUNNO')}\n\n".encode())
        await writer.drain()
        writer.close()


class PolicyCheckTests(SynchronousTestCase):
    def test_actions(self) -> None:
        """Policy actions become verdicts; the rest (OK, DUNNO, PREPEND, ...) continue."""
        cases = {
            "DUNNO": None,
            "OK": None,
            "PREPEND X-Seen: yes": None,
            "DEFER_IF_REJECT maybe": None,
            "REJECT": Reject(),
            "reject Go away": Reject("Go away"),
            "REJECT 5.7.2 Go away": Reject("Go away", status="5.7.2"),
            "DEFER": TempFail(),
            "DEFER_IF_PERMIT Greylisted": TempFail("Greylisted"),
            "554 5.7.1 Not here": Reject("Not here", code=554, status="5.7.1"),
            "450 Later": TempFail("Later", code=450),
            "550": Reject("", code=550),
        }
        for action, expected in cases.items():
            self.assertEqual(verdict(action), expected, action)

    def run_with_service(self, drive: Callable[[PolicyService, int], Awaitable[None]]) -> PolicyService:
        """Start a policy service on a free port and run ``drive`` on an asyncio loop, as the asyncio reactor would."""
        service = PolicyService()

        async def main() -> None:
            server = await asyncio.start_server(service.serve, "127.0.0.1", 0)
            async with server:
                await drive(service, server.sockets[0].getsockname()[1])

        asyncio.run(main())
        return service

    def test_recipients_judged_by_the_service(self) -> None:
        """Each RCPT is asked about with the client, HELO and the sender without brackets; refusals follow."""
        replies: list[list[Response]] = []

        async def drive(service: PolicyService, port: int) -> None:
            mta = FakeMTA([functools.partial(PolicyCheck, port=port)], macros={"{client_addr}": "192.0.2.7"})
            mta.connect("client.example", "192.0.2.7")
            mta.helo("client.example")
            mta.mail_from("<Alice@Example.com>")
            for rcpt in ("<bob@example.net>", "<spam@example.net>", "<grey@example.net>", "<custom@example.net>"):
                mta.rcpt_to(rcpt)
                for _ in range(500):
                    if arrived := mta.collect():
                        replies.append(arrived)
                        break
                    await asyncio.sleep(0.01)

        service = self.run_with_service(drive)
        self.assertEqual(replies, [
            [Continue()], [Reject("No spam here")], [TempFail("Greylisted, try again later")],
            [Reject("Not this one", code=554, status="5.7.1")],
        ])
        first = service.requests[0]
        self.assertEqual(
            {key: first[key] for key in ("request", "protocol_state", "client_address", "client_name", "helo_name",
                                         "sender", "recipient")},
            {"request": "smtpd_access_policy", "protocol_state": "RCPT", "client_address": "192.0.2.7",
             "client_name": "client.example", "helo_name": "client.example", "sender": "Alice@Example.com",
             "recipient": "bob@example.net"},
        )

    def test_sender_cleared_between_messages(self) -> None:
        """reset() forgets the sender, so a message without MAIL's sender does not inherit it."""
        filter_ = PolicyCheck()
        filter_.mail_from(MailFrom("<a@example.com>"))
        filter_.reset()
        self.assertEqual(filter_.sender, "")
