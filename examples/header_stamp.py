"""Stamp every message with the filter's name and the SMTP client's address."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from txmilt import Action, Changes, Connect, MacroStage, Milter, Result


class HeaderStamp(Milter):
    """Adds ``X-Filtered-By: txmilt on <host> (client <address>)`` at end of message."""

    actions = Action.ADD_HEADERS
    macro_requests: ClassVar[Mapping[MacroStage, Sequence[str]]] = {MacroStage.CONNECT: ("{client_addr}", "j")}

    def __init__(self, header: str = "X-Filtered-By", name: str = "txmilt") -> None:
        self.header_name = header
        self.name = name
        self.client = "unknown"

    def connect(self, command: Connect) -> Result:
        self.client = self.macros.get("client_addr") or command.address or command.hostname
        return None

    def end_of_message(self, changes: Changes) -> Result:
        host = self.macros.get("j")
        stamp = f"{self.name} on {host}" if host else self.name
        changes.add_header(self.header_name, f"{stamp} (client {self.client})")
        return None
