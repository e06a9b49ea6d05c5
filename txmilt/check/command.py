"""txmilt-check's entry point: read the options and the message, check or load the milters, print, exit."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from twisted.internet.task import react

from txmilt.check.load import LoadPlan, ProgressBar, run_load
from txmilt.check.message import (
    MessageFileError,
    Text,
    angle_address,
    header_addresses,
    made_up_message,
    parse_message,
)
from txmilt.check.options import CheckOptions, parse_options
from txmilt.check.play import CheckError, MilterSession, reactor_connector
from txmilt.check.report import check_report
from txmilt.check.status import ExitStatus
from txmilt.check.text import check_text, load_text
from txmilt.client import check_milter_address
from txmilt.conversation import Mail
from txmilt.errors import ConfigurationError

__all__ = ["main", "read_mail"]

#: The envelope of the made-up message, unless --from and --to say otherwise.
MADE_UP_SENDER: Final = "sender@example.org"
MADE_UP_RECIPIENT: Final = "recipient@example.net"
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED: Final = 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _say(text: str, stream: Any) -> None:
    """Write text to a standard stream, letting undecodable bytes of a message through as they were."""
    stream.flush()
    stream.buffer.write(text.encode("utf-8", "surrogateescape"))
    stream.buffer.flush()


def _fail(error: BaseException, status: ExitStatus) -> NoReturn:
    _say(f"txmilt-check: {_one_line(error)}\n", sys.stderr)
    raise SystemExit(int(status))


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as e:
        raise MessageFileError(f"cannot read the message file {path}: {e.strerror or e}") from None


def read_mail(options: CheckOptions) -> Mail:
    """The message to play: the file's (or a made-up one) with its envelope; MessageFileError if it has none."""
    if options.message_file is None:
        sender = MADE_UP_SENDER if options.sender is None else options.sender
        recipients = list(options.recipients) or [MADE_UP_RECIPIENT]
        text = made_up_message(sender, recipients)
    else:
        source = "standard input" if options.message_file == "-" else options.message_file
        text = parse_message(_read(options.message_file), source)
        senders = [options.sender] if options.sender is not None else header_addresses(text.headers, ["From"])
        recipients = list(options.recipients) or header_addresses(text.headers, ["To", "Cc"])
        if not senders:
            raise MessageFileError(f"{source} has no From address: give the envelope sender with --from")
        sender = senders[0]
        if not recipients:
            raise MessageFileError(f"{source} has no To or Cc address: give the envelope recipients with --to")
    return _mail(text, sender, recipients)


def _mail(text: Text, sender: str, recipients: Sequence[str]) -> Mail:
    return Mail(angle_address(sender), [(angle_address(r), ()) for r in recipients], text.headers, text.body)


@dataclass
class _Run:
    """Whether the run got to its end (rather than being stopped by a signal)."""

    finished: bool = False


async def _check(reactor: Any, options: CheckOptions, mail: Mail) -> int:
    session = await MilterSession.open(
        options.milters, reactor_connector(reactor), options.profile, timeout=options.timeout, macros=options.macros
    )
    try:
        played = await session.message(mail, options.client, options.helo)
    except BaseException:
        session.drop()
        raise
    await session.close()
    report = check_report(
        session.addresses, [client.negotiated for client in session.clients], options.profile, options.client,
        options.helo, mail, played,
    )
    _say(json.dumps(report, indent=2) + "\n" if options.json else check_text(report), sys.stdout)
    return int(report["exit_status"])


async def _load(reactor: Any, options: CheckOptions, mail: Mail) -> int:
    assert options.count is not None
    plan = LoadPlan(options.count, options.concurrency, options.messages_per_connection)
    connector = reactor_connector(reactor)

    def open_session() -> Any:
        return MilterSession.open(
            options.milters, connector, options.profile, timeout=options.timeout, macros=options.macros
        )

    progress = ProgressBar(sys.stderr, plan.count) if sys.stderr.isatty() else None
    result = await run_load(plan, open_session, mail, options.client, options.helo, progress=progress)
    report = result.report(options.milters, options.profile.name)
    _say(json.dumps(report, indent=2) + "\n" if options.json else load_text(report), sys.stdout)
    return int(report["exit_status"])


async def _run(reactor: Any, options: CheckOptions, mail: Mail, run: _Run) -> None:
    try:
        for address in options.milters:
            check_milter_address(address)
        status = await (_load if options.load else _check)(reactor, options, mail)
    except CheckError as e:
        _fail(e, ExitStatus.FAILED)
    except ConfigurationError as e:
        _fail(e, ExitStatus.USAGE)
    finally:
        run.finished = True
    raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run txmilt-check with ``argv`` (default: the process's arguments); exits with its status."""
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
        mail = read_mail(options)
    except ConfigurationError as e:
        _fail(e, ExitStatus.USAGE)
    run = _Run()
    try:
        react(_run, (options, mail, run))
    except SystemExit:
        if not run.finished:
            _say("txmilt-check: interrupted\n", sys.stderr)
            raise SystemExit(INTERRUPTED) from None
        raise
    raise AssertionError("react() always exits")  # pragma: no cover
