"""txmilt-check's conversation, report and load mode against txmilt milters served in memory (no sockets)."""

from __future__ import annotations

import io
import json
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from typing_extensions import override

from examples.alias_rewriter import AliasRewriter
from examples.disclaimer import Disclaimer
from examples.header_stamp import HeaderStamp
from examples.quarantine_sender import QuarantineSender
from examples.word_rejecter import WordRejecter
from txmilt.chain import FilterSpec
from txmilt.check.load import LoadPlan, ProgressBar, percentile, run_load
from txmilt.check.play import CheckError, MilterSession, Played
from txmilt.check.report import JSON, check_report
from txmilt.check.status import ExitStatus
from txmilt.check.text import check_text, load_text
from txmilt.client import MilterClient
from txmilt.conversation import DEFAULT_CLIENT, DEFAULT_HELO, Mail
from txmilt.errors import MilterUnavailableError
from txmilt.messages import Negotiate, Reject
from txmilt.mta import POSTFIX, SENDMAIL, MTAProfile
from txmilt.protocol import MilterFactory
from txmilt.testing import RecordingMilter

T = TypeVar("T")

MAIL = Mail(
    "<alice@suspicious.example>",
    [("<sales@example.com>", ()), ("<carol@example.net>", ())],
    [("From", "Alice <alice@suspicious.example>"), ("To", "sales@example.com"), ("Subject", "Hello"),
     ("Content-Type", "text/plain")],
    b"Hi there.\r\n",
)


class Garbler(Protocol):
    """A 'milter' that answers OPTNEG with a response no milter may send."""

    @override
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"\x00\x00\x00\x01Z")  # type: ignore[union-attr]


class Loopback:
    """Milters by address, served in memory: a Connector whose clients talk to them through iosim pumps."""

    def __init__(self, milters: Mapping[str, Sequence[Any] | MilterFactory | type[Protocol]]) -> None:
        self.clock = Clock()
        self.servers: dict[str, Any] = {}
        for address, members in milters.items():
            if isinstance(members, MilterFactory | type):
                self.servers[address] = members
            else:
                self.servers[address] = MilterFactory(list(members), self.clock)
        self.pumps: list[IOPump] = []
        self.connections = 0

    def connect(self, address: str, offer: Negotiate, timeout: float) -> Deferred[MilterClient]:
        server = self.servers.get(address)
        if server is None:
            return fail(MilterUnavailableError(f"cannot connect to milter at {address}: refused"))
        self.connections += 1

        def build() -> Protocol:
            protocol: Protocol | None = server() if isinstance(server, type) else server.buildProtocol(None)
            assert protocol is not None
            return protocol

        client, _, pump = connectedServerAndClient(build, lambda: MilterClient(self.clock, timeout=timeout))
        self.pumps.append(pump)
        return client.negotiate(offer).addCallback(lambda _: client)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
        """Start ``coroutine`` and move bytes until it is done or nothing moves any more."""
        done = Deferred.fromCoroutine(coroutine)
        while not done.called:
            moved = [pump.pump() for pump in list(self.pumps)]  # every pump, each time
            if not any(moved):
                break
        return done

    def open(self, addresses: Sequence[str], profile: MTAProfile = POSTFIX, **kwargs: Any) -> Any:
        return MilterSession.open(addresses, self.connect, profile, timeout=30, clock=self.clock.seconds, **kwargs)


class CheckTestCase(SynchronousTestCase):
    def play(self, loop: Loopback, addresses: Sequence[str], mail: Mail = MAIL, **kwargs: Any) -> tuple[Played, JSON]:
        async def check() -> tuple[Played, JSON]:
            session = await loop.open(addresses, **kwargs)
            played = await session.message(mail, DEFAULT_CLIENT, DEFAULT_HELO)
            await session.close()
            negotiated = [client.negotiated for client in session.clients]
            profile = kwargs.get("profile", POSTFIX)
            return played, check_report(addresses, negotiated, profile, DEFAULT_CLIENT, DEFAULT_HELO, mail, played)

        played, report = self.successResultOf(loop.run(check()))
        json.dumps(report)  # every value is JSON
        return played, report


