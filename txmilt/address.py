"""The libmilter/Postfix address grammar, shared by the listening and the connecting side.

======================  ================================================================
``inet:PORT@HOST``      libmilter's and Sendmail's form; HOST may be ``[ADDRESS]``
``inet:HOST:PORT``      Postfix's form; an IPv6 address goes in brackets: ``[::1]:8891``
``inet:PORT``           no host: every interface when listening, as libmilter does;
                        connecting needs a host
``inet6:...``           the same three forms for IPv6
``unix:/path``          a unix socket (``local:/path`` is the same); the path is absolute
======================  ================================================================

A ``unix:`` or ``local:`` address with a ``name=value`` option in it, and every
other kind, is not this grammar's: the caller reads it as a Twisted
description (strports when listening, a client description when connecting).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from txmilt.errors import ConfigurationError

Kind: TypeAlias = Literal["inet", "inet6", "unix"]

#: Examples shown when an address is not understood at all.
EXAMPLES: Final = "inet:8891@127.0.0.1, inet6:[::1]:8891 or unix:/run/txmilt/txmilt.sock"

_PORT = re.compile(r"[0-9]+")
_BRACKETED = re.compile(r"\[(?P<host>[^\[\]]*)\]:(?P<port>.*)")
_BAD_HOST_CHARACTERS = re.compile(r"[\s@/\[\]]")
_INET_KINDS: Final[dict[str, Kind]] = {"inet": "inet", "inet6": "inet6"}


@dataclass(frozen=True, slots=True)
class MilterAddress:
    """One address of the grammar: a TCP port with an optional host, or a unix socket path."""

    kind: Kind
    host: str | None = None  # inet, inet6: None means every interface
    port: int = 0  # inet, inet6
    path: str = ""  # unix


def split_kind(spec: str, what: str = "address") -> tuple[str, str]:
    """The lowercased kind (``local`` read as ``unix``) and the rest of ``spec``."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or not kind:
        raise ConfigurationError(f"{what} {spec!r} is not understood; use e.g. {EXAMPLES}")
    kind = kind.lower()
    return ("unix" if kind == "local" else kind), rest


def parse_address(spec: str, what: str = "address") -> MilterAddress | None:
    """The address ``spec`` names, or None if it is a Twisted description rather than this grammar.

    ``what`` starts every error message (e.g. "listen address").
    ConfigurationError for an address of the grammar that cannot work: a bad
    port, a missing host after ``@``, an unbracketed IPv6 address before a
    port, a relative socket path.
    """
    kind, rest = split_kind(spec, what)
    if kind == "unix":
        if "=" in rest:
            return None
        if not rest.startswith("/"):
            raise ConfigurationError(f"{what} {spec!r}: the socket path must be absolute, as in unix:/run/milter.sock")
        return MilterAddress("unix", path=rest)
    inet = _INET_KINDS.get(kind)
    if inet is None:
        return None
    host: str | None
    if "@" in rest:
        port_text, _, host = rest.partition("@")
        if not host:
            raise ConfigurationError(f"{what} {spec!r}: no host after '@'; write {kind}:PORT@HOST or {kind}:PORT")
    elif rest.startswith("["):
        bracketed = _BRACKETED.fullmatch(rest)
        if bracketed is None:
            raise ConfigurationError(f"{what} {spec!r}: expected {kind}:[ADDRESS]:PORT")
        host, port_text = f"[{bracketed['host']}]", bracketed["port"]
    elif ":" in rest:
        host, _, port_text = rest.rpartition(":")
        if ":" in host:
            raise ConfigurationError(
                f"{what} {spec!r}: put an IPv6 address in brackets before a port, as in {kind}:[::1]:8891,"
                f" or write {kind}:PORT@ADDRESS"
            )
    else:
        host, port_text = None, rest
    port = _port(port_text, spec, kind, what)
    host = _host(host, spec, what)
    if inet == "inet6" and host is not None and _ip_version(host) == 4:
        raise ConfigurationError(f"{what} {spec!r}: {host} is an IPv4 address; use inet:{port}@{host}")
    return MilterAddress(inet, host, port)


def connect_address(spec: str, what: str = "milter address") -> MilterAddress | None:
    """Like parse_address, for connecting: ConfigurationError if an inet address names no host."""
    address = parse_address(spec, what)
    if address is not None and address.kind != "unix" and address.host is None:
        raise ConfigurationError(
            f"{what} {spec!r} names no host, which connecting needs;"
            f" write {address.kind}:{address.port}@HOST, e.g. {address.kind}:{address.port}@127.0.0.1"
        )
    return address


def _port(text: str, spec: str, kind: str, what: str) -> int:
    if not _PORT.fullmatch(text):
        raise ConfigurationError(
            f"{what} {spec!r}: port {text!r} is not a number; expected {kind}:PORT@HOST or {kind}:HOST:PORT"
        )
    port = int(text)
    if not 0 < port < 65536:
        raise ConfigurationError(f"{what} {spec!r}: port {port} is out of range (1 to 65535)")
    return port


def _host(text: str | None, spec: str, what: str) -> str | None:
    """The host without brackets; a bracketed host must be an IP address."""
    if text is None:
        return None
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if _ip_version(text) is None:
            raise ConfigurationError(f"{what} {spec!r}: brackets hold an IP address, not {text!r}")
        return text
    if not text or _BAD_HOST_CHARACTERS.search(text):
        raise ConfigurationError(f"{what} {spec!r}: {text!r} is not a host name or address")
    if ":" in text and _ip_version(text) is None:
        raise ConfigurationError(f"{what} {spec!r}: {text!r} is not an IPv6 address")
    return text


def _ip_version(text: str) -> int | None:
    """4 or 6 for an IP address, None for anything else (a host name)."""
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None
