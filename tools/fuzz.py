"""Coverage-guided fuzzing of txmilt's input paths, with atheris (libFuzzer) or, failing that, hypothesis.

Three targets, each fed arbitrary bytes as if an MTA sent them:

``codec``
    ``FrameBuffer`` in arbitrary pieces, then every frame through
    ``decode_command`` and ``decode_response``; whatever decodes must encode
    back to the same message (or be refused by the strict encoder).
``session``
    ``MilterSession`` with owed replies answered legally; checks that only
    ``RemoteProtocolError`` escapes, that the session is closed afterwards,
    that ``reply_due`` follows the no-reply flags, one final reply per command,
    and Abort only inside a transaction.
``protocol``
    The whole ``MilterProtocol`` over a ``StringTransport`` with a ``Clock`` and
    a small chain (a header stamper, a whole-body filter, a slow filter, a
    refuser), small limits and time passing; checks that no internal error is
    logged, that the output is well-formed responses, that the connection is
    gone from the factory and every filter closed exactly once.

Anything else escaping (or a failed check) is a crash: the input is saved under
``--work`` and printed, so it can become a regression test.

    python3 tools/fuzz.py --seconds 600                  # every target, time split evenly
    python3 tools/fuzz.py --seconds 120 --target codec
    python3 tools/fuzz.py --seconds 60 --engine hypothesis
    python3 tools/fuzz.py --replay crash-file --target session
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("codec", "session", "protocol")


# ------------------------------------------------------------------- counters


class Stats:
    """What one fuzzing process did; written to a file now and then (libFuzzer exits without notice)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.inputs = 0
        self.frames = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._written = 0.0

    def tick(self, size: int) -> None:
        self.inputs += 1
        self.bytes += size
        if self.path and self.inputs % 64 == 0:
            now = time.monotonic()
            if now - self._written > 0.5:
                self.write()
                self._written = now

    def write(self) -> None:
        if not self.path:
            return
        data = {"inputs": self.inputs, "frames": self.frames, "bytes": self.bytes,
                "seconds": time.monotonic() - self.started}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as file:
            json.dump(data, file)
        os.replace(tmp, self.path)


STATS = Stats(None)


class FuzzCheckError(AssertionError):
    """A fuzzing check failed: a crash worth a regression test."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise FuzzCheckError(message)


# -------------------------------------------------------------------- targets
# The txmilt modules are imported by load(), inside atheris' instrumentation.

T: Any = None  # namespace of the loaded modules


def load() -> None:
    """Import txmilt (instrumented, under atheris) and build what the targets share."""
    global T
    import types

    from twisted.internet.address import IPv4Address
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock, deferLater
    from twisted.internet.testing import StringTransportWithDisconnection
    from twisted.logger import ILogObserver, globalLogBeginner

    from txmilt import codec, errors, messages, milter, protocol, session

    T = types.SimpleNamespace(
        codec=codec, errors=errors, m=messages, milter=milter, protocol=protocol, session=session,
        Clock=Clock, Deferred=Deferred, deferLater=deferLater, IPv4Address=IPv4Address,
        Transport=StringTransportWithDisconnection,
    )
    T.problems = []
    T.made = []

    def observe(event: dict[str, Any]) -> None:
        text = str(event.get("log_format", ""))
        if "internal error" in text or ("log_failure" in event and "failed in" not in text):
            T.problems.append(event)

    globalLogBeginner.beginLoggingTo([cast(ILogObserver, observe)], discardBuffer=True, redirectStandardIO=False)
    T.filters = _filters()


def _chunks(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` in pieces of random sizes: single bytes, small, large, all at once."""
    out, at = [], 0
    style = rng.randrange(4)
    while at < len(data):
        if style == 0:
            size = len(data)
        elif style == 1:
            size = 1
        elif style == 2:
            size = rng.randint(1, 16)
        else:
            size = rng.choice([1, 3, 5, 64, 4096])
        out.append(data[at:at + size])
        at += size
    return out


