"""The daemon's configuration: a TOML file and command-line values, checked before anything listens.

Every daemon setting is one DaemonConfig field, declared once with its default,
its ``[daemon]`` key, its ``twistd milter`` option and help text, and whether
it is a MilterFactory keyword. parse_config, the options of tap.py and
makeService read them from ``SETTINGS``; none writes a default of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Literal, NamedTuple, TypeAlias

from txmilt.address import connect_address
from txmilt.chain import DEFAULT_BODY_SPOOL_THRESHOLD, DEFAULT_MAX_BODY_SIZE, FilterSpec, check_chain_order
from txmilt.codec import ABSOLUTE_FRAME_LIMIT, DEFAULT_FRAME_LIMIT
from txmilt.errors import ConfigurationError
from txmilt.filtertable import FALLBACKS as FALLBACKS
from txmilt.filtertable import SupervisedCommand as SupervisedCommand
from txmilt.filtertable import check_keys, positive, supervised_command
from txmilt.filtertable import fallback_verdict as fallback_verdict
from txmilt.filtertable import filter_spec as filter_spec
from txmilt.filtertable import load_factory as load_factory
from txmilt.listen import DEFAULT_SOCKET_MODE, check_strports, to_strports
from txmilt.protocol import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_NEGOTIATION_TIMEOUT,
    DEFAULT_PROGRESS_INTERVAL,
    VerifiedFilters,
)
from txmilt.session import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS

#: Where the daemon listens when nothing else is said.
DEFAULT_LISTEN = "tcp:8891:interface=127.0.0.1"

#: How a setting is written: a whole number, seconds, text, a listen address, a fallback name, a process count.
SettingKind: TypeAlias = Literal["count", "seconds", "text", "address", "fallback", "workers"]
#: Raises ConfigurationError, naming the setting by its label, for a value out of range.
RangeCheck: TypeAlias = Callable[[str, Any], None]

_TOML_TYPES: Final[Mapping[SettingKind, tuple[type, ...]]] = {
    "count": (int,), "seconds": (int, float), "text": (str,), "address": (str,), "fallback": (str,),
    "workers": (int, str),
}
#: The listen kinds a worker process can be handed (Twisted adopts a bound socket of these families).
WORKER_LISTEN_KINDS: Final = ("tcp", "tcp6", "unix", "systemd")


def cores() -> int:
    """How many cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _not_negative(label: str, value: float) -> None:
    if not value >= 0:
        raise ConfigurationError(f"{label} must not be negative, not {value!r}")


def _at_least_one(label: str, value: int) -> None:
    if value < 1:
        raise ConfigurationError(f"{label} must be at least 1")


def _workers(label: str, value: int | str) -> None:
    if isinstance(value, str) or value < 1:
        raise ConfigurationError(f'{label} must be a whole number of at least 1 or "auto", not {value!r}')


def _frame_limit(label: str, value: int) -> None:
    if not 0 < value <= ABSOLUTE_FRAME_LIMIT:
        raise ConfigurationError(f"{label} {value} must be between 1 and {ABSOLUTE_FRAME_LIMIT}")


@dataclass(frozen=True)
class _Declared:
    """What a DaemonConfig field's metadata says about it."""

    kind: SettingKind
    help: str
    key: str
    check: RangeCheck | None
    factory: bool


