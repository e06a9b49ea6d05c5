"""Fixtures for the socket tests.

pytest-twisted (registered as the pytest plugin ``twisted``) installs the
default reactor when pytest starts (its ``--reactor`` option defaults to
``default``) and runs it in a greenlet, so ``python3 -m pytest tests`` needs
no extra flags. If the plugin is switched off (``-p no:twisted``) these tests
are skipped rather than hanging. trial ignores this package's plain functions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_daemon import Daemon


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the socket tests when pytest-twisted is not active."""
    if config.pluginmanager.has_plugin("twisted"):
        return
    skip = pytest.mark.skip(reason="needs the pytest-twisted plugin (do not pass -p no:twisted)")
    for item in items:
        if "integration" in item.nodeid.split("/"):
            item.add_marker(skip)


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted installed and runs."""
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """Make Daemons in a temporary directory; every process is killed after the test."""
    made: list[Daemon] = []

    def make(config: str) -> Daemon:
        made.append(Daemon(tmp_path, config))
        return made[-1]

    try:
        yield make
    finally:
        for one in made:
            one.kill()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short temporary directory for unix sockets (their paths are limited to about 100 bytes)."""
    path = Path(f"/tmp/txmilt-{os.getpid()}-{time.monotonic_ns()}")
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