def fuzz_codec(data: bytes) -> None:
    """Frames, then both decoders, then the encoder on whatever decoded."""
    if len(data) < 2:
        return
    STATS.tick(len(data))
    rng = random.Random(data[:2])
    buffer = T.codec.FrameBuffer((64, 4096, T.codec.DEFAULT_FRAME_LIMIT)[data[0] % 3])
    for chunk in _chunks(data[2:], rng):
        buffer.feed(chunk)
        while True:
            try:
                frame = buffer.next_frame()
            except T.errors.RemoteProtocolError:
                return  # the stream cannot be resynchronised: the connection would be dropped
            if frame is None:
                break
            STATS.frames += 1
            letter, payload = frame
            for decode in (T.codec.decode_command, T.codec.decode_response):
                try:
                    message = decode(letter, payload)
                except T.errors.RemoteProtocolError:
                    continue
                _round_trip(message, decode)


def _round_trip(message: Any, decode: Callable[[str, bytes], Any]) -> None:
    try:
        raw = T.codec.encode(message)
    except T.errors.LocalProtocolError:
        return  # lenient on receipt, strict on sending: fine
    again = decode(chr(raw[4]), raw[5:])
    check(again == message, f"round trip changed {message!r} into {again!r}")


def _reply_tables() -> tuple[dict[type, Any], tuple[type, ...]]:
    m = T.m
    nr = {
        m.Connect: m.ProtocolFlag.NR_CONNECT, m.Helo: m.ProtocolFlag.NR_HELO, m.MailFrom: m.ProtocolFlag.NR_MAIL,
        m.RcptTo: m.ProtocolFlag.NR_RCPT, m.Data: m.ProtocolFlag.NR_DATA, m.Header: m.ProtocolFlag.NR_HEADER,
        m.EndOfHeaders: m.ProtocolFlag.NR_EOH, m.BodyChunk: m.ProtocolFlag.NR_BODY,
        m.Unknown: m.ProtocolFlag.NR_UNKNOWN,
    }
    discardable = (m.MailFrom, m.RcptTo, m.Data, m.Header, m.EndOfHeaders, m.BodyChunk, m.EndOfMessage, m.Unknown)
    return nr, discardable


def fuzz_session(data: bytes) -> None:
    """A MilterSession fed the bytes, every owed reply answered legally; its promises checked."""
    if len(data) < 4:
        return
    STATS.tick(len(data))
    m, s = T.m, T.session
    nr, discardable = _reply_tables()
    rng = random.Random(data[:4])
    session = s.MilterSession(
        rng.choice([64, 4096, 1 << 20]), max_headers=rng.choice([0, 3, 100]), max_header_bytes=rng.choice([0, 200])
    )
    state = {"open": False, "events": 0, "over": False, "protocol": m.ProtocolFlag.NONE, "actions": m.Action.NONE}
    stream = data[4:]
    pieces = _chunks(stream, rng)
    if rng.random() < 0.7:
        pieces.append(b"")  # end of stream
    for piece in pieces:
        session.receive_data(piece)
        while True:
            try:
                event = session.next_event()
            except T.errors.RemoteProtocolError:
                check(not state["over"], "an error after the session was over")
                check(session.stage is s.Stage.CLOSED, "the session is not closed after an error")
                check(session.next_event() is s.NEED_DATA, "events after an error")
                return
            if event is s.NEED_DATA:
                break
            STATS.frames += 1
            check(not state["over"], f"{event!r} after the session was over")
            _session_event(session, event, state, nr)
            if session.reply_due and not _answer(session, event, state, rng, discardable):
                return


def _session_event(session: Any, event: Any, state: dict[str, Any], nr: dict[type, Any]) -> None:
    m = T.m
    state["events"] += 1
    if isinstance(event, m.Negotiate):
        check(state["events"] == 1, "a second OPTNEG was let through")
        expected = True
    elif isinstance(event, m.EndOfMessage):
        expected = True
    elif type(event) in nr:
        expected = not state["protocol"] & nr[type(event)]
    else:
        expected = False
    check(session.reply_due == expected, f"reply_due is {session.reply_due} after {event!r}")
    if isinstance(event, m.Abort):
        check(state["open"], "Abort event outside a transaction")
        state["open"] = False
    elif isinstance(event, m.Connect | m.Helo | m.MailFrom | m.Quit | m.QuitNoClose | T.session.Disconnected):
        check(not state["open"], f"{event!r} while a message is open, without an Abort first")
    if isinstance(event, m.MailFrom):
        state["open"] = True
    if isinstance(event, m.Quit | T.session.Disconnected):
        state["over"] = True
    session.macros.get("i")


