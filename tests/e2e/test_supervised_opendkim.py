"""OpenDKIM run by the daemon itself (a remote filter's ``command``) behind a real Postfix, killed mid-run.

With ``when = { authenticated = true }`` only authenticated submissions reach it. The client
authenticates with Postfix's XCLIENT ``LOGIN``, which sets the SASL login name, hence the
``{auth_authen}`` macro, as a real SASL login would.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .bench import Bench, TappedMilter, header_fields, make_message
from .opendkim import OpenDKIM, opendkim_available
from .postfix import pid_alive

pytestmark = pytest.mark.e2e


def _keys(selector: str) -> Iterator[OpenDKIM]:
    """An OpenDKIM key and config for example.org under ``selector`` (not started: the daemon runs it)."""
    reason = opendkim_available()
    if reason is not None:
        pytest.skip(reason)
    keys = OpenDKIM(domain="example.org", selector=selector)
    try:
        yield keys
    finally:
        keys.cleanup()


@pytest.fixture(scope="module")
def signer() -> Iterator[OpenDKIM]:
    """An OpenDKIM key and config for example.org (not started: the daemon runs it)."""
    yield from _keys("txmilt")


@pytest.fixture(scope="module")
def supervising(bench: Bench, signer: OpenDKIM) -> TappedMilter:
    """A daemon that stamps every message, then passes it to the OpenDKIM it runs (tempfail while it is down)."""
    command = signer.prepare()
    return bench.start_milter("supervised-opendkim", [
        {"name": "stamp", "class": "tests.e2e.filters:Editor",
         "options": {"edits": {"*": [["add_header", "X-Stamp", "txmilt"]]}}},
        {"name": "opendkim", "remote": signer.spec, "command": command, "restart_delay": 0.5, "timeout": 10,
         "fallback": "tempfail"},
    ])


def signed(bench: Bench, signer: OpenDKIM, label: str) -> bool | None:
    """Send one message: True if delivered with a signature that verifies, None if tempfailed.

    A message delivered without a valid signature fails the test.
    """
    dkim: Any = importlib.import_module("dkim")
    token = bench.token(label)
    talk = bench.converse(make_message(f"supervised {label}", token), sender="alice@example.org")
    if not talk.accepted:
        steps = [step for step in (talk.mail, *talk.rcpt.values(), talk.data) if step is not None]
        assert any(400 <= code < 500 for code, _ in steps), talk
        return None
    received = bench.delivered(token)
    assert header_fields(received)[0].startswith("DKIM-Signature:"), header_fields(received)
    assert dkim.verify(received.data, dnsfunc=signer.dnsfunc) is True
    return True


def test_supervised_opendkim_signs_and_comes_back(bench: Bench, signer: OpenDKIM, supervising: TappedMilter) -> None:
    """Messages are signed; OpenDKIM killed mid-run is restarted, and later messages are signed again."""
    bench.use(supervising)
    supervising.wait_for_log(r"supervised milter opendkim accepts connections", timeout=30)
    assert signed(bench, signer, "before") is True
    started = supervising.wait_for_log(r"started supervised milter opendkim \(pid (\d+)\)")
    pid = int(started[1])
    mark = supervising.daemon.log_mark()
    os.kill(pid, signal.SIGKILL)
    supervising.wait_for_log(
        rf"supervised milter opendkim \(pid {pid}\) was killed by SIGKILL; restarting it in [\d.]+s", mark
    )
    results: list[bool | None] = []
    deadline = time.monotonic() + 30
    while not results or results[-1] is not True:
        assert time.monotonic() < deadline, f"no message signed again after the restart: {results}"
        results.append(signed(bench, signer, f"after-{len(results)}"))
    assert not pid_alive(pid)
    output = supervising.daemon.output()[mark:]
    assert len(re.findall(rf"\(pid {pid}\)", output)) == 1, output  # one line about the death



@pytest.fixture(scope="module")
def user_signer() -> Iterator[OpenDKIM]:
    """A second OpenDKIM key and config (its own port), for the daemon below to run."""
    yield from _keys("users")


@pytest.fixture(scope="module")
def signing_for_users(bench: Bench, user_signer: OpenDKIM) -> TappedMilter:
    """A daemon running OpenDKIM as a supervised member asked only for authenticated submissions."""
    bench.postfix.set_main_cf({"smtpd_authorized_xclient_hosts": "127.0.0.0/8"})
    command = user_signer.prepare()  # chooses its port
    return bench.start_milter("supervised-opendkim-when", [
        {"name": "opendkim", "remote": user_signer.spec, "command": command, "timeout": 10,
         "when": {"authenticated": True}},
    ])


def submit(bench: Bench, token: str, login: str | None) -> None:
    """Send one message from 127.0.0.1, first authenticating as ``login`` with XCLIENT if given."""
    host, port = bench.postfix.smtp_address
    with smtplib.SMTP(host, port, local_hostname="client.example.org", timeout=60) as client:
        client.ehlo()
        if login is not None:
            code, text = client.docmd("XCLIENT", f"LOGIN={login}")
            assert code == 220, (code, text)
            client.ehlo()
        client.sendmail("alice@example.org", ["bob@example.net"], make_message(f"when {login}", token))


def test_when_authenticated(bench: Bench, user_signer: OpenDKIM, signing_for_users: TappedMilter) -> None:
    """An authenticated submission is signed (and verifies); an unauthenticated one passes OpenDKIM by."""
    dkim: Any = importlib.import_module("dkim")
    bench.use(signing_for_users)
    signing_for_users.wait_for_log(r"supervised milter opendkim accepts connections", timeout=30)
    user, anonymous = bench.token("when-user"), bench.token("when-anonymous")
    submit(bench, user, "alice")
    submit(bench, anonymous, None)
    signed_copy = bench.delivered(user)
    assert header_fields(signed_copy)[0].startswith("DKIM-Signature:"), header_fields(signed_copy)
    assert dkim.verify(signed_copy.data, dnsfunc=user_signer.dnsfunc) is True
    unsigned = bench.delivered(anonymous)
    assert not [f for f in header_fields(unsigned) if f.startswith("DKIM-Signature:")], header_fields(unsigned)
