"""The daemon's configuration: a TOML file and command-line values, checked before anything listens."""

from __future__ import annotations

import functools
import importlib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from txmilt.chain import DEFAULT_BODY_SPOOL_THRESHOLD, DEFAULT_MAX_BODY_SIZE, FilterSpec, verify_filters
from txmilt.codec import ABSOLUTE_FRAME_LIMIT, DEFAULT_FRAME_LIMIT
from txmilt.errors import ConfigurationError
from txmilt.interfaces import IMilter
from txmilt.listen import check_strports, to_strports
from txmilt.messages import Accept, Continue, Reject, TempFail
from txmilt.milter import FilterVerdict
from txmilt.protocol import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_NEGOTIATION_TIMEOUT
from txmilt.session import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS

#: Where the daemon listens when nothing else is said.
DEFAULT_LISTEN = "tcp:8891:interface=127.0.0.1"

FALLBACKS: Mapping[str, Callable[[], FilterVerdict]] = {
    "tempfail": TempFail,
    "accept": Accept,
    "continue": Continue,
    "reject": Reject,
}


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``twistd milter`` needs to run."""

    listen: tuple[str, ...] = ()
    filters: tuple[FilterSpec, ...] = ()
    metrics: str | None = None
    frame_limit: int = DEFAULT_FRAME_LIMIT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    negotiation_timeout: float = DEFAULT_NEGOTIATION_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_headers: int = DEFAULT_MAX_HEADERS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    body_spool_threshold: int = DEFAULT_BODY_SPOOL_THRESHOLD
    drain_timeout: float = 30.0
    progress_interval: float = 10.0
    socket_group: str | None = None
    default_timeout: float = 25.0
    default_fallback: str = "tempfail"


_DAEMON_KEYS = {
    "listen": (list, str),
    "metrics": str,
    "frame_limit": int,
    "idle_timeout": (int, float),
    "negotiation_timeout": (int, float),
    "max_connections": int,
    "max_headers": int,
    "max_header_bytes": int,
    "max_body_size": int,
    "body_spool_threshold": int,
    "drain_timeout": (int, float),
    "progress_interval": (int, float),
    "socket_group": str,
    "timeout": (int, float),
    "fallback": str,
}
_FILTER_KEYS = {
    "class": str,
    "remote": str,
    "name": str,
    "timeout": (int, float),
    "fallback": str,
    "dry_run": bool,
    "options": dict,
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


def _check_keys(table: Mapping[str, Any], known: Mapping[str, Any], where: str) -> None:
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
    _check_keys(table, _FILTER_KEYS, where)
    if ("class" in table) == ("remote" in table):
        raise ConfigurationError(
            f"{where}: give exactly one of class = \"module:Class\" or remote = \"inet:PORT@HOST\""
        )
    options = table.get("options", {})
    timeout = float(table.get("timeout", default_timeout))
    if not timeout > 0:
        raise ConfigurationError(f"{where}: timeout must be positive, not {timeout!r}")
    fallback = fallback_verdict(table.get("fallback", default_fallback), where)
    if "remote" in table:
        from txmilt.remote import remote_filter

        return remote_filter(
            table["remote"], name=table.get("name", table["remote"]), timeout=timeout, fallback=fallback,
            dry_run=table.get("dry_run", False), **options,
        )
    cls = load_factory(table["class"])
    factory: Callable[[], IMilter] = functools.partial(cls, **options) if options else cls
    return FilterSpec(
        factory, name=table.get("name", table["class"]), timeout=timeout, fallback=fallback,
        dry_run=table.get("dry_run", False),
    )


def read_config(
    path: str, *, default_timeout: float | None = None, default_fallback: str | None = None
) -> DaemonConfig:
    """The configuration in a TOML file; ConfigurationError names the key at fault.

    ``default_timeout`` and ``default_fallback`` (from the command line) take
    the place of ``[daemon]``'s ``timeout`` and ``fallback``.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as e:
        raise ConfigurationError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"config file {path} is not valid TOML: {e}") from e
    return parse_config(data, path, default_timeout=default_timeout, default_fallback=default_fallback)