def _answer(session: Any, event: Any, state: dict[str, Any], rng: random.Random, discardable: tuple[type, ...]) -> bool:
    """Send a legal reply to ``event``; False if the milter would close the connection instead."""
    m, s = T.m, T.session
    if isinstance(event, m.Negotiate):
        needs = s.Requirements(
            m.Action(rng.randrange(0x200)) & ~m.Action.SET_MACRO_LIST,
            m.ProtocolFlag(rng.choice([0, 0x800, 0x100000])),
            m.ProtocolFlag(rng.randrange(1 << 21)) & s.OPTIONAL_PROTOCOL_BITS,
            {m.MacroStage.CONNECT: ("j",)} if rng.random() < 0.3 else {},
        )
        for wanted in (needs, s.Requirements()):
            try:
                reply = s.negotiate(event, wanted)
            except T.errors.NegotiationError:
                continue
            session.send(reply)
            state["protocol"], state["actions"] = reply.protocol, reply.actions
            _refuses_second(session)
            return True
        return False
    if rng.random() < 0.1:
        session.send(m.Progress())
    if isinstance(event, m.EndOfMessage):
        if state["actions"] & m.Action.ADD_HEADERS:
            session.send(m.AddHeader("X-Fuzz", "1"))
        if state["actions"] & m.Action.CHANGE_BODY:
            session.send(m.ReplaceBody(b"x" * rng.randrange(3)))
    finals = [m.Continue()] * 8 + [m.Accept(), m.Reject(), m.TempFail("try later", code=451), m.Shutdown()]
    if isinstance(event, discardable):
        finals.append(m.Discard())
    if isinstance(event, m.BodyChunk) and state["protocol"] & m.ProtocolFlag.SKIP:
        finals.append(m.Skip())
    final = rng.choice(finals)
    session.send(final)
    check(not session.reply_due, f"a reply is still owed after {final!r}")
    _refuses_second(session)
    ends = isinstance(final, m.Accept) or (
        isinstance(final, m.Reject | m.TempFail | m.Discard | m.Shutdown) and not isinstance(event, m.RcptTo)
    )
    if isinstance(event, m.EndOfMessage) or (ends and not isinstance(event, m.Unknown)):
        state["open"] = False
    check(session.in_transaction == state["open"], f"in_transaction disagrees after {final!r} to {event!r}")
    return True


def _refuses_second(session: Any) -> None:
    try:
        session.send(T.m.Continue())
    except T.errors.LocalProtocolError:
        return
    raise FuzzCheckError("a second final reply was accepted")


def _filters() -> list[Any]:
    """The small chain the protocol target runs; each instance notes its close calls."""
    m = T.m
    base: Any = T.milter.Milter

    class Noted(base):  # type: ignore[misc]
        def __init__(self) -> None:
            self.closes = 0
            T.made.append(self)

        def close(self) -> None:
            self.closes += 1

    class Stamp(Noted):
        actions = m.Action.ADD_HEADERS | m.Action.CHANGE_HEADERS

        def header(self, command: Any) -> None:
            return None

        def end_of_message(self, changes: Any) -> None:
            changes.add_header("X-Stamp", "1")
            changes.change_header("Subject", "stamped")

    class WholeBody(Noted):
        whole_body = True
        actions = m.Action.CHANGE_BODY

        def end_of_message(self, changes: Any) -> Any:
            assert self.body_file is not None
            body = self.body_file.read()
            if b"replace" in body:
                changes.replace_body(body.upper())
            return m.Reject() if b"virus" in body else None

    class Slow(Noted):
        def rcpt_to(self, command: Any) -> Any:
            return T.deferLater(T.clock, 1.0, lambda: None)

        async def body(self, command: Any) -> Any:
            await T.deferLater(T.clock, 0.5, lambda: None)
            return m.Skip() if b"skip" in command.data else None

        def end_of_message(self, changes: Any) -> Any:
            return T.Deferred()  # hangs: its timeout gives the fallback

    class Refuser(Noted):
        no_reply = frozenset({"data"})

        def helo(self, command: Any) -> Any:
            return m.Reject() if "bad" in command.name else None

        def data(self, command: Any) -> None:
            return None

        def header(self, command: Any) -> Any:
            if command.name.lower() == "x-reject":
                return m.TempFail("no", code=451, status="4.7.1")
            return m.Accept() if command.name.lower() == "x-accept" else None

    return [Stamp, WholeBody, T.protocol.FilterSpec(Slow, timeout=5.0), Refuser]


