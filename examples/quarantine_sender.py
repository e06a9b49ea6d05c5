"""Put mail from listed sender domains on hold for a human to look at."""

from __future__ import annotations

from collections.abc import Iterable

from txmilt import Action, Changes, MailFrom, Milter, Result


class QuarantineSender(Milter):
    """Quarantines (Postfix: hold queue) every message whose envelope sender is in ``domains``."""

    actions = Action.QUARANTINE

    def __init__(self, domains: Iterable[str] = ("suspicious.example",)) -> None:
        self.domains = {domain.lower().lstrip("@") for domain in domains}
        self.reason: str | None = None  # per message: cleared in reset()

    def mail_from(self, command: MailFrom) -> Result:
        domain = command.domain.lower()
        matched = domain in self.domains or any(domain.endswith("." + d) for d in self.domains)
        self.reason = f"sender domain {domain} is quarantined" if matched else None
        return None

    def end_of_message(self, changes: Changes) -> Result:
        if self.reason:
            changes.quarantine(self.reason)
        return None

    def reset(self) -> Result:
        self.reason = None
        return None
