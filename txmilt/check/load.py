"""The load mode: the same message played N times over C concurrent SMTP sessions, timed."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from twisted.internet.defer import Deferred, gatherResults

from txmilt.check.play import CheckError, MilterSession
from txmilt.check.report import JSON
from txmilt.check.status import ExitStatus, verdict_name
from txmilt.conversation import Mail
from txmilt.messages import Connect

__all__ = ["LoadPlan", "LoadResult", "ProgressBar", "percentile", "run_load"]


@dataclass(frozen=True)
class LoadPlan:
    """How much load: messages in all, at once, and per milter connection."""

    count: int
    concurrency: int = 1
    messages_per_connection: int = 1


@dataclass
class LoadResult:
    """What a load run measured."""

    plan: LoadPlan
    seconds: float = 0.0
    #: Seconds from a message's first packet (connecting, for the first on a connection) to its final reply.
    latencies: list[float] = field(default_factory=list)
    verdicts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    #: The first error message of each kind.
    error_examples: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> int:
        """Messages finished, with a verdict or an error."""
        return len(self.latencies) + sum(self.errors.values())

    def report(self, addresses: Sequence[str], profile: str) -> JSON:
        """The JSON-ready report."""
        answered = len(self.latencies)
        ordered = sorted(self.latencies)
        latency = {} if not ordered else {
            "p50": percentile(ordered, 50) * 1000, "p90": percentile(ordered, 90) * 1000,
            "p99": percentile(ordered, 99) * 1000, "max": ordered[-1] * 1000,
            "mean": sum(ordered) / answered * 1000,
        }
        return {
            "mode": "load",
            "profile": profile,
            "milters": list(addresses),
            "count": self.plan.count,
            "concurrency": self.plan.concurrency,
            "messages_per_connection": self.plan.messages_per_connection,
            "seconds": round(self.seconds, 6),
            "answered": answered,
            "messages_per_second": round(answered / self.seconds, 3) if self.seconds > 0 else 0.0,
            "latency_ms": {name: round(value, 3) for name, value in latency.items()},
            "verdicts": dict(self.verdicts.most_common()),
            "errors": dict(self.errors.most_common()),
            "error_examples": dict(self.error_examples),
            "exit_status": int(ExitStatus.FAILED if self.errors else ExitStatus.ACCEPTED),
        }


def percentile(ordered: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile of sorted values (``percent`` from 0 to 100)."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


class ProgressBar:
    """A one-line progress bar redrawn in place on a terminal, at most every ``interval`` seconds."""

    def __init__(
        self, stream: IO[str], total: int, clock: Callable[[], float] = time.monotonic, interval: float = 0.1
    ) -> None:
        self.stream, self.total, self.clock, self.interval = stream, total, clock, interval
        self.start = clock()
        self._drawn = -math.inf

    def update(self, done: int, errors: int) -> None:
        """Redraw, unless drawn within the interval (the last message is always drawn)."""
        now = self.clock()
        if done < self.total and now - self._drawn < self.interval:
            return
        self._drawn = now
        width = 30
        filled = width * done // self.total if self.total else width
        rate = done / (now - self.start) if now > self.start else 0.0
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}  {rate:.0f} msg/s  errors {errors}\x1b[K"
        )
        self.stream.flush()

    def finish(self) -> None:
        """End the line so that what follows starts on its own."""
        self.stream.write("\n")
        self.stream.flush()


async def run_load(
    plan: LoadPlan,
    open_session: Callable[[], Awaitable[MilterSession]],
    mail: Mail,
    client: Connect,
    helo: str,
    *,
    clock: Callable[[], float] = time.perf_counter,
    progress: ProgressBar | None = None,
) -> LoadResult:
    """Play ``mail`` ``plan.count`` times over ``plan.concurrency`` sessions at once; what it measured.

    A session carries up to ``messages_per_connection`` messages, then QUITs;
    one that fails is dropped and the next message opens a new one, as does a
    session decided at CONNECT or HELO.
    """
    result = LoadResult(plan)
    tickets = iter(range(plan.count))

    async def worker() -> None:
        session: MilterSession | None = None
        carried = 0
        for _ in tickets:
            start = clock()
            try:
                if session is None:
                    session = await open_session()
                played = await session.message(mail, client, helo)
            except CheckError as e:
                result.errors[e.kind] += 1
                result.error_examples.setdefault(e.kind, str(e))
                if session is not None:
                    session.drop()
                session, carried = None, 0
            else:
                result.latencies.append(clock() - start)
                result.verdicts[verdict_name(played.outcome.verdict)] += 1
                carried += 1
                if carried >= plan.messages_per_connection or session.decided:
                    await session.close()
                    session, carried = None, 0
            if progress is not None:
                progress.update(result.done, sum(result.errors.values()))
        if session is not None:
            await session.close()

    began = clock()
    workers = [Deferred.fromCoroutine(worker()) for _ in range(min(plan.concurrency, plan.count))]
    await gatherResults(workers, consumeErrors=True)
    result.seconds = clock() - began
    if progress is not None:
        progress.finish()
    return result