EXAMPLES = [HeaderStamp, Disclaimer, AliasRewriter, QuarantineSender]


class CheckTests(CheckTestCase):
    """One message through real txmilt milters: what the report says."""

    def test_examples(self) -> None:
        """Each example's change shows in the report, and the resulting message carries them."""
        _, report = self.play(Loopback({"inet:1@a": EXAMPLES}), ["inet:1@a"])
        self.assertEqual(report["exit_status"], ExitStatus.ACCEPTED)
        kinds = [change["change"] for change in report["changes"]]
        self.assertEqual(sorted(kinds), sorted([
            "add_header", "replace_body", "delete_recipient", "add_recipient", "add_recipient", "quarantine",
        ]))
        stamp = next(change for change in report["changes"] if change["change"] == "add_header")
        self.assertEqual(stamp["header"], "X-Filtered-By: txmilt on mx.example.net (client 192.0.2.10)")
        result = report["result"]
        self.assertEqual(result["recipients"], ["<carol@example.net>", "<alice@example.com>", "<bob@example.com>"])
        self.assertEqual(result["quarantine"], "sender domain suspicious.example is quarantined")
        self.assertIn("+X-Filtered-By: txmilt on mx.example.net (client 192.0.2.10)", result["diff"])
        self.assertIn("+This message was checked by txmilt.", result["diff"])
        self.assertTrue(result["message"].endswith("-- \r\nThis message was checked by txmilt.\r\n"))
        milter = report["milters"][0]
        self.assertIn("QUARANTINE", milter["actions"])
        # The milter's names, then the MTAs' defaults, which a requested list would otherwise replace.
        self.assertEqual(milter["macros"], {"connect": [
            "{client_addr}", "j", "{daemon_name}", "{daemon_addr}", "v", "_", "{if_name}", "{if_addr}",
        ]})
        connect = report["stages"][0]
        self.assertEqual((connect["command"], connect["reply"]), ("CONNECT", "continue"))
        self.assertEqual(connect["macros"], {
            "{client_addr}": "192.0.2.10", "j": "mx.example.net", "{daemon_name}": "mx.example.net",
            "{daemon_addr}": "192.0.2.1", "v": "Postfix 3.7.11", "_": "mail.example.com [192.0.2.10]",
        })
        text = check_text(report)
        self.assertIn("milter 1  add header X-Filtered-By: txmilt on mx.example.net (client 192.0.2.10)", text)
        self.assertIn("held in quarantine: sender domain suspicious.example is quarantined", text)
        self.assertIn("verdict   continue: the message would be delivered (exit status 0)", text)

    def test_milters_in_turn(self) -> None:
        """The second milter receives the message with the first one's header; both stamps end up in it."""
        loop = Loopback({"inet:1@a": [HeaderStamp], "inet:2@b": [FilterSpec(lambda: HeaderStamp(name="second"))]})
        _, report = self.play(loop, ["inet:1@a", "inet:2@b"])
        second = [s["argument"] for s in report["stages"] if s["milter"] == 2 and s["command"] == "HEADER"]
        self.assertEqual(second[-1], "X-Filtered-By: txmilt on mx.example.net (client 192.0.2.10)")
        self.assertEqual([c["milter"] for c in report["changes"]], [1, 2])
        self.assertIn("HEADER x5", check_text(report))
        self.assertEqual(loop.connections, 2)

    def test_reject_with_reply(self) -> None:
        """A rejection shows who refused, where, and its SMTP reply; the exit status is 1."""
        mail = Mail(MAIL.sender, MAIL.recipients, [("Subject", "casino night")], b"")
        _, report = self.play(Loopback({"inet:1@a": [WordRejecter]}), ["inet:1@a"], mail)
        verdict = report["verdict"]
        self.assertEqual((verdict["reply"], verdict["milter"], verdict["stage"]), ("reject", 1, "HEADER"))
        self.assertEqual(verdict["smtp_reply"][0], "550-5.7.1 Rejected: the subject contains 'casino'.")
        self.assertEqual(report["exit_status"], ExitStatus.REJECTED)
        self.assertEqual(report["result"]["diff"], "")
        text = check_text(report)
        self.assertIn("verdict   reject by milter 1 at HEADER (Subject: casino night)", text)
        self.assertIn("          550 5.7.1 Contact postmaster if this is wrong.", text)

    def test_refused_recipient(self) -> None:
        """A recipient refused at RCPT is listed; the message goes on to the others."""
        refuse = RecordingMilter({"rcpt_to": lambda c: Reject("no such user", code=550, status="5.1.1")
                                  if "sales" in c.address else None})
        _, report = self.play(Loopback({"inet:1@a": [FilterSpec(lambda: refuse)]}), ["inet:1@a"])
        self.assertEqual(report["refused_recipients"], [
            {"recipient": "<sales@example.com>", "reply": "reject", "smtp_reply": ["550 5.1.1 no such user"]},
        ])
        self.assertEqual(report["exit_status"], ExitStatus.ACCEPTED)
        self.assertIn("refused   <sales@example.com>: 550 5.1.1 no such user", check_text(report))

    def test_sendmail_profile(self) -> None:
        """The Sendmail profile's macros reach the milter (Sendmail's {daemon_name} is MTA)."""
        recorder = RecordingMilter()
        played, _ = self.play(Loopback({"inet:1@a": [FilterSpec(lambda: recorder)]}), ["inet:1@a"], profile=SENDMAIL)
        self.assertEqual(recorder.calls[0].macros["daemon_name"], "MTA")
        self.assertEqual(played.outcome.verdict.__class__.__name__, "Continue")

    def test_macro_overrides(self) -> None:
        """--macro values replace the profile's; None leaves the macro out."""
        _, report = self.play(Loopback({"inet:1@a": [HeaderStamp]}), ["inet:1@a"], macros={"j": "mx.test"})
        self.assertIn("+X-Filtered-By: txmilt on mx.test (client 192.0.2.10)", report["result"]["diff"])
        _, report = self.play(Loopback({"inet:1@a": [HeaderStamp]}), ["inet:1@a"], macros={"j": None})
        self.assertIn("+X-Filtered-By: txmilt (client 192.0.2.10)", report["result"]["diff"])
        self.assertNotIn("j", report["stages"][0]["macros"])
        self.assertEqual(report["stages"][0]["macros"]["{client_addr}"], "192.0.2.10")


