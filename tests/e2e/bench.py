"""A test bench: one private Postfix, an SMTP sink behind it, and txmilt daemons in front of it.

Postfix runs once per test module; each test points its ``smtpd_milters`` at
the daemon it needs (a reload only when that changes). Every daemon is
reached through a :class:`~tests.e2e.wiretap.WireTap`, so tests can also
check what went over the milter socket.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

from .milterd import MilterDaemon, start_daemons
from .postfix import PostfixInstance
from .sink import SinkMessage, SMTPSink
from .wiretap import WireTap

__all__ = [
    "MILTER_MAIN_CF",
    "Bench",
    "Conversation",
    "SmtpdMilter",
    "TappedMilter",
    "TransactionOptions",
    "converse",
    "header_fields",
    "make_message",
    "split_fields",
    "transact",
    "wait_delivered",
]

#: main.cf settings for talking to a milter; timeouts short enough that a hang fails a test quickly.
MILTER_MAIN_CF: Mapping[str, str] = {
    "smtpd_milters": "",
    "milter_default_action": "tempfail",
    "milter_protocol": "6",
    "milter_connect_timeout": "5s",
    "milter_command_timeout": "15s",
    "milter_content_timeout": "30s",
}
#: What is logged when something went wrong between Postfix and a milter.
POSTFIX_TROUBLE = re.compile(r".*(?:warning|error|fatal|panic):.*", re.IGNORECASE)
DAEMON_TROUBLE = re.compile(r".*(?:Traceback|Unhandled|#error\]|#critical\]|#warn\]).*")


class TappedMilter:
    """A started ``twistd milter`` daemon and the wire tap Postfix reaches it through."""

    def __init__(self, daemon: MilterDaemon, postfix_options: Mapping[str, str] | None = None) -> None:
        self.daemon = daemon
        self.postfix_options = dict(postfix_options or {})
        self.tap = WireTap(("127.0.0.1", daemon.port)).start()

    @property
    def name(self) -> str:
        """The daemon's name, for messages."""
        return self.daemon.name

    @property
    def spec(self) -> str:
        """What to put in ``smtpd_milters``: the tap's address, with per-milter settings if any."""
        if not self.postfix_options:
            return self.tap.spec
        settings = ", ".join(f"{key}={value}" for key, value in self.postfix_options.items())
        return f"{{ {self.tap.spec}, {settings} }}"

    def wait_for_log(self, pattern: str, since: int = 0, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the daemon logged ``pattern`` after offset ``since``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (found := regex.search(self.daemon.output(), since)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not logged by {self.name}:\n{self.daemon.output()[since:][-3000:]}")
            time.sleep(0.02)
        return found

    def stop(self) -> int | None:
        """Stop the tap and the daemon; the daemon's exit status."""
        self.tap.stop()
        return self.daemon.stop()


#: What ``Bench.use`` takes: a daemon behind a tap, or a milter address in Postfix's notation.
SmtpdMilter = TappedMilter | str


@dataclass
class Conversation:
    """The SMTP server's answer at each step of one transaction (None: the step was not reached)."""

    greeting: tuple[int, bytes]
    ehlo: tuple[int, bytes] | None = None
    mail: tuple[int, bytes] | None = None
    rcpt: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    data: tuple[int, bytes] | None = None

    @property
    def accepted(self) -> bool:
        """Whether the server took the message (250 after the final dot)."""
        return self.data is not None and self.data[0] == 250


def make_message(
    subject: str,
    token: str,
    *,
    headers: Sequence[str] = (),
    body: bytes = b"Hello from the txmilt end-to-end tests.\r\n",
    sender: str = "Alice <alice@example.org>",
) -> bytes:
    """A CRLF message whose Message-ID carries ``token`` (so the sink copy can be found)."""
    head = [
        f"From: {sender}",
        "To: Bob <bob@example.net>",
        f"Subject: {subject}",
        f"Message-ID: <{token}@txmilt.test>",
        *headers,
    ]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def header_fields(message: SinkMessage) -> list[str]:
    """The header fields as delivered, each with its folded lines (joined by CRLF); see split_fields."""
    return split_fields(message.header_block())


def split_fields(block: bytes) -> list[str]:
    """Header fields with their folded lines (joined by CRLF); the MTA's own Received: as "Received"."""
    fields: list[str] = []
    for line in block.decode("utf-8", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += "\r\n" + line
        else:
            fields.append(line)
    return ["Received" if f.startswith("Received: from ") else f for f in fields]  # test messages have none


def wait_delivered(sink: SMTPSink, token: str, timeout: float = 15.0) -> SinkMessage:
    """The one message carrying ``token``, once ``sink`` has it; TimeoutError if it does not arrive."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in sink.messages if token.encode() in m.data]
        if found:
            assert len(found) == 1, f"{len(found)} copies of {token} delivered"
            return found[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no message with {token} delivered within {timeout}s")
        time.sleep(0.02)


class TransactionOptions(TypedDict, total=False):
    """The keyword arguments of :func:`converse`: envelope, ESMTP options and the client's address and name."""

    sender: str
    recipients: Sequence[str]
    source: str
    helo: str
    mail_options: Sequence[str]
    rcpt_options: Sequence[str]


def converse(
    address: tuple[str, int],
    message: bytes,
    *,
    sender: str = "alice@example.org",
    recipients: Sequence[str] = ("bob@example.net",),
    source: str = "127.0.0.1",
    helo: str = "client.example.org",
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> Conversation:
    """Run one transaction with the SMTP server at ``address`` step by step, recording every answer.

    It stops at a refused MAIL or when no recipient was accepted.
    """
    host, port = address
    client = smtplib.SMTP(local_hostname=helo, timeout=60, source_address=(source, 0))
    try:
        talk = Conversation(client.connect(host, port))
        if talk.greeting[0] == 421:
            return talk  # the server hangs up; with 554 it answers (refuses) later commands
        talk.ehlo = client.ehlo()
        return transact(client, talk, message, sender, recipients, mail_options, rcpt_options)
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def transact(
    client: smtplib.SMTP,
    talk: Conversation,
    message: bytes,
    sender: str,
    recipients: Sequence[str],
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> Conversation:
    """One transaction on a connected ``client``, its answers recorded in ``talk``.

    It stops at a refused MAIL or when no recipient was accepted (``talk.data`` stays None).
    """
    talk.mail = client.mail(sender, list(mail_options))
    if talk.mail[0] != 250:
        return talk
    for recipient in recipients:
        talk.rcpt[recipient] = client.rcpt(recipient, list(rcpt_options))
    if not any(code == 250 for code, _ in talk.rcpt.values()):
        return talk
    try:
        talk.data = client.data(message)
    except smtplib.SMTPDataError as e:
        error = e.smtp_error
        talk.data = (e.smtp_code, error if isinstance(error, bytes) else error.encode())
    return talk


class Bench:
    """One Postfix, its sink, and the milter daemons it can be pointed at."""

    def __init__(self, postfix: PostfixInstance, sink: SMTPSink) -> None:
        self.postfix = postfix
        self.sink = sink
        self.milters: list[TappedMilter] = []
        self.current: tuple[SmtpdMilter, ...] = ()
        self._counter = 0

    # -- milters

    def start_milter(
        self,
        name: str,
        filters: Sequence[Mapping[str, Any]],
        daemon: Mapping[str, Any] | None = None,
        postfix_options: Mapping[str, str] | None = None,
    ) -> TappedMilter:
        """Start a daemon running ``filters`` (``[[filter]]`` tables), with a tap in front.

        ``daemon`` adds ``[daemon]`` settings; ``postfix_options`` are Postfix's per-milter
        settings (``content_timeout`` and the like) for this milter in ``smtpd_milters``.
        """
        milter = TappedMilter(MilterDaemon(filters, daemon, name=name).start(), postfix_options)
        self.milters.append(milter)
        return milter

    def start_milters(self, daemons: Sequence[MilterDaemon]) -> list[TappedMilter]:
        """Start several daemons at once (see start_milter), each with a tap in front."""
        start_daemons(daemons)
        started = [TappedMilter(daemon) for daemon in daemons]
        self.milters.extend(started)
        return started

    def use(self, milter: SmtpdMilter | Sequence[SmtpdMilter] | None) -> None:
        """Point Postfix's ``smtpd_milters`` and ``non_smtpd_milters`` at ``milter`` (None: none), reloading if needed.

        A list gives ``smtpd_milters = a, b, c`` in that order; a string is a
        milter address in Postfix's notation (a milter not behind a tap). The
        taps forget the sessions of earlier tests.
        """
        chosen = () if milter is None else (milter,) if isinstance(milter, TappedMilter | str) else tuple(milter)
        if chosen != self.current:
            spec = ", ".join(m if isinstance(m, str) else m.spec for m in chosen)
            self.postfix.set_main_cf({"smtpd_milters": spec, "non_smtpd_milters": spec})
            self.current = chosen
        for each in chosen:
            if isinstance(each, TappedMilter):
                each.tap.clear()

    def stop_milters(self) -> dict[str, int | None]:
        """Stop every daemon; their exit statuses by name."""
        statuses = {}
        for milter in self.milters:
            statuses[milter.name] = milter.stop()
        return statuses

    # -- mail

    def token(self, label: str) -> str:
        """A unique token for one test message."""
        self._counter += 1
        return f"{re.sub(r'[^A-Za-z0-9]+', '-', label)}-{self._counter}-{time.monotonic_ns()}"

    def smtp(self, source: str = "127.0.0.1", helo: str = "client.example.org") -> smtplib.SMTP:
        """An SMTP client connected to Postfix from ``source`` (any 127/8 address)."""
        host, port = self.postfix.smtp_address
        return smtplib.SMTP(host, port, local_hostname=helo, timeout=60, source_address=(source, 0))

    def converse(self, message: bytes, **options: Unpack[TransactionOptions]) -> Conversation:
        """Run one transaction with Postfix step by step (see :func:`converse`)."""
        return converse(self.postfix.smtp_address, message, **options)

    def delivered(self, token: str, timeout: float = 15.0) -> SinkMessage:
        """The message carrying ``token``, once the sink has it."""
        try:
            return wait_delivered(self.sink, token, timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- maillog ---\n{self.postfix.log_tail(30)}") from None

    def not_delivered(self, token: str, settle: float = 0.5, timeout: float = 10.0) -> None:
        """Fail unless, ``settle`` seconds on, Postfix's queue has drained and the sink has no ``token``.

        A message that was wrongly queued would either be delivered while the
        queue drains (and found in the sink) or stay queued (and fail the wait).
        """
        time.sleep(settle)
        deadline = time.monotonic() + timeout
        while queued := self.postfix.queue():
            if time.monotonic() > deadline:
                raise AssertionError(f"messages still queued: {queued}")
            time.sleep(0.05)
        assert not [m for m in self.sink.messages if token.encode() in m.data], f"{token} was delivered"

    def wait_for_log(self, pattern: str, since: int, timeout: float = 10.0) -> re.Match[str]:
        """Wait for ``pattern`` in Postfix's log after offset ``since``."""
        return self.postfix.wait_for_log(pattern, timeout=timeout, since=since)
