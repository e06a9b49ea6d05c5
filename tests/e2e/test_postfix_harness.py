"""Tests of the Postfix end-to-end harness itself (no milter involved)."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from .postfix import PostfixError, PostfixFactory, PostfixInstance, free_port, pid_alive, postfix_available
from .sink import SMTPSink

pytestmark = pytest.mark.e2e

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: harness check\r\n"
    b"Message-ID: <harness-1@example.org>\r\n"
    b"X-Txmilt-Test: one\r\n"
    b"\r\n"
    b"First line of the body.\r\n"
    b".A line that starts with a dot.\r\n"
    b"\r\n"
    b"Last line.\r\n"
)


def _smtp(instance: PostfixInstance) -> smtplib.SMTP:
    host, port = instance.smtp_address
    return smtplib.SMTP(host, port, local_hostname="client.example.org", timeout=10)


def test_message_is_relayed_intact(postfix: PostfixInstance, smtp_sink: SMTPSink) -> None:
    """A message sent to Postfix reaches the sink with headers and body intact."""
    with _smtp(postfix) as client:
        client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)

    (received,) = smtp_sink.wait_for(1, timeout=10)
    assert received.mail_from == "alice@example.org"
    assert received.rcpt_tos == ["bob@example.net"]
    assert received.body() == MESSAGE.partition(b"\r\n\r\n")[2]
    # Postfix prepends its Received: header and keeps the original ones.
    assert received.data.startswith(b"Received: from client.example.org")
    assert received.data.endswith(MESSAGE)
    parsed = received.parsed()
    assert parsed["Subject"] == "harness check"
    assert parsed["X-Txmilt-Test"] == "one"
    postfix.wait_for_log(r"status=sent \(250 2\.0\.0 Ok: queued\)", timeout=5)


def test_two_messages_on_one_connection(postfix: PostfixInstance, smtp_sink: SMTPSink) -> None:
    """Two transactions on the same SMTP session are both relayed."""
    second = MESSAGE.replace(b"harness-1", b"harness-2").replace(b"one", b"two")
    with _smtp(postfix) as client:
        client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        client.sendmail("carol@example.org", ["dave@example.net", "erin@example.net"], second)

    messages = smtp_sink.wait_for(2, timeout=10)
    by_sender = {m.mail_from: m for m in messages}
    assert set(by_sender) == {"alice@example.org", "carol@example.org"}
    assert by_sender["alice@example.org"].parsed()["X-Txmilt-Test"] == "one"
    carol = by_sender["carol@example.org"]
    assert sorted(carol.rcpt_tos) == ["dave@example.net", "erin@example.net"]
    assert carol.parsed()["X-Txmilt-Test"] == "two"
    assert carol.data.endswith(second)
    postfix.wait_for_log(r"disconnect from .* mail=2 rcpt=3 data=2", timeout=5)


def test_large_8bit_message(postfix: PostfixInstance, smtp_sink: SMTPSink) -> None:
    """A 5 MiB 8-bit message goes through Postfix and the sink unchanged."""
    line = "Grüße aus Köln, ".encode() * 40 + b"\r\n"  # under 998 octets
    body = line * (5 * 1024 * 1024 // len(line) + 1)
    message = b"Subject: big\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
    with _smtp(postfix) as client:
        client.sendmail("a@example.org", ["b@example.net"], message, mail_options=["BODY=8BITMIME"])

    (received,) = smtp_sink.wait_for(1, timeout=20)
    assert len(body) > 5 * 1024 * 1024
    assert received.body() == body
    assert "BODY=8BITMIME" in received.mail_options


def test_set_main_cf_and_reload(postfix: PostfixInstance) -> None:
    """main.cf changes take effect after the harness reloads Postfix."""
    postfix.set_main_cf({"smtpd_banner": "$myhostname ESMTP reloaded-by-harness"})
    assert postfix.postconf("smtpd_banner") == "$myhostname ESMTP reloaded-by-harness"
    host, port = postfix.smtp_address
    with socket.create_connection((host, port), timeout=5) as sock:
        banner = sock.recv(512)
    assert banner.startswith(b"220 mx.txmilt.test ESMTP reloaded-by-harness")


def test_hold_queue_and_release(postfix_factory: PostfixFactory, smtp_sink: SMTPSink) -> None:
    """hold_queue() sees held mail; release() + flush() delivers it."""
    postfix = postfix_factory({"smtpd_data_restrictions": "check_client_access static:HOLD"})
    with _smtp(postfix) as client:
        client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)

    postfix.wait_for_log(r": hold: ", timeout=5)
    held = postfix.hold_queue()
    assert len(held) == 1
    assert smtp_sink.messages == []

    postfix.release(held[0])
    postfix.flush()
    (received,) = smtp_sink.wait_for(1, timeout=10)
    assert received.data.endswith(MESSAGE)
    assert postfix.hold_queue() == []


def test_two_instances_side_by_side(postfix_factory: PostfixFactory, smtp_sink: SMTPSink) -> None:
    """Two instances run at once with separate directories, logs and ports."""
    first = postfix_factory()
    second = postfix_factory()
    assert first.queue_dir != second.queue_dir
    assert first.master_pid() != second.master_pid()
    for number, instance in enumerate((first, second)):
        with _smtp(instance) as client:
            client.sendmail(f"n{number}@example.org", ["x@example.net"], MESSAGE)
    smtp_sink.wait_for(2, timeout=10)
    assert f"{first.name}/smtpd" in first.log_text()
    assert f"{second.name}/" not in first.log_text()
    assert f"{second.name}/smtpd" in second.log_text()


def test_stop_leaves_nothing_running(postfix_factory: PostfixFactory) -> None:
    """stop() ends the master and every child; the port is closed."""
    postfix = postfix_factory()
    with _smtp(postfix) as client:
        client.noop()
    master = postfix.master_pid()
    assert master is not None and pid_alive(master)
    assert master in postfix.processes()
    assert len(postfix.processes()) > 1  # master plus at least smtpd, qmgr, pickup

    started = time.monotonic()
    postfix.stop()
    assert time.monotonic() - started < 10
    assert not pid_alive(master)
    assert postfix.processes() == []
    assert not postfix.is_running()
    with pytest.raises(OSError):
        socket.create_connection(postfix.smtp_address, timeout=2).close()


def test_milter_settings_apply_after_reload(postfix: PostfixInstance) -> None:
    """set_main_cf() can point smtpd at a milter; an unreachable one tempfails."""
    dead_port = free_port()
    postfix.set_main_cf(
        {
            "smtpd_milters": f"inet:127.0.0.1:{dead_port}",
            "milter_default_action": "tempfail",
            "milter_connect_timeout": "1s",
        }
    )
    with _smtp(postfix) as client, pytest.raises(smtplib.SMTPResponseException) as info:
        client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
    assert info.value.smtp_code == 451
    postfix.wait_for_log(rf"warning: connect to Milter service inet:127\.0\.0\.1:{dead_port}", timeout=5)

    postfix.unset_main_cf(["smtpd_milters"])
    with _smtp(postfix) as client:
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}


def test_start_failure_reports_log(smtp_sink: SMTPSink) -> None:
    """A port clash makes start() fail with the log tail and leave nothing behind."""
    reason = postfix_available()
    if reason is not None:
        pytest.skip(reason)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        instance = PostfixInstance(squatter.getsockname()[1], smtp_sink.address)
        try:
            with pytest.raises(PostfixError, match="Address already in use"):
                instance.start()
            assert instance.processes() == []
        finally:
            instance.stop()
            instance.cleanup()
