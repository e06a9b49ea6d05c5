"""A filter for the asyncio reactor tests: it awaits asyncio at end of message."""

from __future__ import annotations

import asyncio

from txmilt import Action, Changes, Milter


class Sleeper(Milter):
    """Sleeps with asyncio at end of message, then names the event loop that ran it in ``X-Slept``."""

    actions = Action.ADD_HEADERS

    async def end_of_message(self, changes: Changes) -> None:
        await asyncio.sleep(0.01)
        changes.add_header("X-Slept", type(asyncio.get_running_loop()).__name__)
