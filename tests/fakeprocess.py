"""A reactor clock that records spawned processes, for tests of the worker pool and supervised milters."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure


@dataclass
class FakeProcess:
    """A spawned process: what it was given, what it was sent, and a way to end it."""

    protocol: Any
    pid: int
    executable: str
    args: Sequence[str]
    env: Mapping[str, str] | None
    child_fds: Mapping[int, Any] | None
    signals: list[str] = field(default_factory=list)
    written: dict[int, bytes] = field(default_factory=dict)
    ended: bool = False

    def signalProcess(self, name: str) -> None:  # noqa: N802 (Twisted's name)
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def writeToChild(self, fd: int, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.written[fd] = self.written.get(fd, b"") + data

    def loseConnection(self) -> None:  # noqa: N802 (Twisted's name)
        """Nothing: a fake process has no pipes."""

    def end(self, status: int = 0, signal: int | None = None) -> None:
        """The process exits with ``status``, or is killed by ``signal``."""
        self.ended = True
        reason = ProcessDone(status) if status == 0 and signal is None else ProcessTerminated(status, signal)
        self.protocol.processEnded(Failure(reason))


class ProcessClock(Clock):
    """A Clock whose spawnProcess (as IReactorProcess has it) records a FakeProcess and connects the protocol to it."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self._pids = itertools.count(1000)

    def spawnProcess(  # noqa: N802 (Twisted's name)
        self, processProtocol: Any, executable: str, args: Sequence[str] = (),  # noqa: N803
        env: Mapping[str, str] | None = None, path: str | None = None, uid: int | None = None,
        gid: int | None = None, usePTY: bool = False, childFDs: Mapping[int, Any] | None = None,  # noqa: N803
    ) -> FakeProcess:
        process = FakeProcess(processProtocol, next(self._pids), executable, list(args), env, childFDs)
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process

    def running(self) -> list[FakeProcess]:
        """The processes that have not ended."""
        return [process for process in self.processes if not process.ended]
