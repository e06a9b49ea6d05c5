"""Settling the filters' answers to one command in chain order, as the MTA reads a list of milters.

Each filter's answer is a verdict now, a Deferred of one, or ``Later`` work that
starts only once every filter before it has settled (sequential order, and the
replay of an edited message). ``walk`` reads them in order and stops at the first
one its ``stop`` predicate picks (a refusal), cancelling the work after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Later:
    """Work that starts only when every filter before it in the chain has settled."""

    __slots__ = ("start",)

    def __init__(self, start: Callable[[], Any]) -> None:
        self.start = start


@dataclass
class Walked:
    """Where a walk stopped: the answers settled in order, and the work that did not finish."""

    #: The verdicts of the first filters, in order, up to and including the one that stopped the walk.
    verdicts: list[Any] = field(default_factory=list)
    #: Indices of the filters whose work was cancelled, or never started, because the walk stopped.
    unfinished: list[int] = field(default_factory=list)


_PENDING: Any = object()


#: What an answer not yet settled may be.
_LATER = (Deferred, Later)


def walk(results: list[Any], stop: Callable[[int, Any], bool]) -> Walked | Deferred[Walked]:
    """Settle ``results`` in order; ``stop(index, verdict)``, called once per settled answer in order, ends it.

    ``results`` holds verdicts, Deferreds (which never fail) and ``Later`` work;
    the list is used up. Cancelling the returned Deferred cancels the work still
    pending and starts no more.
    """
    if not any(isinstance(result, _LATER) for result in results):
        for index, verdict in enumerate(results):  # every filter answered at once: no bookkeeping
            if stop(index, verdict):
                return Walked(results[: index + 1])
        return Walked(results)
    return _Walk(results, stop).run()


class _Walk:
    """The bookkeeping of a walk that has to wait."""

    def __init__(self, results: list[Any], stop: Callable[[int, Any], bool]) -> None:
        self.results = results
        self.stop = stop
        self.walked = Walked()
        self.pending: dict[int, Deferred[Any]] = {}
        self.outer: Deferred[Walked] | None = None
        self.running = False
        self.over = False

    def run(self) -> Walked | Deferred[Walked]:
        for index, result in enumerate(self.results):
            if isinstance(result, Deferred):
                self._watch(index, result)
        if self._advance():
            return self.walked
        self.outer = Deferred(self._cancel)
        return self.outer

    def _watch(self, index: int, deferred: Deferred[Any]) -> None:
        self.results[index] = _PENDING
        self.pending[index] = deferred
        deferred.addCallback(self._store, index)

    def _store(self, verdict: Any, index: int) -> None:
        self.results[index] = verdict
        self.pending.pop(index, None)
        outer = self.outer
        if outer is None or outer.called or self.running or self.over:
            return
        if self._advance():
            outer.callback(self.walked)

    def _advance(self) -> bool:
        """Settle what can be settled; whether the walk is over."""
        self.running = True
        try:
            settled = self.walked.verdicts
            while len(settled) < len(self.results):
                index = len(settled)
                result = self.results[index]
                if isinstance(result, Later):
                    result = result.start()
                    self.results[index] = result
                    if isinstance(result, Deferred):
                        self._watch(index, result)
                        result = self.results[index]
                if result is _PENDING:
                    return False
                settled.append(result)
                if self.stop(index, result):
                    self._finish(index)
                    return True
            self.over = True
            return True
        finally:
            self.running = False

    def _finish(self, index: int) -> None:
        """The walk stopped at ``index``: cancel the work after it, and start no more."""
        self.over = True
        for later in range(index + 1, len(self.results)):
            result = self.results[later]
            if result is _PENDING or isinstance(result, Later):
                self.walked.unfinished.append(later)
            deferred = self.pending.pop(later, None)
            if deferred is not None:
                deferred.cancel()

    def _cancel(self, _: Deferred[Walked]) -> None:
        """Cancelled from outside (the connection is gone): no verdict is wanted any more."""
        self.over = True
        pending, self.pending = self.pending, {}
        for deferred in pending.values():
            deferred.cancel()


def all_of(pending: Sequence[Deferred[Any] | None]) -> Deferred[Any] | None:
    """One Deferred for the work still pending (None where none is), never failing; None if nothing is."""
    waiting = [d for d in pending if d is not None]
    if not waiting:
        return None
    return gatherResults(waiting, consumeErrors=True).addErrback(lambda _: None)


def both(first: Deferred[Any] | None, second: Deferred[Any] | None) -> Deferred[Any] | None:
    """One Deferred for two pieces of work that may each be done already (None)."""
    return all_of([first, second])


class Keepalive:
    """Calls ``tick`` every ``interval`` seconds until stopped: PROGRESS while end of message is pending."""

    def __init__(self, clock: IReactorTime, interval: float, tick: Callable[[], None]) -> None:
        self._clock, self._interval, self._tick = clock, interval, tick
        self._call: IDelayedCall | None = clock.callLater(interval, self._fire)

    def _fire(self) -> None:
        self._tick()
        self._call = self._clock.callLater(self._interval, self._fire)

    def stop(self, result: object) -> object:
        """Stop ticking; ``result`` passes through (use it as a Deferred's callback)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return result
