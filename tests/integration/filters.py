"""Filters for the daemon tests: they say which process, and which configuration, served a message."""

from __future__ import annotations

import os

from txmilt.messages import Action
from txmilt.milter import Changes, Milter, Result

#: The header PidStamp adds.
HEADER = "X-Served-By"


class PidStamp(Milter):
    """Adds ``X-Served-By: <generation> pid <process id>`` at end of message."""

    actions = Action.ADD_HEADERS

    def __init__(self, generation: str = "1") -> None:
        self.generation = generation

    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header(HEADER, f"{self.generation} pid {os.getpid()}")
        return None
