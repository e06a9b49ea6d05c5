"""Past one host: Postfix → HAProxy (TCP mode, milter health checks) → two txmilt daemons, one stopped mid-load."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from typing_extensions import override

from tests.repeating import Repeating

from .bench import Bench, header_fields, make_message
from .haproxy import HAProxy, haproxy, haproxy_available
from .milterd import MilterDaemon

pytestmark = pytest.mark.e2e

#: SMTP sessions at once.
SESSIONS = 4
#: Messages before and after one daemon is stopped.
EACH_SIDE = 16


def stamping(name: str) -> MilterDaemon:
    """A daemon whose one filter adds ``X-Served-By: <name>``."""
    editor = {"name": "stamp", "class": "tests.e2e.filters:Editor",
              "options": {"edits": {"*": [["add_header", "X-Served-By", name]]}}}
    return MilterDaemon([editor], {"drain_timeout": 10}, name=f"behind-haproxy-{name}")


@dataclass
class Sent:
    """One message: when its SMTP session began and ended, its token, and the final reply code."""

    began: float
    ended: float
    token: str
    code: int


class Senders(Repeating):
    """SESSIONS threads sending one message per SMTP session through Postfix until stopped."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(SESSIONS)
        self.bench = bench
        self.sent: list[Sent] = []

    @override
    def once(self) -> None:
        token = self.bench.token("haproxy")
        began = time.monotonic()
        talk = self.bench.converse(make_message("through HAProxy", token))
        codes = [step[0] for step in (talk.mail, *talk.rcpt.values(), talk.data) if step is not None]
        failed = [code for code in codes if code >= 400]
        with self.lock:
            self.sent.append(Sent(began, time.monotonic(), token, failed[0] if failed else 250))

    def count(self, after: float = 0.0) -> int:
        """Messages whose session began after ``after`` and has ended."""
        with self.lock:
            return sum(1 for sent in self.sent if sent.began > after)

    def wait(self, count: int, after: float = 0.0, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(after) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.count(after)} of {count} messages sent")
            time.sleep(0.05)


@pytest.fixture
def proxied(bench: Bench) -> Iterator[tuple[MilterDaemon, MilterDaemon, HAProxy]]:
    """Daemons a and b behind an HAProxy that Postfix uses as its milter."""
    reason = haproxy_available()
    if reason is not None:
        pytest.skip(reason)
    with stamping("a") as a, stamping("b") as b, haproxy([("127.0.0.1", a.port), ("127.0.0.1", b.port)]) as proxy:
        bench.postfix.set_main_cf({"smtpd_milters": proxy.spec, "non_smtpd_milters": proxy.spec})
        try:
            yield a, b, proxy
        finally:
            print(f"--- HAProxy ---\n{proxy.output()[-3000:]}\n--- b ---\n{b.output()[-3000:]}")
            bench.postfix.set_main_cf({"smtpd_milters": "", "non_smtpd_milters": ""})
            bench.current = ()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_one_daemon_stopped_under_load(bench: Bench, proxied: tuple[MilterDaemon, MilterDaemon, HAProxy],
                                       stop: str) -> None:
    """Stopping daemon a mid-load loses no message; every message begun after it stopped is served by b.

    SIGTERM: a drains, so the sessions it serves end normally. SIGKILL: at most the sessions in flight on
    a get Postfix's milter_default_action (tempfail, 4xx: the client retries); none is accepted unfiltered.
    """
    a, b, proxy = proxied
    with Senders(bench) as senders:
        senders.wait(EACH_SIDE)
        assert a.process is not None
        if stop == "SIGTERM":
            a.stop()
        else:
            os.kill(a.process.pid, signal.SIGKILL)
            a.process.wait(10)
        stopped = time.monotonic()
        proxy.wait_for("a", "DOWN")
        senders.wait(EACH_SIDE, after=stopped)
    served = {}
    for sent in senders.sent:
        if sent.code == 250:
            fields = [f for f in header_fields(bench.delivered(sent.token, timeout=30)) if f.startswith("X-Served-By")]
            assert len(fields) == 1, fields
            served[sent.token] = fields[0].split(": ")[1]
    bench.not_delivered("no-such-token", settle=0)  # the queue is empty: nothing is held back
    refused = [sent for sent in senders.sent if sent.code != 250]
    before = [sent for sent in senders.sent if sent.began < stopped]
    after = [sent for sent in senders.sent if sent.began > stopped]
    assert {served[sent.token] for sent in before if sent.token in served} == {"a", "b"}
    assert all(served.get(sent.token) == "b" for sent in after), [(s, served.get(s.token)) for s in after]
    if stop == "SIGTERM":
        assert refused == []
    else:
        assert len(refused) <= SESSIONS and all(400 <= sent.code < 500 and sent.began < stopped for sent in refused)
    assert "Traceback" not in b.output()
