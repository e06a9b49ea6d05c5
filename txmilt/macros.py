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


class WireMacros(Mapping[str, str]):
    """One stage's macro values as a whole MACRO packet carried them, decoded when first read.

    ``raw`` is the packet's payload after the command letter: NUL-terminated
    name/value strings, an even number of them (the caller checks). Most
    filters read few macros, most packets are never read at all.
    """

    __slots__ = ("_raw", "_values")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._values: dict[str, str] | None = None

    def _decoded(self) -> dict[str, str]:
        values = self._values
        if values is None:
            values = {}
            if self._raw:
                parts = [part.decode("utf-8", "surrogateescape") for part in self._raw[:-1].split(b"\0")]
                for index in range(0, len(parts), 2):
                    values.setdefault(normal_macro_name(parts[index]), parts[index + 1])  # the first of duplicates
            self._values, self._raw = values, b""
        return values

    def __getitem__(self, name: str) -> str:
        return self._decoded()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._decoded()

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"WireMacros({self._decoded()!r})"
