"""Unix sockets get the mode the description gives (660 by default) the moment they can be connected to."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.endpoints import serverFromString

from tests.integration.test_sockets import WAIT, stop
from txmilt.errors import ConfigurationError
from txmilt.listen import to_strports
from txmilt.protocol import MilterFactory
from txmilt.testing import RecordingMilter


@pytest.mark.parametrize(("spec", "mode"), [
    ("unix:{path}", 0o660),
    ("local:{path}", 0o660),
    ("unix:{path}:mode=600", 0o600),
    ("unix:{path}:mode=640", 0o640),
])
@pytest_twisted.ensureDeferred
async def test_mode(reactor: Any, sock_dir: Path, spec: str, mode: int) -> None:
    """The listening socket has exactly the configured mode, whatever the umask."""
    path = sock_dir / "milter.sock"
    old = os.umask(0)  # the most permissive umask: Twisted must still set the mode before listen()
    try:
        port = await serverFromString(reactor, to_strports(spec.format(path=path))).listen(
            MilterFactory([RecordingMilter], reactor)
        ).addTimeout(WAIT, reactor)
    finally:
        os.umask(old)
    try:
        status = os.lstat(path)
        assert stat.S_ISSOCK(status.st_mode)
        assert stat.S_IMODE(status.st_mode) == mode
    finally:
        await stop(port)


def test_world_writable_refused(sock_dir: Path) -> None:
    """Descriptions that would let every local user connect are refused before anything listens."""
    for mode in ("666", "777", "662", "0002"):
        with pytest.raises(ConfigurationError, match="world-writable"):
            to_strports(f"unix:{sock_dir}/milter.sock:mode={mode}")
    assert not (sock_dir / "milter.sock").exists()
