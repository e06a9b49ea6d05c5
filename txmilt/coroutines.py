"""How a callback's coroutine runs: as an asyncio task where asyncio's event loop runs, else on Twisted's runner.

Under Twisted's asyncio reactor (``twistd --reactor=asyncio``) the asyncio loop
is running, so a callback may await asyncio libraries; there it awaits a
Deferred through ``deferred.asFuture(loop)``. On any other reactor the
coroutine runs on ``Deferred.fromCoroutine`` and may await Deferreds only.
Awaiting the wrong kind fails with an EventLoopError that says what to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from txmilt.errors import EventLoopError

#: How asyncio's errors begin when a coroutine awaits it with no asyncio loop running.
_ASYNCIO_WITHOUT_LOOP = ("no running event loop", "await wasn't used with future", "There is no current event loop")
_ASYNCIO_ADVICE = (
    "{name} awaited asyncio, which needs Twisted's asyncio reactor: run `twistd --reactor=asyncio milter ...`"
    " (from Python, call twisted.internet.asyncioreactor.install() before anything imports the reactor)"
)
#: How an asyncio task's error begins when its coroutine awaits a Deferred that has not fired.
_DEFERRED_IN_TASK = ("Task got bad yield: <Deferred",)
_DEFERRED_ADVICE = (
    "{name} awaited a Twisted Deferred, but on the asyncio reactor callbacks run as asyncio tasks:"
    " await deferred.asFuture(asyncio.get_running_loop()) instead"
)


def coroutine_deferred(coroutine: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    """A Deferred of the coroutine's result, run on the event loop that runs this code."""
    name = getattr(coroutine, "__qualname__", type(coroutine).__name__)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return Deferred.fromCoroutine(coroutine).addErrback(_explained, name, _ASYNCIO_WITHOUT_LOOP, _ASYNCIO_ADVICE)
    task = asyncio.ensure_future(coroutine, loop=loop)
    running = Deferred.fromFuture(task).addErrback(_twisted_cancel)
    return running.addErrback(_explained, name, _DEFERRED_IN_TASK, _DEFERRED_ADVICE)


def _twisted_cancel(failure: Failure) -> Failure:
    """A cancelled task as Twisted's CancelledError, which timeouts and the chain recognise."""
    if failure.check(asyncio.CancelledError):
        return Failure(CancelledError())
    return failure


def _explained(failure: Failure, name: str, symptoms: tuple[str, ...], advice: str) -> Failure:
    """The failure, or an EventLoopError with ``advice`` if it shows the coroutine awaited the wrong loop."""
    if failure.check(RuntimeError) and str(failure.value).startswith(symptoms):
        return Failure(EventLoopError(advice.format(name=name)))
    return failure
