"""Resource limits: each has a default, a keyword, and a defined outcome with one log line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from tests.test_protocol import LogCapture
from txmilt.chain import DEFAULT_BODY_SPOOL_THRESHOLD, DEFAULT_MAX_BODY_SIZE, FilterSpec
from txmilt.codec import DEFAULT_FRAME_LIMIT, encode
from txmilt.config import DaemonConfig
from txmilt.messages import (
    Accept,
    Action,
    BodyChunk,
    Continue,
    Negotiate,
    ProtocolFlag,
    Reject,
    ReplaceBody,
    Skip,
    TempFail,
)
from txmilt.milter import Changes, FilterVerdict, Milter, Result
from txmilt.protocol import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_NEGOTIATION_TIMEOUT,
    MilterFactory,
)
from txmilt.session import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS
from txmilt.testing import FakeMTA, RecordingMilter

README = Path(__file__).resolve().parents[1] / "README.rst"
TOO_MANY = TempFail("Message has too many headers", code=452, status="4.3.1")
TOO_LARGE = TempFail("Message header section is too large", code=452, status="4.3.1")
RCPT = ["<b@example.net>"]


def headers(count: int, size: int = 1) -> list[tuple[str, str]]:
    return [(f"X-H{number}", "v" * size) for number in range(count)]


class QuietHeaders(RecordingMilter):
    """Reads headers without answering them (the MTA then sends them without waiting)."""

    no_reply = frozenset({"header"})


class QuietContent(RecordingMilter):
    """Reads headers and EOH without answering them."""

    no_reply = frozenset({"header", "end_of_headers"})


class DefaultsTests(SynchronousTestCase):
    """The documented defaults are the real ones."""

    def test_factory_defaults(self) -> None:
        """MilterFactory's defaults."""
        factory = MilterFactory([Milter], Clock())
        self.assertEqual(
            (factory.frame_limit, factory.idle_timeout, factory.negotiation_timeout, factory.max_connections,
             factory.max_headers, factory.max_header_bytes, factory.max_body_size, factory.body_spool_threshold),
            (1048576, 3600.0, 10.0, 2000, 1000, 1048576, 67108864, 1048576),
        )
        self.assertEqual(FilterSpec(Milter).timeout, 25.0)

    def test_readme_shows_the_defaults(self) -> None:
        """The [daemon] block in README.rst gives every limit at its default value."""
        text = README.read_text()
        blocks = re.findall(r"\.\. code-block:: toml\n\n((?:    .*\n|\n)+)", text)
        block = next(b for b in blocks if "[daemon]" in b)  # the config file section's example
        config = tomllib.loads("\n".join(line[4:] for line in block.splitlines()))
        daemon = config["daemon"]
        defaults = DaemonConfig()
        for key in ("frame_limit", "idle_timeout", "negotiation_timeout", "max_connections", "max_headers",
                    "max_header_bytes", "max_body_size", "body_spool_threshold", "drain_timeout",
                    "progress_interval"):
            self.assertEqual(daemon[key], getattr(defaults, key), key)
        self.assertEqual(daemon["timeout"], defaults.default_timeout)
        self.assertEqual(
            (DEFAULT_FRAME_LIMIT, DEFAULT_IDLE_TIMEOUT, DEFAULT_NEGOTIATION_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
             DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_BODY_SIZE, DEFAULT_BODY_SPOOL_THRESHOLD),
            (daemon["frame_limit"], daemon["idle_timeout"], daemon["negotiation_timeout"],
             daemon["max_connections"], daemon["max_headers"], daemon["max_header_bytes"], daemon["max_body_size"],
             daemon["body_spool_threshold"]),
        )


