"""Fixtures for the socket tests.

pytest-twisted (registered as the pytest plugin ``twisted``) installs the
default reactor when pytest starts (its ``--reactor`` option defaults to
``default``) and runs it in a greenlet, so ``python3 -m pytest tests`` needs
no extra flags. If the plugin is switched off (``-p no:twisted``) these tests
are skipped rather than hanging. trial ignores this package's plain functions.
"""

from __future__ import annotations

from typing import Any

import pytest


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
