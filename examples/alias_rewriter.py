"""Rewrite recipients through an alias table: delete the alias, add its targets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from txmilt import Action, Changes, Milter, RcptTo, Result


class AliasRewriter(Milter):
    """Replaces each recipient found in ``aliases`` with the addresses it stands for."""

    actions = Action.ADD_RECIPIENTS | Action.DELETE_RECIPIENTS

    def __init__(self, aliases: Mapping[str, Sequence[str]] | None = None) -> None:
        table = aliases if aliases is not None else {"sales@example.com": ["alice@example.com", "bob@example.com"]}
        self.aliases = {alias.lower(): tuple(targets) for alias, targets in table.items()}
        self.rewrites: list[tuple[str, tuple[str, ...]]] = []  # per message: cleared in reset()

    def rcpt_to(self, command: RcptTo) -> Result:
        targets = self.aliases.get(command.mailbox.lower())
        if targets:
            self.rewrites.append((command.address, targets))
        return None

    def end_of_message(self, changes: Changes) -> Result:
        for alias, targets in self.rewrites:
            changes.delete_recipient(alias)
            for target in targets:
                changes.add_recipient(f"<{target}>")
        return None

    def reset(self) -> Result:
        self.rewrites = []
        return None