class HeaderLimitTests(SynchronousTestCase):
    """Too many headers, or too many header bytes, in one message: TempFail 452 4.3.1 at the next reply."""

    def mta(self, filters: list[Any], **limits: Any) -> tuple[FakeMTA, LogCapture]:
        logs = LogCapture(self)
        return FakeMTA(MilterFactory(filters, Clock(), **limits)), logs

    def test_count_answered_at_the_header(self) -> None:
        """With header replies due, the header past the limit is answered; filters saw only those before."""
        recorder = RecordingMilter()
        mta, logs = self.mta([lambda: recorder], max_headers=3)
        result = mta.message("<a@example.com>", RCPT, headers(5), b"body\r\n")
        self.assertEqual(result.verdict, TOO_MANY)
        self.assertEqual(len(recorder.arguments("header")), 3)
        self.assertNotIn("end_of_message", recorder.names)
        self.assertEqual(recorder.names.count("abort"), 1)
        conn = mta.protocol.connection_id
        self.assertEqual(len(logs.matching(f"[{conn}]", "headers 4 above the limit of 3")), 1, logs.lines())
        # The limit is per message: the next one on this connection goes through.
        self.assertTrue(mta.message("<a@example.com>", RCPT, headers(3), b"body\r\n").delivered)

    def test_count_answered_at_end_of_headers(self) -> None:
        """Without header replies, the answer waits for EOH; later headers reach no filter; one log line."""
        recorder = QuietHeaders()
        mta, logs = self.mta([lambda: recorder], max_headers=2)
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        for name, value in headers(6):
            self.assertEqual(mta.header(name, value), [])
        self.assertTrue(mta.session.protocol & ProtocolFlag.NR_HEADER)
        self.assertEqual(mta.end_of_headers(), [TOO_MANY])
        self.assertEqual(len(recorder.arguments("header")), 2)
        self.assertNotIn("end_of_headers", recorder.names)
        self.assertEqual(len(logs.matching("above the limit")), 1)

    def test_count_answered_at_end_of_message(self) -> None:
        """With neither header nor EOH replies, end of message answers; the body goes to no filter."""
        recorder = QuietContent()
        mta, _ = self.mta([lambda: recorder], max_headers=1)
        result = mta.message("<a@example.com>", RCPT, headers(3), b"body\r\n")
        self.assertEqual(result.verdict, TOO_MANY)
        self.assertNotIn("body", recorder.names)
        self.assertNotIn("end_of_message", recorder.names)

    def test_bytes(self) -> None:
        """The header bytes (names, values, NULs) have their own limit and reply text."""
        recorder = RecordingMilter()
        mta, logs = self.mta([lambda: recorder], max_header_bytes=100)
        result = mta.message("<a@example.com>", RCPT, headers(3, 40), b"body\r\n")  # 46 bytes each
        self.assertEqual(result.verdict, TOO_LARGE)
        self.assertEqual(len(recorder.arguments("header")), 2)
        self.assertEqual(len(logs.matching("header bytes 138 above the limit of 100")), 1, logs.lines())

    def test_no_limit(self) -> None:
        """0 switches a limit off."""
        mta, _ = self.mta([RecordingMilter], max_headers=0, max_header_bytes=0)
        self.assertTrue(mta.message("<a@example.com>", RCPT, headers(3000, 500), b"b\r\n").delivered)

    def test_default_limit(self) -> None:
        """By default the 1001st header is refused."""
        mta, _ = self.mta([RecordingMilter])
        self.assertTrue(mta.message("<a@example.com>", RCPT, headers(1000), b"b\r\n").delivered)
        self.assertEqual(mta.message("<a@example.com>", RCPT, headers(1001), b"b\r\n").verdict, TOO_MANY)

    def test_header_list_bounded(self) -> None:
        """The chain stops keeping headers (for end-of-message rebasing) past the limit."""
        mta, _ = self.mta([QuietHeaders], max_headers=5)
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        for name, value in headers(50):
            mta.header(name, value)
        self.assertLessEqual(len(mta.protocol.chain._copy.headers), 5)


