"""Threads doing one piece of work over and over until stopped: the load of the daemon and end-to-end tests."""

from __future__ import annotations

import threading
from typing import Self


class Repeating:
    """``threads`` threads calling ``once`` until the ``with`` block ends; ``lock`` guards what they record."""

    def __init__(self, threads: int) -> None:
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def once(self) -> None:
        """One piece of work (a message); subclasses say what."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.once()

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
