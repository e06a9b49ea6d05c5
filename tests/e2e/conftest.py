"""Fixtures for end-to-end tests against a private Postfix instance."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from .bench import DAEMON_TROUBLE, MILTER_MAIN_CF, POSTFIX_TROUBLE, Bench
from .opendkim import OpenDKIM, opendkim_available
from .postfix import PostfixFactory, PostfixInstance, free_port, postfix_available
from .sink import SMTPSink

# Its comparisons fail with pytest's detailed messages.
pytest.register_assert_rewrite("tests.e2e.differential")


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``e2e`` and ``log_allows`` markers."""
    config.addinivalue_line(
        "markers", "e2e: end-to-end test that runs a private Postfix instance (needs root)"
    )
    config.addinivalue_line(
        "markers",
        "log_allows(pattern, ...): regular expressions for warnings or errors the test expects in"
        " the Postfix or milter daemon logs (see the no_trouble fixture)",
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


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    """One Postfix per test module, relaying to a DSN-capable sink, ready to be pointed at milters.

    Milter daemons started with ``bench.start_milter`` are stopped with SIGTERM
    after Postfix; each must exit cleanly ("Server Shut Down.", status 0 or
    killed by its own SIGTERM) and leave no process behind.
    """
    reason = postfix_available()
    if reason is not None:
        pytest.skip(reason)
    with SMTPSink(dsn=True) as sink:
        postfix = PostfixInstance(free_port(), sink.address, main_cf=MILTER_MAIN_CF)
        bench = Bench(postfix, sink)
        try:
            postfix.start()
            yield bench
        finally:
            try:
                postfix.stop()
            finally:
                print(f"--- {postfix!r} maillog tail ---\n{postfix.log_tail(60)}")
                postfix.cleanup()
                statuses = bench.stop_milters()
            unclean = {
                milter.name: (statuses[milter.name], milter.daemon.output()[-3000:])
                for milter in bench.milters
                if statuses[milter.name] not in (0, -signal.SIGTERM)
                or "Server Shut Down." not in milter.daemon.output()
            }
            for milter in bench.milters:
                if milter.name not in unclean:
                    milter.daemon.cleanup()
            assert not unclean, f"milter daemons did not stop cleanly on SIGTERM: {unclean}"


@pytest.fixture(scope="module", params=["relaxed/simple", "simple/simple"])
def opendkim(request: pytest.FixtureRequest) -> Iterator[OpenDKIM]:
    """A private OpenDKIM signing for example.org (simple header canonicalization catches any whitespace slip)."""
    reason = opendkim_available()
    if reason is not None:
        pytest.skip(reason)
    with OpenDKIM(domain="example.org", selector="txmilt", canonicalization=request.param) as signer:
        yield signer


@pytest.fixture
def no_trouble(request: pytest.FixtureRequest, bench: Bench) -> Iterator[None]:
    """Fail the test if Postfix logged a warning or error, or a milter daemon an error or traceback.

    Lines matching a ``pytest.mark.log_allows(pattern, ...)`` of the test are expected and ignored.
    """
    allowed = [re.compile(p) for mark in request.node.iter_markers("log_allows") for p in mark.args]
    postfix_mark = bench.postfix.log_mark()
    daemon_marks = {milter.name: milter.daemon.log_mark() for milter in bench.milters}
    yield
    trouble = [
        line for line in POSTFIX_TROUBLE.findall(bench.postfix.log_text()[postfix_mark:])
        if not any(p.search(line) for p in allowed)
    ]
    for milter in bench.milters:
        output = milter.daemon.output()[daemon_marks.get(milter.name, 0):]
        trouble += [
            f"[{milter.name}] {line}" for line in DAEMON_TROUBLE.findall(output)
            if not any(p.search(line) for p in allowed)
        ]
    assert not trouble, "unexpected log lines:\n" + "\n".join(trouble)