def fuzz_protocol(data: bytes) -> None:
    """The whole protocol and chain over a StringTransport, with time passing."""
    if len(data) < 4:
        return
    STATS.tick(len(data))
    rng = random.Random(data[:4])
    T.clock = clock = T.Clock()
    T.made = []
    T.problems.clear()
    factory = T.protocol.MilterFactory(
        T.filters, clock, frame_limit=rng.choice([256, 1 << 20]), idle_timeout=30, negotiation_timeout=10,
        max_headers=rng.choice([0, 4, 1000]), max_header_bytes=rng.choice([0, 300]),
        max_body_size=rng.choice([0, 100]), body_spool_threshold=rng.choice([0, 16, 1 << 20]),
    )
    T.made = []  # the factory tried each filter class once; those instances never serve
    protocol = factory.buildProtocol(T.IPv4Address("TCP", "127.0.0.1", 40000))
    transport = T.Transport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    for piece in _chunks(data[4:], rng):
        if not transport.connected:
            break
        protocol.dataReceived(piece)
        STATS.frames += 1
        clock.advance(rng.choice([0, 0, 0, 0.6, 1.1, 6]))
    if transport.connected and rng.random() < 0.8:
        transport.loseConnection()
    for _ in range(4):
        clock.advance(20)
    if transport.connected:
        transport.loseConnection()
    clock.advance(100)
    check(not T.problems, f"internal error logged: {T.problems[:1]!r}")
    check(not factory.connections, "the connection is still in factory.connections")
    for made in T.made:
        check(made.closes == 1, f"{type(made).__name__}.close called {made.closes} times")
    out = T.codec.FrameBuffer(T.codec.ABSOLUTE_FRAME_LIMIT)
    out.feed(transport.value())
    while (frame := out.next_frame()) is not None:
        T.codec.decode_response(*frame)
    check(out.pending == 0, "the milter wrote a partial frame")


FUZZERS: dict[str, Callable[[bytes], None]] = {
    "codec": fuzz_codec, "session": fuzz_session, "protocol": fuzz_protocol,
}


