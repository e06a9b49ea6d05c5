"""Ask a Postfix policy service about each recipient, with an asyncio client.

Policy services (postgrey, policyd-spf, postfwd, ...) speak Postfix's SMTPD
access policy delegation protocol over TCP: ``name=value`` lines and an empty
line; the answer is an ``action=...`` line and an empty line. This filter asks
at every RCPT with asyncio streams, so it runs on Twisted's asyncio reactor::

    PYTHONPATH=. twistd -n --reactor=asyncio milter --filter examples.policy_check:PolicyCheck

If the service cannot be reached in ``timeout`` seconds the filter fails and
gets its ``fallback`` (tempfail unless configured otherwise).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

from txmilt import Connect, Helo, MacroStage, MailFrom, Milter, RcptTo, Reject, Result, TempFail

#: An optional SMTP code and enhanced status before the text: ``550 5.7.1 go away``.
_REPLY = re.compile(r"(?:(?P<code>[45]\d\d)(?:\s+|$))?(?:(?P<status>[45]\.\d{1,3}\.\d{1,3})(?:\s+|$))?(?P<text>.*)")


#: Policy actions that refuse the recipient (``DEFER_IF_PERMIT`` is what greylisting answers).
_REFUSALS: Mapping[str, type[Reject | TempFail]] = {"REJECT": Reject, "DEFER": TempFail, "DEFER_IF_PERMIT": TempFail}


def verdict(action: str) -> Reject | TempFail | None:
    """The verdict for a policy ``action``; None (continue) for OK, DUNNO, PREPEND and the rest."""
    word, _, rest = action.strip().partition(" ")
    kind: type[Reject | TempFail]
    if word.upper() in _REFUSALS:
        kind = _REFUSALS[word.upper()]
    elif re.fullmatch(r"[45]\d\d", word):
        kind, rest = (Reject if word.startswith("5") else TempFail), action.strip()
    else:
        return None
    reply = _REPLY.fullmatch(rest.strip())
    assert reply is not None  # the pattern matches any text
    if not any(reply.groupdict().values()):
        return kind()  # the MTA's default text
    code = int(reply["code"]) if reply["code"] else None
    return kind(reply["text"], code=code, status=reply["status"])


class PolicyCheck(Milter):
    """Refuses or defers each recipient as the policy service at ``host``:``port`` says."""

    macro_requests: ClassVar[Mapping[MacroStage, Sequence[str]]] = {MacroStage.CONNECT: ("{client_addr}",)}

    def __init__(self, host: str = "127.0.0.1", port: int = 10023, timeout: float = 5.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.client: dict[str, str] = {}  # per connection
        self.sender = ""  # per message: cleared in reset()

    def connect(self, command: Connect) -> Result:
        self.client["client_address"] = self.macros.get("client_addr") or command.address
        self.client["client_name"] = command.hostname
        return None

    def helo(self, command: Helo) -> Result:
        self.client["helo_name"] = command.name
        return None

    def mail_from(self, command: MailFrom) -> Result:
        self.sender = command.mailbox
        return None

    async def rcpt_to(self, command: RcptTo) -> Reject | TempFail | None:
        return verdict(await self.ask(sender=self.sender, recipient=command.mailbox))

    def reset(self) -> Result:
        self.sender = ""
        return None

    async def ask(self, **attributes: str) -> str:
        """One policy request for this connection and ``attributes``; the action (``DUNNO`` if none)."""
        request = {"request": "smtpd_access_policy", "protocol_state": "RCPT", **self.client, **attributes}
        lines = "".join(f"{name}={' '.join(value.splitlines())}\n" for name, value in request.items()) + "\n"
        answer: dict[str, str] = {}
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(lines.encode("utf-8", "surrogateescape"))
                await writer.drain()
                while line := (await reader.readline()).decode("utf-8", "replace").strip():
                    name, _, value = line.partition("=")
                    answer[name] = value
            finally:
                writer.close()
                await writer.wait_closed()
        return answer.get("action", "DUNNO")