def _setting(
    default: Any, kind: SettingKind, help: str, *, key: str = "", check: RangeCheck | None = None,
    factory: bool = False,
) -> Any:
    """A DaemonConfig field: ``help`` may say ``{default}``; ``key`` is the [daemon] key if not the field's name."""
    return field(default=default, metadata={"setting": _Declared(kind, help, key, check, factory)})


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``twistd milter`` needs to run; each setting's default is written here only."""

    listen: tuple[str, ...] = ()
    filters: tuple[FilterSpec, ...] = ()
    #: External milters that remote filters with a ``command`` have the daemon run.
    supervised: tuple[SupervisedCommand, ...] = ()
    workers: int = _setting(
        1, "workers",
        "Processes serving the listen sockets, bound once by the daemon; each has its own limits (max"
        " connections and the rest); auto: one per core (default {default}).",
        check=_workers,
    )
    metrics: str | None = _setting(
        None, "address",
        "Serve Prometheus metrics here (e.g. tcp:9108:interface=127.0.0.1); needs prometheus_client"
        " (txmilt's 'metrics' extra).",
    )
    frame_limit: int = _setting(
        DEFAULT_FRAME_LIMIT, "count",
        "Largest packet payload accepted, in bytes; a larger packet closes its connection (default {default}).",
        check=_frame_limit, factory=True,
    )
    frame_timeout: float = _setting(
        DEFAULT_FRAME_TIMEOUT, "seconds",
        "Close a connection whose packet, once begun, is not complete within this many seconds, however it"
        " trickles in (default {default}; 0: no limit).",
        check=_not_negative, factory=True,
    )
    idle_timeout: float = _setting(
        DEFAULT_IDLE_TIMEOUT, "seconds", "Close a connection silent this many seconds (default {default}; 0: never).",
        check=_not_negative, factory=True,
    )
    negotiation_timeout: float = _setting(
        DEFAULT_NEGOTIATION_TIMEOUT, "seconds",
        "Close a connection that has not negotiated this many seconds after connecting (default {default}; 0: the"
        " idle timeout applies instead).",
        check=_not_negative, factory=True,
    )
    max_connections: int = _setting(
        DEFAULT_MAX_CONNECTIONS, "count", "Refuse (close at once) connections beyond this many (default {default}).",
        check=_at_least_one, factory=True,
    )
    max_headers: int = _setting(
        DEFAULT_MAX_HEADERS, "count",
        "Most headers per message; the message beyond it is answered 452 4.3.1 (default {default}; 0: no limit).",
        check=_not_negative, factory=True,
    )
    max_header_bytes: int = _setting(
        DEFAULT_MAX_HEADER_BYTES, "count",
        "Most header bytes per message; the message beyond it is answered 452 4.3.1 (default {default};"
        " 0: no limit).",
        check=_not_negative, factory=True,
    )
    max_body_size: int = _setting(
        DEFAULT_MAX_BODY_SIZE, "count",
        "Largest body a whole_body filter may buffer; beyond it the filter gets its fallback (default {default};"
        " 0: no limit).",
        check=_not_negative, factory=True,
    )
    body_spool_threshold: int = _setting(
        DEFAULT_BODY_SPOOL_THRESHOLD, "count",
        "Bytes of a buffered body kept in memory before spooling to a temporary file in $TMPDIR (default"
        " {default}; 0: always spool).",
        check=_not_negative, factory=True,
    )
    chain_order: str = _setting(
        "concurrent", "text",
        "How the filters take each command: concurrent (all at once; the first refusal in filter order answers)"
        " or sequential (one after another, stopping at the first refusal, exactly as Postfix's smtpd_milters)"
        " (default {default}).",
        check=lambda label, value: check_chain_order(value, label), factory=True,
    )
    drain_timeout: float = _setting(
        30.0, "seconds", "On SIGTERM, wait this long for open connections (default {default}).", check=_not_negative,
    )
    progress_interval: float = _setting(
        DEFAULT_PROGRESS_INTERVAL, "seconds",
        "Seconds between keep-alives at a slow end of message (default {default}).", check=positive, factory=True,
    )
    socket_group: str | None = _setting(
        None, "text",
        f"Group owning unix sockets (their mode comes from the description: default {DEFAULT_SOCKET_MODE};"
        " world-writable modes are refused).",
    )
    default_timeout: float = _setting(
        FilterSpec.timeout, "seconds",
        "Default per-filter deadline for each callback, in seconds; past it the filter gets its fallback"
        " (default {default}).",
        key="timeout", check=positive,
    )
    default_fallback: str = _setting(
        "tempfail", "fallback", f"Default verdict for a failing filter: {', '.join(FALLBACKS)} (default {{default}}).",
        key="fallback",
    )

    def factory_keywords(self) -> dict[str, Any]:
        """The MilterFactory keywords this configuration sets."""
        return {setting.name: getattr(self, setting.name) for setting in SETTINGS if setting.factory}


class Setting(NamedTuple):
    """One daemon setting: a DaemonConfig field, its [daemon] key, its option, its help and default."""

    name: str
    key: str
    option: str
    kind: SettingKind
    help: str
    check: RangeCheck | None
    factory: bool

    def value(self, raw: Any) -> Any:
        """The field value for a [daemon] or command-line value (seconds as float, addresses as strports)."""
        if self.kind == "seconds":
            return float(raw)
        if self.kind == "address":
            return to_strports(raw)
        if self.kind == "workers" and isinstance(raw, str) and raw.strip().lower() == "auto":
            return cores()
        return raw

    def check_value(self, value: Any, label: str, where: str = "") -> None:
        """ConfigurationError, naming ``label`` (after ``where``), unless ``value`` is in range."""
        if self.kind == "fallback":
            fallback_verdict(value, where or label)
        elif self.check is not None:
            self.check(f"{where}: {label}" if where else label, value)


