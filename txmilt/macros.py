"""Macro values as a milter sees them: every stage's values, latest stage first."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final


def normal_macro_name(name: str) -> str:
    """``x`` for ``{x}``: libmilter looks both spellings up as one name."""
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


class MacroView(Mapping[str, str]):
    """Macro values visible now, latest stage first; ``x`` and ``{x}`` are one name."""

    __slots__ = ("_sets",)

    def __init__(self, sets: tuple[Mapping[str, str], ...]) -> None:
        self._sets = sets

    def __getitem__(self, name: str) -> str:
        key = normal_macro_name(name)
        for values in self._sets:
            if key in values:
                return values[key]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for values in self._sets:
            for key in values:
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        return len(set().union(*self._sets))

    def __repr__(self) -> str:
        return f"MacroView({dict(self)!r})"


EMPTY_MACROS: Final = MacroView(())
