"""The benchmark filter for txmilt: look at every event, add one header at end of message.

Every milter under test (txmilt and the peers in bench/peers/) runs the same
filter: callbacks for connect, HELO, MAIL, RCPT, header, end of headers, body
and end of message that each look at their argument and continue, and one
``X-Bench: 1`` header added at end of message.

``BenchFilter`` is the one-filter case; ``ChainFilter1`` to ``ChainFilter3``
make the three-filter chain of workload W5, each adding its own header
(``X-Bench-1`` ... ``X-Bench-3``).
"""

from __future__ import annotations

from typing import ClassVar

from typing_extensions import override

from txmilt import Milter
from txmilt.messages import (
    Action,
    BodyChunk,
    Connect,
    EndOfHeaders,
    Header,
    Helo,
    MailFrom,
    RcptTo,
)
from txmilt.milter import Changes, Result


class BenchFilter(Milter):
    """Inspects every event, continues everywhere, adds ``X-Bench: 1`` at end of message."""

    actions = Action.ADD_HEADERS
    header_name: ClassVar[str] = "X-Bench"

    def __init__(self) -> None:
        self.client = ""
        self.recipients = 0
        self.headers = 0
        self.body_bytes = 0

    @override
    def connect(self, command: Connect) -> Result:
        self.client = command.address
        return None

    @override
    def helo(self, command: Helo) -> Result:
        self.helo_name = command.name
        return None

    @override
    def mail_from(self, command: MailFrom) -> Result:
        self.sender = command.address
        self.recipients = self.headers = self.body_bytes = 0
        return None

    @override
    def rcpt_to(self, command: RcptTo) -> Result:
        self.recipients += 1
        return None

    @override
    def header(self, command: Header) -> Result:
        self.headers += 1
        return None

    @override
    def end_of_headers(self, command: EndOfHeaders) -> Result:
        return None

    @override
    def body(self, command: BodyChunk) -> Result:
        self.body_bytes += len(command.data)
        return None

    @override
    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header(self.header_name, "1")
        return None


class ChainFilter1(BenchFilter):
    """First member of the W5 chain."""

    header_name = "X-Bench-1"


class ChainFilter2(BenchFilter):
    """Second member of the W5 chain."""

    header_name = "X-Bench-2"


class ChainFilter3(BenchFilter):
    """Third member of the W5 chain."""

    header_name = "X-Bench-3"