class WholeBody(Milter):
    """Needs the whole body: replaces it with itself upper-cased, rejects a virus."""

    whole_body = True
    actions = Action.CHANGE_BODY
    seen: ClassVar[list[WholeBody]] = []

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.in_memory: list[bool] = []
        self.ended = 0
        WholeBody.seen.append(self)

    def end_of_message(self, changes: Changes) -> Result:
        return self.judge(changes)

    def judge(self, changes: Changes) -> FilterVerdict | None:
        self.ended += 1
        assert self.body_file is not None
        self.in_memory.append(not getattr(self.body_file, "_rolled", False))  # SpooledTemporaryFile's flag
        body = self.body_file.read()
        self.bodies.append(body)
        if b"VIRUS" in body:
            return Reject()
        changes.replace_body(body.upper())
        return None


class AsyncWholeBody(WholeBody):
    """Reads the body a while later, from a Deferred."""

    clock: ClassVar[Clock]

    async def end_of_message(self, changes: Changes) -> FilterVerdict | None:
        await deferLater(self.clock, 3, lambda: None)
        return self.judge(changes)


class BodyCounter(Milter):
    """Counts body chunks; never asks for the whole body."""

    def __init__(self) -> None:
        self.chunks = 0

    def body(self, command: BodyChunk) -> Result:
        self.chunks += 1
        return None


