"""txmilt-check's command line: what to check, how to play the message, and how to report."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, NoReturn

from typing_extensions import override

from txmilt.client import DEFAULT_TIMEOUT
from txmilt.conversation import DEFAULT_CLIENT, DEFAULT_HELO
from txmilt.errors import ConfigurationError
from txmilt.messages import Connect, Family
from txmilt.mta import POSTFIX, SENDMAIL, MTAProfile

__all__ = ["PROFILES", "CheckOptions", "UsageError", "parse_options"]

#: The MTAs txmilt-check can play, by their option value.
PROFILES: Final = {"postfix": POSTFIX, "sendmail": SENDMAIL}

_DESCRIPTION = """\
Play one SMTP conversation to a milter, or to several in turn as Postfix's
smtpd_milters = a, b would, and show what each did to the message.
MILTER is a libmilter address (inet:8891@127.0.0.1, inet:127.0.0.1:8891,
inet6:8891@[::1], unix:/run/milter.sock) or a Twisted client description.
MESSAGE is an RFC 5322 file, or - for standard input; without it a small
message is made up."""

_EPILOG = """\
exit status: 0 accepted (continue or accept), 1 rejected, 2 tempfailed
(or 421 shutdown), 3 discarded, 4 a milter could not be reached, broke the
protocol, closed the connection or timed out (in load mode: any message
failed so), 64 bad options or message file."""


class UsageError(ConfigurationError):
    """The command line is wrong."""


@dataclass(frozen=True)
class CheckOptions:
    """Everything the command line says."""

    milters: tuple[str, ...]
    message_file: str | None = None
    profile: MTAProfile = POSTFIX
    #: Macro values replacing the profile's; None leaves the macro out.
    macros: dict[str, str | None] = field(default_factory=dict)
    client: Connect = DEFAULT_CLIENT
    helo: str = DEFAULT_HELO
    sender: str | None = None
    recipients: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    json: bool = False
    count: int | None = None
    concurrency: int = 1
    messages_per_connection: int = 1

    @property
    def load(self) -> bool:
        """Whether to run the load mode."""
        return self.count is not None


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing usage and exiting."""

    @override
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value

    convert.__name__ = kind.__name__
    return convert


def _parser() -> _Parser:
    parser = _Parser(
        prog="txmilt-check", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] MILTER [MILTER ...] [MESSAGE | -]",
    )
    parser.add_argument("targets", nargs="+", metavar="MILTER", help="milters in order, then the message file")
    mta = parser.add_argument_group("the MTA")
    mta.add_argument("--profile", choices=sorted(PROFILES), default="postfix",
                     help="the MTA to play: what it offers and which macros it sends when (default postfix)")
    mta.add_argument("--macro", action="append", default=[], metavar="NAME=VALUE",
                     help="a macro value to send instead of the profile's (repeatable; NAME= leaves it out)")
    mta.add_argument("--client-address", default=DEFAULT_CLIENT.address, metavar="IP",
                     help=f"the SMTP client's IP address (default {DEFAULT_CLIENT.address})")
    mta.add_argument("--client-name", default=DEFAULT_CLIENT.hostname, metavar="NAME",
                     help=f"the SMTP client's host name (default {DEFAULT_CLIENT.hostname})")
    mta.add_argument("--helo", metavar="NAME", help="the HELO/EHLO name (default: the client's host name)")
    mta.add_argument("--from", dest="sender", metavar="ADDRESS",
                     help="envelope sender (default: the message's From address; '' for <>)")
    mta.add_argument("--to", dest="recipients", action="append", default=[], metavar="ADDRESS",
                     help="envelope recipient (repeatable; default: the message's To and Cc addresses)")
    mta.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                     help=f"longest wait for a connection or a reply (default {DEFAULT_TIMEOUT:g})")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    load = parser.add_argument_group("load mode")
    load.add_argument("--count", type=_positive(int), metavar="N", help="replay the message N times")
    load.add_argument("--concurrency", type=_positive(int), metavar="C", help="messages in flight at once (1)")
    load.add_argument("--messages-per-connection", type=_positive(int), metavar="K",
                      help="messages on one milter connection before it is closed (1)")
    return parser


def _is_message(target: str) -> bool:
    """Whether the last positional argument names the message rather than a milter."""
    return target == "-" or ":" not in target or os.path.isfile(target)


def _client(address: str, name: str) -> Connect:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise UsageError(f"--client-address {address!r} is not an IPv4 or IPv6 address") from None
    family = Family.INET if ip.version == 4 else Family.INET6
    return Connect(name, family, DEFAULT_CLIENT.port, str(ip))


def _macros(pairs: Sequence[str]) -> dict[str, str | None]:
    macros: dict[str, str | None] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise UsageError(f"--macro {pair!r}: expected NAME=VALUE, e.g. --macro '{{daemon_name}}=mx'")
        macros[name.strip()] = value or None
    return macros


def parse_options(argv: Sequence[str]) -> CheckOptions:
    """The options of a command line (without the program name); UsageError if they make no sense."""
    args = _parser().parse_intermixed_args(argv)
    targets: list[str] = args.targets
    message = targets.pop() if len(targets) > 1 and _is_message(targets[-1]) else None
    if not targets or (len(targets) == 1 and targets[0] == "-"):
        raise UsageError("give at least one milter address, e.g. inet:8891@127.0.0.1")
    loose = [t for t in targets if _is_message(t)]
    if loose:
        raise UsageError(
            f"{loose[0]!r} is not a milter address (inet:PORT@HOST, unix:PATH, ...); the message file comes last"
        )
    if args.count is None and (args.concurrency is not None or args.messages_per_connection is not None):
        raise UsageError("--concurrency and --messages-per-connection need --count")
    return CheckOptions(
        milters=tuple(targets),
        message_file=message,
        profile=PROFILES[args.profile],
        macros=_macros(args.macro),
        client=_client(args.client_address, args.client_name),
        helo=args.helo if args.helo is not None else args.client_name,
        sender=args.sender,
        recipients=tuple(args.recipients),
        timeout=args.timeout,
        json=args.json,
        count=args.count,
        concurrency=args.concurrency or 1,
        messages_per_connection=args.messages_per_connection or 1,
    )
