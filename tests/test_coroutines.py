"""Coroutine callbacks: asyncio tasks where an asyncio loop runs, Twisted's runner elsewhere, and clear advice."""

from __future__ import annotations

import asyncio
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.logger import eventAsText
from twisted.trial.unittest import SynchronousTestCase

from tests.test_protocol import LogCapture
from txmilt.coroutines import coroutine_deferred
from txmilt.errors import EventLoopError
from txmilt.messages import RcptTo, TempFail
from txmilt.milter import Milter
from txmilt.testing import FakeMTA


class AsyncioRecipientCheck(Milter):
    """Awaits asyncio in rcpt_to, as a filter using an asyncio client library would."""

    async def rcpt_to(self, command: RcptTo) -> None:
        await asyncio.sleep(0.001)


def in_asyncio(make: Any) -> Any:
    """Run ``make()`` (which returns an awaitable) to completion on a fresh asyncio loop."""

    async def main() -> Any:
        return await make()

    return asyncio.run(main())


class TwistedRunnerTests(SynchronousTestCase):
    """No asyncio loop runs (any reactor but asyncio's): Deferred.fromCoroutine."""

    def test_awaits_deferreds(self) -> None:
        """A coroutine awaiting a Deferred fires when that Deferred does."""
        gate: Deferred[str] = Deferred()

        async def check() -> str:
            return await gate + "!"

        result = coroutine_deferred(check())
        self.assertNoResult(result)
        gate.callback("done")
        self.assertEqual(self.successResultOf(result), "done!")

    def test_finished_coroutine_fires_at_once(self) -> None:
        """A coroutine that never waits gives an already fired Deferred."""

        async def quick() -> int:
            return 7

        self.assertEqual(self.successResultOf(coroutine_deferred(quick())), 7)

    def test_asyncio_needs_the_asyncio_reactor(self) -> None:
        """Awaiting asyncio fails with an EventLoopError naming the coroutine and --reactor=asyncio."""
        failure = self.failureResultOf(coroutine_deferred(AsyncioRecipientCheck().rcpt_to(RcptTo("<a@b.c>"))))
        failure.trap(EventLoopError)
        self.assertIn("AsyncioRecipientCheck.rcpt_to", str(failure.value))
        self.assertIn("twistd --reactor=asyncio milter", str(failure.value))

    def test_future_of_a_loop_not_running(self) -> None:
        """Awaiting a future of an asyncio loop that is not running gets the same advice."""
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        future = loop.create_future()

        async def check() -> object:
            return await future

        self.failureResultOf(coroutine_deferred(check()), EventLoopError)

    def test_other_runtime_errors_pass_unchanged(self) -> None:
        """A RuntimeError that is not about event loops stays as it is."""

        async def broken() -> None:
            raise RuntimeError("no running event loop, says the filter itself")

        async def other() -> None:
            raise RuntimeError("something else")

        self.failureResultOf(coroutine_deferred(broken()), EventLoopError)  # same words: indistinguishable
        failure = self.failureResultOf(coroutine_deferred(other()), RuntimeError)
        self.assertEqual(str(failure.value), "something else")


class AsyncioRunnerTests(SynchronousTestCase):
    """An asyncio loop runs this code (Twisted's asyncio reactor): an asyncio task."""

    def test_awaits_asyncio(self) -> None:
        """A coroutine awaiting asyncio futures and sleeps answers through the Deferred."""

        async def check() -> str:
            future = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.001, future.set_result, "late")
            await asyncio.sleep(0.001)
            return str(await future)

        async def drive() -> str:
            return str(await coroutine_deferred(check()).asFuture(asyncio.get_running_loop()))

        self.assertEqual(in_asyncio(drive), "late")

    def test_awaiting_a_deferred_is_explained(self) -> None:
        """Awaiting a pending Deferred inside the task fails with advice to use asFuture."""
        gate: Deferred[None] = Deferred()

        async def check() -> None:
            await gate

        async def drive() -> BaseException | None:
            try:
                await coroutine_deferred(check()).asFuture(asyncio.get_running_loop())
            except EventLoopError as e:
                return e
            return None

        error = in_asyncio(drive)
        self.assertIsInstance(error, EventLoopError)
        self.assertIn("deferred.asFuture(asyncio.get_running_loop())", str(error))

    def test_cancelling_cancels_the_task(self) -> None:
        """Cancelling the Deferred (a timeout, a refusal elsewhere) cancels the asyncio task."""
        seen: list[str] = []

        async def slow() -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        async def drive() -> None:
            running = coroutine_deferred(slow())
            await asyncio.sleep(0)
            running.cancel()
            for _ in range(3):  # the task sees the cancellation on the loop's next turns
                await asyncio.sleep(0)
            self.failureResultOf(running, CancelledError)

        in_asyncio(drive)
        self.assertEqual(seen, ["cancelled"])

    def test_timeout_is_a_timeout(self) -> None:
        """A task running past a Deferred timeout fails with Twisted's TimeoutError, as the chain expects."""

        async def slow() -> None:
            await asyncio.sleep(60)

        async def drive() -> None:
            clock = Clock()
            running = coroutine_deferred(slow()).addTimeout(5, clock)
            clock.advance(5)
            for _ in range(3):
                await asyncio.sleep(0)
            self.failureResultOf(running, TimeoutError)

        in_asyncio(drive)


class ChainTests(SynchronousTestCase):
    def test_asyncio_filter_on_another_reactor(self) -> None:
        """Without an asyncio loop the filter gets its fallback, with one log event saying how to run it."""
        log = LogCapture(self)
        mta = FakeMTA([AsyncioRecipientCheck])
        mta.connect()
        mta.mail_from("<a@example.com>")
        self.assertEqual(mta.rcpt_to("<b@example.net>"), [TempFail()])
        self.assertEqual(len(self.flushLoggedErrors(EventLoopError)), 1)
        (text,) = [eventAsText(event) for event in log.events if "reactor" in eventAsText(event)]
        self.assertIn("filter AsyncioRecipientCheck failed in rcpt_to; using fallback TempFail", text)
        self.assertIn("AsyncioRecipientCheck.rcpt_to awaited asyncio", text)
        self.assertIn("twistd --reactor=asyncio milter", text)

