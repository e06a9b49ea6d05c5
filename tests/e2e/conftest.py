"""Fixtures for end-to-end tests against a private Postfix instance."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from .postfix import PostfixFactory, PostfixInstance, free_port, postfix_available
from .sink import SMTPSink


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``e2e`` marker."""
    config.addinivalue_line(
        "markers", "e2e: end-to-end test that runs a private Postfix instance (needs root)"
    )


@pytest.fixture
def smtp_sink() -> Iterator[SMTPSink]:
    """A started SMTP sink on 127.0.0.1, stopped after the test."""
    with SMTPSink() as sink:
        yield sink


@pytest.fixture
def postfix_factory(smtp_sink: SMTPSink) -> Iterator[PostfixFactory]:
    """Start Postfix instances (relaying to ``smtp_sink`` by default).

    Call it as ``postfix_factory(main_cf={...}, relay=(host, port))``; every
    instance it made is stopped and removed after the test, and its log tail
    is printed (pytest shows it when the test failed).
    """
    reason = postfix_available()
    if reason is not None:
        pytest.skip(reason)
    instances: list[PostfixInstance] = []

    def make(
        main_cf: Mapping[str, str] | None = None,
        relay: tuple[str, int] | None = None,
        **kwargs: Any,
    ) -> PostfixInstance:
        instance = PostfixInstance(free_port(), relay or smtp_sink.address, main_cf=main_cf, **kwargs)
        instances.append(instance)
        return instance.start()

    try:
        yield make
    finally:
        for instance in instances:
            try:
                instance.stop()
            finally:
                print(f"--- {instance!r} maillog tail ---\n{instance.log_tail()}")
                instance.cleanup()


@pytest.fixture
def postfix(postfix_factory: PostfixFactory) -> PostfixInstance:
    """A started Postfix instance with the default configuration."""
    return postfix_factory()