def parse_config(
    data: Mapping[str, Any],
    where: str = "config",
    *,
    default_timeout: float | None = None,
    default_fallback: str | None = None,
) -> DaemonConfig:
    """The configuration a parsed TOML document describes (it may name no filters; see check_config)."""
    unknown = set(data) - {"daemon", "filter"}
    if unknown:
        raise ConfigurationError(f"{where}: unknown table {sorted(unknown)[0]!r}; use [daemon] and [[filter]]")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigurationError(f"{where}: [daemon] must be a table")
    _check_keys(daemon, _DAEMON_KEYS, f"{where} [daemon]")
    if default_timeout is None:
        default_timeout = float(daemon.get("timeout", 25.0))
        if not default_timeout > 0:
            raise ConfigurationError(f"{where} [daemon]: timeout must be positive, not {default_timeout!r}")
    if default_fallback is None:
        default_fallback = daemon.get("fallback", "tempfail")
        fallback_verdict(default_fallback, f"{where} [daemon]")
    tables = data.get("filter", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ConfigurationError(f"{where}: filters are [[filter]] tables")
    listen = daemon.get("listen", [])
    if isinstance(listen, str):
        listen = [listen]
    if not all(isinstance(spec, str) for spec in listen):
        raise ConfigurationError(f"{where} [daemon]: listen = {listen!r} must be a list of strings")
    metrics = daemon.get("metrics")
    filters = tuple(
        filter_spec(table, f"{where} [[filter]] #{number}", default_timeout, default_fallback)
        for number, table in enumerate(tables, 1)
    )
    config = DaemonConfig(
        listen=tuple(to_strports(spec) for spec in listen),
        filters=filters,
        metrics=to_strports(metrics) if metrics else None,
        frame_limit=daemon.get("frame_limit", DEFAULT_FRAME_LIMIT),
        idle_timeout=float(daemon.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)),
        negotiation_timeout=float(daemon.get("negotiation_timeout", DEFAULT_NEGOTIATION_TIMEOUT)),
        max_connections=daemon.get("max_connections", DEFAULT_MAX_CONNECTIONS),
        max_headers=daemon.get("max_headers", DEFAULT_MAX_HEADERS),
        max_header_bytes=daemon.get("max_header_bytes", DEFAULT_MAX_HEADER_BYTES),
        max_body_size=daemon.get("max_body_size", DEFAULT_MAX_BODY_SIZE),
        body_spool_threshold=daemon.get("body_spool_threshold", DEFAULT_BODY_SPOOL_THRESHOLD),
        drain_timeout=float(daemon.get("drain_timeout", 30.0)),
        progress_interval=float(daemon.get("progress_interval", 10.0)),
        socket_group=daemon.get("socket_group"),
        default_timeout=default_timeout,
        default_fallback=default_fallback,
    )
    return check_config(config, require_filters=False)


def check_config(config: DaemonConfig, *, require_filters: bool = True) -> DaemonConfig:
    """The config with defaults filled in; ConfigurationError for values out of range.

    Every filter is created once, and every listen description parsed, so that
    mistakes show before anything listens.
    """
    if not 0 < config.frame_limit <= ABSOLUTE_FRAME_LIMIT:
        raise ConfigurationError(f"frame_limit {config.frame_limit} must be between 1 and {ABSOLUTE_FRAME_LIMIT}")
    for name in (
        "idle_timeout", "negotiation_timeout", "drain_timeout",
        "max_headers", "max_header_bytes", "max_body_size", "body_spool_threshold",
    ):
        if getattr(config, name) < 0:
            raise ConfigurationError(f"{name} must not be negative, not {getattr(config, name)!r}")
    for name in ("progress_interval", "default_timeout"):
        if not getattr(config, name) > 0:
            raise ConfigurationError(f"{name} must be positive, not {getattr(config, name)!r}")
    if config.max_connections < 1:
        raise ConfigurationError("max_connections must be at least 1")
    fallback_verdict(config.default_fallback, "default_fallback")
    if require_filters and not config.filters:
        raise ConfigurationError("no filters configured; give --filter module:Class or [[filter]] in the config file")
    verify_filters(config.filters)
    listen = config.listen or (DEFAULT_LISTEN,)
    for description in (*listen, *([config.metrics] if config.metrics else [])):
        check_strports(description)
    return replace(config, listen=listen)