# ---------------------------------------------------------------------- seeds


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start from: every message type, and whole sessions."""
    from txmilt.codec import encode
    from txmilt.messages import (
        ALL_ACTIONS,
        ALL_PROTOCOL,
        Abort,
        Accept,
        Action,
        AddHeader,
        BodyChunk,
        ChangeFrom,
        Command,
        Connect,
        Continue,
        Data,
        EndOfHeaders,
        EndOfMessage,
        Family,
        Header,
        Helo,
        Macros,
        MacroStage,
        MailFrom,
        Negotiate,
        NegotiateReply,
        ProtocolFlag,
        Quit,
        QuitNoClose,
        RcptTo,
        Reject,
        Response,
        TempFail,
        Unknown,
    )

    offer = Negotiate(6, ALL_ACTIONS, ALL_PROTOCOL)
    message: list[Command] = [
        Macros("M", (("i", "4ABC"), ("{mail_addr}", "a@example.org"))), MailFrom("<a@example.org>", ("SIZE=10",)),
        RcptTo("<b@example.com>"), RcptTo("<bad@example.com>"), Data(),
        Macros("L", (("i", "4ABC"),)), Header("Subject", " hello"), Header("X-Reject", " x"),
        Header("X-Accept", " y"), EndOfHeaders(), BodyChunk(b"please replace this virus\r\n"),
        BodyChunk(b"skip\r\n"), EndOfMessage(), Abort(),
    ]
    opening: list[Command] = [offer, Macros("C", (("j", "mx"), ("{client_addr}", "192.0.2.1"))),
               Connect("client", Family.INET, 25, "192.0.2.1"), Helo("client.example")]
    sessions = [
        opening + message + message + [Quit()],
        opening + message[:6] + [Helo("bad.example")],
        [Negotiate(2, Action(0x0F), ProtocolFlag(0x7F)), Connect("u", Family.UNKNOWN), Unknown("VRFY x"),
         QuitNoClose(), Connect("v", Family.INET6, 1, "::1"), *message],
        opening + message[:9] + [Header(f"X-{n}", "v" * 40) for n in range(10)] + message[9:],
    ]
    streams = [b"".join(encode(c) for c in session) for session in sessions]
    if target == "codec":
        singles: list[Command | Response] = [c for session in sessions for c in session]
        singles += [
            Continue(), Accept(), Reject("no", code=550, status="5.7.1"), TempFail(("a", "b")),
            AddHeader("X", "y"), ChangeFrom("<x@y>", ("A=B",)),
            NegotiateReply(6, Action.ADD_HEADERS, ProtocolFlag.NO_HELO, {MacroStage.CONNECT: ("j", "_")}),
        ]
        return [b"\x01\x00" + encode(c) for c in singles] + [b"\x02\x05" + s for s in streams]
    return [bytes([n, 7, 1, 9]) + s for n in range(4) for s in streams]


# ------------------------------------------------------------------ atheris child


def child(target: str, stats_path: str | None, libfuzzer_args: list[str]) -> None:
    """Run one target under atheris until libFuzzer stops (time budget or crash)."""
    global STATS
    atheris: Any = importlib.import_module("atheris")

    STATS = Stats(stats_path)
    with atheris.instrument_imports(include=["txmilt"]):
        load()
    fuzzer = FUZZERS[target]

    def one(data: bytes) -> None:
        fuzzer(data)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def run_atheris(target: str, seconds: float, work: Path) -> dict[str, Any]:
    """Fuzz ``target`` for ``seconds`` in child processes (restarted after a crash); the figures."""
    corpus = work / "corpus" / target
    artifacts = work / "crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    for number, seed in enumerate(seeds(target)):
        (corpus / f"seed-{number}").write_bytes(seed)
    totals: dict[str, Any] = {"target": target, "inputs": 0, "frames": 0, "bytes": 0, "seconds": 0.0,
                              "crashes": [], "coverage": None}
    deadline = time.monotonic() + seconds
    stats_path = work / f"stats-{target}.json"
    while (left := deadline - time.monotonic()) > 2:
        stats_path.unlink(missing_ok=True)
        command = [
            sys.executable, str(Path(__file__).resolve()), "--child", target, "--stats", str(stats_path), "--",
            f"-max_total_time={int(left)}", "-max_len=8192", "-timeout=20", "-rss_limit_mb=2048",
            f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus),
        ]
        started = time.monotonic()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, errors="replace",
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        totals["seconds"] += time.monotonic() - started
        output = result.stderr + result.stdout
        runs = re.search(r"Done (\d+) runs in (\d+) second", output)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        totals["inputs"] += int(runs[1]) if runs else stats.get("inputs", 0)
        totals["frames"] += stats.get("frames", 0)
        totals["bytes"] += stats.get("bytes", 0)
        cov = re.findall(r"cov: (\d+) ft: (\d+)", output)
        if cov:
            totals["coverage"] = f"cov {cov[-1][0]} ft {cov[-1][1]}"
        written = re.search(r"Test unit written to (\S+)", output)
        if written:
            trace = output[output.find("=== Uncaught Python exception"):][:3000]
            known = any(c["trace"].splitlines()[1:2] == trace.splitlines()[1:2] for c in totals["crashes"])
            totals["crashes"].append({"file": written[1], "trace": trace})
            print(f"[{target}] crash, input saved to {written[1]}:\n{trace}", flush=True)
            if known:
                print(f"[{target}] the same crash again; stopping this target", flush=True)
                break
        elif result.returncode not in (0,):
            print(f"[{target}] fuzzer exited with {result.returncode}:\n{output[-3000:]}", flush=True)
            break
        else:
            break
    return totals


# ---------------------------------------------------------------- hypothesis


def run_hypothesis(target: str, seconds: float) -> dict[str, Any]:
    """The fallback: random bytes (and the seeds) from hypothesis, in batches until the time is up."""
    global STATS
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    STATS = Stats(None)
    load()
    fuzzer = FUZZERS[target]
    crashes: list[dict[str, Any]] = []
    inputs = st.one_of(st.binary(max_size=4096), st.sampled_from(seeds(target)).flatmap(
        lambda seed: st.binary(max_size=64).map(lambda junk: seed[: len(junk) * 37 % (len(seed) + 1)] + junk)
    ))
    started = time.monotonic()

    @settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(inputs)
    def batch(data: bytes) -> None:
        fuzzer(data)

    while time.monotonic() - started < seconds:
        try:
            batch()
        except Exception as e:
            crashes.append({"file": None, "trace": f"{type(e).__name__}: {e}"})
            print(f"[{target}] crash: {type(e).__name__}: {e}", flush=True)
    return {"target": target, "inputs": STATS.inputs, "frames": STATS.frames, "bytes": STATS.bytes,
            "seconds": time.monotonic() - started, "crashes": crashes, "coverage": None}


# ----------------------------------------------------------------------- main


def replay(target: str, path: str) -> None:
    """Run one saved input, raising what it raises."""
    load()
    FUZZERS[target](Path(path).read_bytes())
    print(f"{path}: no crash")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="total time budget (default 60)")
    parser.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default=None,
                        help="atheris if it is installed, else hypothesis")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (atheris only)")
    parser.add_argument("--work", default="/tmp/txmilt-fuzz", help="corpus and crash directory")
    parser.add_argument("--replay", metavar="FILE", help="run one saved input against --target")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if args.child:
        child(args.child, args.stats, rest)
        return 0
    targets = TARGETS if args.target == "all" else (args.target,)
    if args.replay:
        for target in targets:
            replay(target, args.replay)
        return 0
    engine = args.engine
    if engine is None:
        try:
            importlib.import_module("atheris")
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    share = args.seconds / len(targets) * (min(args.jobs, len(targets)) if engine == "atheris" else 1)
    print(f"fuzzing {', '.join(targets)} with {engine}, {share:.0f}s each", flush=True)
    results: list[dict[str, Any]] = []
    if engine == "atheris" and args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda t: run_atheris(t, share, work), targets))
    else:
        for target in targets:
            results.append(run_atheris(target, share, work) if engine == "atheris" else run_hypothesis(target, share))
    print(f"\n{'target':<10}{'inputs':>12}{'frames':>12}{'MB':>9}{'seconds':>9}{'inputs/s':>10}  crashes  coverage")
    for r in results:
        rate = r["inputs"] / r["seconds"] if r["seconds"] else 0
        print(f"{r['target']:<10}{r['inputs']:>12}{r['frames']:>12}{r['bytes'] / 1e6:>9.1f}{r['seconds']:>9.0f}"
              f"{rate:>10.0f}  {len(r['crashes']):>7}  {r['coverage'] or '-'}")
    total = sum(len(r["crashes"]) for r in results)
    print("(frames: frames decoded for codec, events handed out for session, reads fed for protocol)")
    print(f"total: {sum(r['inputs'] for r in results)} inputs, {sum(r['frames'] for r in results)} frames,"
          f" {sum(r['seconds'] for r in results):.0f}s of fuzzing, {total} crashes")
    (work / "summary.json").write_text(json.dumps(results, indent=2))
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