class WholeBodyTests(SynchronousTestCase):
    """A filter with ``whole_body`` reads the body from ``body_file`` at end of message."""

    def setUp(self) -> None:
        WholeBody.seen = []

    def run_message(self, body: bytes, filters: list[Any] | None = None, **limits: Any) -> Any:
        mta = FakeMTA(MilterFactory(filters or [WholeBody], Clock(), **limits))
        return mta, mta.message("<a@example.com>", RCPT, [("Subject", "s")], body)

    def test_whole_body(self) -> None:
        """Several chunks arrive as one file; no body reply is owed for a filter without body()."""
        body = b"line\r\n" * 30000  # 180000 bytes, three BODY packets
        mta, result = self.run_message(body)
        self.assertTrue(result.delivered)
        (filter_,) = WholeBody.seen[1:]  # the first was made by the factory to check the class
        self.assertEqual(filter_.bodies, [body])
        self.assertEqual(result.body, body.upper())
        self.assertTrue(mta.session.protocol & ProtocolFlag.NR_BODY)
        self.assertFalse(mta.session.protocol & ProtocolFlag.NO_BODY)
        self.assertIsNone(filter_.body_file)  # dropped once the message is over

    def test_memory_then_disk(self) -> None:
        """A body up to the spool threshold stays in memory; a larger one goes to a temporary file."""
        self.run_message(b"x" * 100, body_spool_threshold=100)
        self.run_message(b"x" * 101, body_spool_threshold=100)
        self.run_message(b"x", body_spool_threshold=0)
        self.assertEqual([f.in_memory for f in WholeBody.seen if f.ended], [[True], [False], [False]])

    def test_empty_body(self) -> None:
        """No body chunks: body_file is empty."""
        self.run_message(b"")
        self.assertEqual(WholeBody.seen[-1].bodies, [b""])

    def test_over_the_maximum(self) -> None:
        """Past max_body_size the filter gets its fallback at end of message, with one log line."""
        logs = LogCapture(self)
        counter = BodyCounter()
        mta, result = self.run_message(b"x" * 1000, [WholeBody, lambda: counter], max_body_size=999)
        self.assertEqual(result.verdict, TempFail())
        self.assertEqual(WholeBody.seen[-1].ended, 0)
        self.assertEqual(counter.chunks, 1)  # the other filter still read the body
        lines = logs.matching(f"[{mta.protocol.connection_id}]", "WholeBody", "over max_body_size (999 bytes)")
        self.assertEqual(len(lines), 1, logs.lines())

    def test_over_the_maximum_custom_fallback(self) -> None:
        """The filter's own fallback applies (here Accept: the message goes through unchanged)."""
        _, result = self.run_message(b"x" * 1000, [FilterSpec(WholeBody, fallback=Accept())], max_body_size=10)
        self.assertTrue(result.delivered)
        self.assertEqual(result.body, b"x" * 1000)
        self.assertFalse([m for m in result.modifications if isinstance(m, ReplaceBody)])

    def test_next_message_fresh(self) -> None:
        """Each message starts with an empty buffer; a refused one does not leak into the next."""
        mta = FakeMTA([WholeBody])
        self.assertEqual(mta.message("<a@x>", RCPT, [], b"VIRUS\r\n").verdict, Reject())
        self.assertTrue(mta.message("<a@x>", RCPT, [], b"clean\r\n").delivered)
        self.assertEqual(WholeBody.seen[-1].bodies, [b"VIRUS\r\n", b"clean\r\n"])

    def test_abort_drops_the_body(self) -> None:
        """An aborted message's buffer is closed."""
        mta = FakeMTA([WholeBody])
        mta.connect()
        mta.mail_from("<a@x>")
        mta.rcpt_to("<b@y>")
        mta.header("Subject", "s")
        mta.end_of_headers()
        mta.body(b"part")
        (member,) = mta.protocol.chain._members
        spool = member.spool
        assert spool is not None
        file = spool.file()
        mta.abort()
        self.assertTrue(file.closed)
        self.assertIsNone(member.spool)

    def test_disconnect_drops_the_body(self) -> None:
        """A connection lost mid-body closes the buffer."""
        mta = FakeMTA([WholeBody])
        mta.connect()
        mta.mail_from("<a@x>")
        mta.rcpt_to("<b@y>")
        mta.end_of_headers()
        mta.body(b"part")
        (member,) = mta.protocol.chain._members
        spool = member.spool
        assert spool is not None
        file = spool.file()
        mta.disconnect()
        self.assertTrue(file.closed)

    def test_async_end_of_message(self) -> None:
        """The file stays readable until a Deferred end_of_message settles."""
        clock = Clock()
        AsyncWholeBody.clock = clock
        mta = FakeMTA(MilterFactory([AsyncWholeBody], clock))
        result = mta.message("<a@x>", RCPT, [], b"slow\r\n")
        self.assertTrue(result.delivered)
        self.assertEqual(WholeBody.seen[-1].bodies, [b"slow\r\n"])

    def test_others_not_buffered(self) -> None:
        """Filters that did not opt in never have their chunks kept."""
        counter = BodyCounter()
        mta = FakeMTA([lambda: counter, RecordingMilter])
        mta.connect()
        mta.mail_from("<a@x>")
        mta.rcpt_to("<b@y>")
        mta.end_of_headers()
        mta.body(b"x" * 1000)
        self.assertEqual([m.spool for m in mta.protocol.chain._members], [None, None])
        self.assertEqual(counter.chunks, 1)

    def test_whole_body_with_body_callback(self) -> None:
        """A whole_body filter that also overrides body() gets both; Skip stops both."""

        class Both(WholeBody):
            def body(self, command: BodyChunk) -> Result:
                return Skip() if b"stop" in command.data else None

        mta = FakeMTA([Both])
        result = mta.message("<a@x>", RCPT, [], b"a" * 65535 + b"stop" + b"b" * 10)
        self.assertTrue(result.delivered)
        self.assertFalse(mta.session.protocol & ProtocolFlag.NR_BODY)
        self.assertEqual(WholeBody.seen[-1].bodies, [b"a" * 65535 + b"stop" + b"b" * 10])
        chunks = [step for step in result.steps if isinstance(step.command, BodyChunk)]
        self.assertEqual([step.verdict for step in chunks], [Continue(), Skip()])