def _shown(default: Any) -> str:
    return f"{default:g}" if isinstance(default, float) else str(default)


def _settings() -> tuple[Setting, ...]:
    found = []
    for item in fields(DaemonConfig):
        declared = item.metadata.get("setting")
        if isinstance(declared, _Declared):
            key = declared.key or item.name
            found.append(Setting(
                item.name, key, key.replace("_", "-"), declared.kind,
                declared.help.format(default=_shown(item.default)), declared.check, declared.factory,
            ))
    return tuple(found)


#: Every setting of DaemonConfig, in field order.
SETTINGS: Final = _settings()
def _read_text(path: str) -> str:
    """The text of a config file; ConfigurationError if it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read().decode("utf-8")
    except OSError as e:
        raise ConfigurationError(f"cannot read config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigurationError(f"config file {path} is not UTF-8 text: {e}") from e


def _parse_text(
    text: str, path: str, *, default_timeout: float | None = None, default_fallback: str | None = None
) -> DaemonConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"config file {path} is not valid TOML: {e}") from e
    return parse_config(data, path, default_timeout=default_timeout, default_fallback=default_fallback)


def read_config(
    path: str, *, default_timeout: float | None = None, default_fallback: str | None = None
) -> DaemonConfig:
    """The configuration in a TOML file; ConfigurationError names the key at fault.

    ``default_timeout`` and ``default_fallback`` (from the command line) take
    the place of ``[daemon]``'s ``timeout`` and ``fallback``.
    """
    return _parse_text(_read_text(path), path, default_timeout=default_timeout, default_fallback=default_fallback)


def parse_config(
    data: Mapping[str, Any],
    where: str = "config",
    *,
    default_timeout: float | None = None,
    default_fallback: str | None = None,
) -> DaemonConfig:
    """The configuration a parsed TOML document describes; ConfigurationError names the key at fault.

    It may name no filters, and they are not yet tried (see check_config).
    """
    unknown = set(data) - {"daemon", "filter"}
    if unknown:
        raise ConfigurationError(f"{where}: unknown table {sorted(unknown)[0]!r}; use [daemon] and [[filter]]")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigurationError(f"{where}: [daemon] must be a table")
    check_keys(daemon, {"listen": (list, str), **{s.key: _TOML_TYPES[s.kind] for s in SETTINGS}}, f"{where} [daemon]")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.key in daemon:
            values[setting.name] = value = setting.value(daemon[setting.key])
            setting.check_value(value, setting.key, f"{where} [daemon]")
    if default_timeout is not None:
        values["default_timeout"] = default_timeout
    if default_fallback is not None:
        values["default_fallback"] = default_fallback
    config = DaemonConfig(**values)
    tables = data.get("filter", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ConfigurationError(f"{where}: filters are [[filter]] tables")
    listen = daemon.get("listen", [])
    if isinstance(listen, str):
        listen = [listen]
    if not all(isinstance(spec, str) for spec in listen):
        raise ConfigurationError(f"{where} [daemon]: listen = {listen!r} must be a list of strings")
    filters = []
    supervised = []
    for number, table in enumerate(tables, 1):
        spec = filter_spec(table, f"{where} [[filter]] #{number}", config.default_timeout, config.default_fallback)
        filters.append(spec)
        command = supervised_command(table, f"{where} [[filter]] #{number}", spec.name)
        if command is not None:
            supervised.append(command)
    return replace(
        config, listen=tuple(to_strports(spec) for spec in listen) or (DEFAULT_LISTEN,), filters=tuple(filters),
        supervised=tuple(supervised),
    )


def check_config(config: DaemonConfig, *, check_listen: bool = True) -> DaemonConfig:
    """The config with defaults filled in; ConfigurationError for values out of range.

    Every filter is created once (its specs come back as VerifiedFilters, which
    neither this nor MilterFactory tries again), and every listen description
    parsed (unless ``check_listen`` is false: a worker is handed bound sockets),
    so that mistakes show before anything listens.
    """
    for setting in SETTINGS:
        setting.check_value(getattr(config, setting.name), setting.name)
    if not config.filters:
        raise ConfigurationError("no filters configured; give --filter module:Class or [[filter]] in the config file")
    filters = config.filters
    if not isinstance(filters, VerifiedFilters):
        filters = VerifiedFilters.verify(filters)
    listen = config.listen or (DEFAULT_LISTEN,)
    if config.workers > 1:
        for description in listen:
            if description.split(":", 1)[0].lower() not in WORKER_LISTEN_KINDS:
                raise ConfigurationError(
                    f"listen address {description!r} cannot be handed to worker processes; with workers, listen"
                    f" on {', '.join(WORKER_LISTEN_KINDS)} addresses"
                )
    for description in (*(listen if check_listen else ()), *([config.metrics] if config.metrics else [])):
        check_strports(description)
    _check_supervised(config.supervised)
    if config.metrics:
        _require_metrics()
    return replace(config, listen=listen, filters=filters)


def _check_supervised(commands: tuple[SupervisedCommand, ...]) -> None:
    """ConfigurationError for a program that cannot be found, or two programs for one address."""
    runs: dict[object, str] = {}
    for supervised in commands:
        same = connect_address(supervised.address) or supervised.address  # inet:8891@h is inet:h:8891
        if same in runs:
            raise ConfigurationError(
                f"filters {runs[same]} and {supervised.name} both run a command for"
                f" {supervised.address}; give the command to one of them"
            )
        runs[same] = supervised.name
        program = supervised.command[0]
        search = dict(supervised.env).get("PATH", os.environ.get("PATH", os.defpath))
        if shutil.which(program, path=search) is None:
            where = "is not an executable file" if os.sep in program else f"is not an executable in PATH ({search})"
            raise ConfigurationError(f"filter {supervised.name}: command {program!r} {where}")


def _require_metrics() -> None:
    """ConfigurationError, in one line saying what to install, if prometheus_client cannot be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "metrics need the prometheus_client package, which is not installed:"
            " pip install prometheus_client (txmilt's 'metrics' extra)"
        ) from None


