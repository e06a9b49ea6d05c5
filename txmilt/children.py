"""What the daemon's child processes (workers, supervised milters) have in common: environment, exit reasons."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

#: systemd's socket-activation variables: they describe the daemon's own sockets, not a child's.
_ACTIVATION = frozenset({"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})


def child_environment(
    extra: Iterable[tuple[str, str]] = (), environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The daemon's environment with ``extra`` added, without socket-activation variables."""
    env = {name: value for name, value in environ.items() if name not in _ACTIVATION}
    env.update(extra)
    return env


def exit_reason(reason: Failure | None) -> str:
    """How a child process ended, in words: "exited with status 1", "was killed by SIGKILL"."""
    value = reason.value if reason is not None else None
    if isinstance(value, ProcessDone | ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = f"signal {value.signal}"
            return f"was killed by {name}"
        if value.exitCode is not None:
            return f"exited with status {value.exitCode}"
    return "exited"