class NegotiationTimeoutTests(SynchronousTestCase):
    """A connection that does not negotiate is closed after negotiation_timeout seconds."""

    def test_never_negotiates(self) -> None:
        """Silent after connecting: closed at the deadline, with a log line naming the connection."""
        logs = LogCapture(self)
        clock = Clock()
        factory = MilterFactory([RecordingMilter], clock, negotiation_timeout=10, idle_timeout=3600)
        mta = FakeMTA(factory)
        clock.advance(9.9)
        mta.collect()
        self.assertTrue(mta.connected)
        clock.advance(0.1)
        mta.collect()
        self.assertFalse(mta.connected)
        conn = mta.protocol.connection_id
        self.assertEqual(len(logs.matching(f"[{conn}]", "no option negotiation within 10")), 1, logs.lines())
        self.assertEqual(factory.connections, set())

    def test_trickle_does_not_extend(self) -> None:
        """Bytes of an unfinished OPTNEG do not move the deadline."""
        logs = LogCapture(self)
        clock = Clock()
        mta = FakeMTA(MilterFactory([RecordingMilter], clock, negotiation_timeout=10))
        offer = encode(Negotiate())
        for byte in offer[:-1]:
            if not mta.connected:
                break
            mta.send_raw(bytes([byte]))
            clock.advance(1)
            mta.collect()
        self.assertFalse(mta.connected)
        self.assertEqual(len(logs.matching("no option negotiation", "(10 bytes of an unfinished frame)")), 1)

    def test_then_idle_timeout(self) -> None:
        """After negotiation the idle timeout applies."""
        clock = Clock()
        mta = FakeMTA(MilterFactory([RecordingMilter], clock, negotiation_timeout=10, idle_timeout=60))
        mta.negotiate()
        clock.advance(59)
        mta.collect()
        self.assertTrue(mta.connected)
        self.assertEqual(mta.connect(), [Continue()])
        clock.advance(60)
        mta.collect()
        self.assertFalse(mta.connected)

    def test_zero_uses_idle_timeout(self) -> None:
        """negotiation_timeout 0: the idle timeout applies from the start."""
        clock = Clock()
        mta = FakeMTA(MilterFactory([RecordingMilter], clock, negotiation_timeout=0, idle_timeout=30))
        clock.advance(29)
        mta.collect()
        self.assertTrue(mta.connected)
        clock.advance(1)
        mta.collect()
        self.assertFalse(mta.connected)


class FrameLimitOutcomeTests(SynchronousTestCase):
    """The frame limit (also tested in test_protocol): the outcome before negotiation too."""

    def test_huge_length_before_negotiation(self) -> None:
        """A length field of 4 GiB closes the connection at once, reading nothing more."""
        logs = LogCapture(self)
        recorder = RecordingMilter()
        mta = FakeMTA([lambda: recorder])
        self.assertEqual(mta.send_raw(b"\xff\xff\xff\xffO"), [])
        self.assertFalse(mta.connected)
        self.assertEqual(recorder.names, ["close"])
        line = logs.matching(f"[{mta.protocol.connection_id}]", "4294967294 payload bytes", "limit of 1048576")
        self.assertEqual(len(line), 1, logs.lines())


class HeaderOverLimitPayloadTests(SynchronousTestCase):
    """The header counts use wire bytes, so non-ASCII text counts as sent."""

    def test_utf8_counts_bytes(self) -> None:
        """A header value of 10 two-byte characters counts 20 bytes."""
        mta = FakeMTA(MilterFactory([RecordingMilter], Clock(), max_header_bytes=24))
        mta.connect()
        mta.mail_from("<a@x>")
        mta.rcpt_to("<b@y>")
        self.assertEqual(mta.header("S", "é" * 10), [Continue()])  # 1 + 1 + 20 + 1 = 23
        self.assertEqual(mta.protocol.session.header_bytes, 23)
        self.assertEqual(mta.header("T", "é"), [TOO_LARGE])