@dataclass(frozen=True)
class ConfigSource:
    """What the daemon's configuration is built from: the config file's text and the command line.

    A reload reads the file again (``reread``); a worker process gets the very
    text the daemon checked (``to_json``), so both build the same configuration.
    """

    #: The config file, if one is given.
    path: str | None = None
    #: Its text as last read.
    text: str | None = None
    #: Setting values given on the command line, by DaemonConfig field name.
    options: Mapping[str, Any] = field(default_factory=dict)
    #: ``--filter`` paths, after the file's filters.
    filters: tuple[str, ...] = ()
    #: ``--listen`` descriptions, in place of the file's.
    listen: tuple[str, ...] = ()

    @property
    def origin(self) -> str:
        """Where the configuration comes from, for log lines: the file, or the command line."""
        return self.path if self.path is not None else "the command line"

    def reread(self) -> ConfigSource:
        """The source with the config file's current text; ConfigurationError if it cannot be read."""
        return self if self.path is None else replace(self, text=_read_text(self.path))

    def build(self, *, check_listen: bool = True) -> DaemonConfig:
        """The checked configuration (filters made once each); ConfigurationError names the key at fault.

        ``check_listen``: whether to check the listen addresses (a worker is handed bound sockets instead).
        """
        given = [setting for setting in SETTINGS if setting.name in self.options]
        overrides = {setting.name: setting.value(self.options[setting.name]) for setting in given}
        for setting in given:
            if setting.name in ("default_timeout", "default_fallback"):  # the file's filters are made with them
                setting.check_value(overrides[setting.name], f"--{setting.option}")
        config = DaemonConfig()
        if self.path is not None:
            text = self.text if self.text is not None else _read_text(self.path)
            config = _parse_text(
                text, self.path, default_timeout=overrides.get("default_timeout"),
                default_fallback=overrides.get("default_fallback"),
            )
        config = replace(config, **overrides)
        extra = tuple(
            filter_spec({"class": path}, f"--filter {path}", config.default_timeout, config.default_fallback)
            for path in self.filters
        )
        config = replace(config, filters=config.filters + extra, listen=self.listen or config.listen)
        return check_config(config, check_listen=check_listen)

    def to_json(self) -> str:
        """The source as JSON (command-line values are numbers and strings)."""
        return json.dumps({
            "path": self.path, "text": self.text, "options": dict(self.options), "filters": list(self.filters),
            "listen": list(self.listen),
        })

    @classmethod
    def from_json(cls, text: str) -> ConfigSource:
        """The source ``to_json`` wrote."""
        data = json.loads(text)
        return cls(data["path"], data["text"], data["options"], tuple(data["filters"]), tuple(data["listen"]))