class FailureTests(SynchronousTestCase):
    """A milter that cannot be checked gives a CheckError of the right kind."""

    def check(self, loop: Loopback, mail: Mail = MAIL) -> Deferred[None]:
        async def check() -> None:
            session = await loop.open(["inet:1@a"])
            await session.message(mail, DEFAULT_CLIENT, DEFAULT_HELO)

        return loop.run(check())

    def error(self, done: Deferred[None]) -> CheckError:
        error = self.failureResultOf(done, CheckError).value
        assert isinstance(error, CheckError)
        return error

    def test_unreachable(self) -> None:
        """No milter at the address: kind connect."""
        self.assertEqual(self.error(self.check(Loopback({}))).kind, "connect")

    def test_protocol_violation(self) -> None:
        """A response no milter may send: kind protocol, naming the address."""
        error = self.error(self.check(Loopback({"inet:1@a": Garbler})))
        self.assertEqual(error.kind, "protocol")
        self.assertTrue(str(error).startswith("inet:1@a: unknown response 'Z'"), str(error))

    def test_closed(self) -> None:
        """A milter that drops the connection mid-message (a header over its frame limit): kind closed."""
        loop = Loopback({"inet:1@a": MilterFactory([RecordingMilter], Clock(), frame_limit=100)})
        mail = Mail(MAIL.sender, MAIL.recipients, [("X-Big", "x" * 200)], b"")
        self.assertEqual(self.error(self.check(loop, mail)).kind, "closed")

    def test_timeout(self) -> None:
        """A milter silent past the timeout: kind timeout."""
        silent = RecordingMilter({"mail_from": lambda c: Deferred()})
        loop = Loopback({"inet:1@a": [FilterSpec(lambda: silent, timeout=1000)]})
        done = self.check(loop)
        self.assertNoResult(done)
        loop.clock.advance(30)
        error = self.error(done)
        self.assertEqual(error.kind, "timeout")
        self.assertIn("no reply to MAIL ('M') within 30", str(error))


