"""One ``[[filter]]`` table of the config file: the FilterSpec it describes, and the program it runs."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from txmilt.chain import FilterSpec
from txmilt.conditions import When
from txmilt.errors import ConfigurationError
from txmilt.interfaces import IMilter
from txmilt.messages import Accept, Continue, Reject, TempFail
from txmilt.milter import FilterVerdict

FALLBACKS: Mapping[str, Callable[[], FilterVerdict]] = {
    "tempfail": TempFail,
    "accept": Accept,
    "continue": Continue,
    "reject": Reject,
}


def positive(label: str, value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"{label} must be positive, not {value!r}")


#: Keys of a remote [[filter]] table that have the daemon run that milter itself.
_COMMAND_KEYS: Final = ("command", "env", "restart_delay", "start_timeout")
#: Seconds before a supervised milter that died is started again (doubled while it keeps dying young).
DEFAULT_RESTART_DELAY = 1.0
#: Seconds a supervised milter has to accept connections at start before the daemon serves without it.
DEFAULT_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class SupervisedCommand:
    """An external milter the daemon runs itself: a ``remote`` filter's ``command``."""

    #: The filter's name, used in logs.
    name: str
    #: The filter's ``remote`` address, where the program must accept connections.
    address: str
    command: tuple[str, ...]
    #: Variables added to the daemon's own environment for the program.
    env: tuple[tuple[str, str], ...] = ()
    restart_delay: float = DEFAULT_RESTART_DELAY
    start_timeout: float = DEFAULT_START_TIMEOUT


_FILTER_KEYS = {
    "class": str,
    "remote": str,
    "name": str,
    "timeout": (int, float),
    "fallback": str,
    "dry_run": bool,
    "after_changes": bool,
    "when": dict,
    "options": dict,
    "command": list,
    "env": dict,
    "restart_delay": (int, float),
    "start_timeout": (int, float),
}


def load_factory(path: str) -> Callable[..., IMilter]:
    """The class (or factory) named ``package.module:Name`` or ``package.module.Name``."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigurationError(f"filter {path!r}: name it as package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigurationError(f"filter {path!r}: cannot import module {module_name!r}: {e}") from e
    try:
        target: Any = module
        for part in attribute.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ConfigurationError(f"filter {path!r}: module {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise ConfigurationError(f"filter {path!r}: {attribute!r} is not a class or factory")
    return target  # type: ignore[no-any-return]


def check_keys(table: Mapping[str, Any], known: Mapping[str, Any], where: str) -> None:
    for key, value in table.items():
        if key not in known:
            raise ConfigurationError(
                f"{where}: unknown key {key!r}; known keys are {', '.join(sorted(known))}"
            )
        expected = known[key]
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ConfigurationError(f"{where}: {key} = {value!r} has the wrong type")


def fallback_verdict(name: str, where: str) -> FilterVerdict:
    """The verdict a fallback name stands for."""
    try:
        return FALLBACKS[name.lower()]()
    except KeyError:
        raise ConfigurationError(
            f"{where}: fallback {name!r} is not one of {', '.join(FALLBACKS)}"
        ) from None


def filter_spec(
    table: Mapping[str, Any], where: str, default_timeout: float, default_fallback: str
) -> FilterSpec:
    """A FilterSpec from one ``[[filter]]`` table (or a command-line ``--filter``)."""
    check_keys(table, _FILTER_KEYS, where)
    if ("class" in table) == ("remote" in table):
        raise ConfigurationError(
            f"{where}: give exactly one of class = \"module:Class\" or remote = \"inet:PORT@HOST\""
        )
    options = table.get("options", {})
    timeout = float(table.get("timeout", default_timeout))
    positive(f"{where}: timeout", timeout)
    fallback = fallback_verdict(table.get("fallback", default_fallback), where)
    when = When.parse(table["when"], where) if "when" in table else None
    if "remote" in table:
        from txmilt.remote import remote_filter

        try:
            return remote_filter(
                table["remote"], name=table.get("name", table["remote"]), timeout=timeout, fallback=fallback,
                dry_run=table.get("dry_run", False), after_changes=table.get("after_changes", False), when=when,
                **options,
            )
        except ConfigurationError as e:
            raise ConfigurationError(f"{where}: {e}") from None
    cls = load_factory(table["class"])
    factory: Callable[[], IMilter] = functools.partial(cls, **options) if options else cls
    return FilterSpec(
        factory, name=table.get("name", table["class"]), timeout=timeout, fallback=fallback,
        dry_run=table.get("dry_run", False), after_changes=table.get("after_changes", False), when=when,
    )


def supervised_command(table: Mapping[str, Any], where: str, name: str) -> SupervisedCommand | None:
    """The program a ``[[filter]]`` table has the daemon run (its ``command``), or None if it names none."""
    if "command" not in table:
        stray = [key for key in _COMMAND_KEYS if key in table]
        if stray:
            raise ConfigurationError(f"{where}: {stray[0]} needs command = [...], the program the daemon runs")
        return None
    if "remote" not in table:
        raise ConfigurationError(
            f"{where}: command needs remote = \"inet:PORT@HOST\", the address where the program accepts connections"
        )
    command = table["command"]
    if not command or not all(isinstance(part, str) and part for part in command):
        raise ConfigurationError(f'{where}: command must be a list of words such as ["opendkim", "-f"]: {command!r}')
    env = table.get("env", {})
    if not all(isinstance(value, str) for value in env.values()):
        raise ConfigurationError(f"{where}: env values must be strings, not {env!r}")
    restart_delay = float(table.get("restart_delay", DEFAULT_RESTART_DELAY))
    positive(f"{where}: restart_delay", restart_delay)
    start_timeout = float(table.get("start_timeout", DEFAULT_START_TIMEOUT))
    positive(f"{where}: start_timeout", start_timeout)
    return SupervisedCommand(name, table["remote"], tuple(command), tuple(env.items()), restart_delay, start_timeout)