class LoadTests(SynchronousTestCase):
    """The load mode counts verdicts, errors and latencies, and reuses connections."""

    def load(self, loop: Loopback, plan: LoadPlan, progress: ProgressBar | None = None) -> JSON:
        result = self.successResultOf(loop.run(run_load(
            plan, lambda: loop.open(["inet:1@a"]), MAIL, DEFAULT_CLIENT, DEFAULT_HELO,
            clock=loop.clock.seconds, progress=progress,
        )))
        report = result.report(["inet:1@a"], "Postfix")
        json.dumps(report)
        return report

    def test_replays(self) -> None:
        """Every message gets its verdict; a connection carries up to K messages."""
        loop = Loopback({"inet:1@a": EXAMPLES})
        report = self.load(loop, LoadPlan(7, concurrency=3, messages_per_connection=2))
        self.assertEqual((report["answered"], report["verdicts"], report["errors"]), (7, {"continue": 7}, {}))
        self.assertEqual(report["exit_status"], ExitStatus.ACCEPTED)
        self.assertEqual(loop.connections, 4)  # workers carry 3, 2, 2 messages
        self.assertEqual(set(report["latency_ms"]), {"p50", "p90", "p99", "max", "mean"})
        self.assertIn("verdicts    continue 7", load_text(report))

    def test_errors_by_kind(self) -> None:
        """Messages that fail are counted by kind, with the first message of each; the exit status is 4."""
        report = self.load(Loopback({}), LoadPlan(5, concurrency=2))
        self.assertEqual((report["answered"], report["errors"]), (0, {"connect": 5}))
        self.assertEqual(report["error_examples"], {"connect": "cannot connect to milter at inet:1@a: refused"})
        self.assertEqual(report["exit_status"], ExitStatus.FAILED)
        self.assertEqual(report["latency_ms"], {})
        self.assertIn("errors      connect 5", load_text(report))

    def test_session_decided_at_connect_reconnects(self) -> None:
        """A session refused at CONNECT is not reused: every message dials again."""
        loop = Loopback({"inet:1@a": [FilterSpec(lambda: RecordingMilter({"connect": Reject()}))]})
        report = self.load(loop, LoadPlan(3, messages_per_connection=5))
        self.assertEqual((report["verdicts"], loop.connections), ({"reject": 3}, 3))

    def test_progress_bar(self) -> None:
        """The bar is drawn in place and ends its line."""
        stream = io.StringIO()
        self.load(Loopback({"inet:1@a": EXAMPLES}), LoadPlan(2), ProgressBar(stream, 2, clock=lambda: 1.0))
        self.assertTrue(stream.getvalue().startswith("\r["))
        self.assertIn("] 2/2", stream.getvalue())
        self.assertTrue(stream.getvalue().endswith("errors 0\x1b[K\n"))

    def test_percentile(self) -> None:
        """Nearest rank: p50 of 1..10 is 5, p90 is 9, p99 is 10."""
        values = [float(n) for n in range(1, 11)]
        self.assertEqual([percentile(values, p) for p in (50, 90, 99, 100)], [5.0, 9.0, 10.0, 10.0])
        self.assertEqual(percentile([3.0], 1), 3.0)
