"""Where a filter applies: milter-manager's applicable conditions, as a filter's ``when`` table.

``when = { client = ["10.0.0.0/8", "!10.9.0.0/16"], authenticated = false,
sender_domain = ["example.com", "*.example.org"] }``: every key given must hold
for the filter to take part. ``client`` is checked at CONNECT (a filter left
out there is out for the connection); ``authenticated`` and ``sender_domain``
at MAIL (out for that message only). Pure functions, no Twisted.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from txmilt.errors import ConfigurationError
from txmilt.messages import Connect, Family, MailFrom

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The keys a ``when`` table may have.
KEYS = ("client", "authenticated", "sender_domain")


@dataclass(frozen=True)
class Rules:
    """Things to match, each possibly negated (``!``).

    A value matches if some plain rule (when there are any) and no negated rule match it.
    """

    include: tuple[Any, ...] = ()
    exclude: tuple[Any, ...] = ()


@dataclass(frozen=True)
class When:
    """A filter's applicable conditions; ``None``/empty keys always hold."""

    client: Rules | None = None
    authenticated: bool | None = None
    sender_domain: Rules | None = None

    @classmethod
    def parse(cls, table: Mapping[str, Any], where: str) -> When:
        """The conditions a ``when`` table states; ConfigurationError names what is wrong."""
        if not isinstance(table, Mapping):
            raise ConfigurationError(f"{where}: when must be a table such as {{ authenticated = false }}")
        unknown = sorted(set(table) - set(KEYS))
        if unknown:
            raise ConfigurationError(f"{where}: unknown when key {unknown[0]!r}; known keys are {', '.join(KEYS)}")
        authenticated = table.get("authenticated")
        if authenticated is not None and not isinstance(authenticated, bool):
            raise ConfigurationError(f"{where}: when.authenticated must be true or false, not {authenticated!r}")
        return cls(
            _rules(table["client"], _network, f"{where}: when.client") if "client" in table else None,
            authenticated,
            _rules(table["sender_domain"], _pattern, f"{where}: when.sender_domain")
            if "sender_domain" in table else None,
        )

    @property
    def connection_level(self) -> bool:
        """Whether something is checked at CONNECT."""
        return self.client is not None

    @property
    def message_level(self) -> bool:
        """Whether something is checked at MAIL."""
        return self.authenticated is not None or self.sender_domain is not None

    def connection_fails(self, command: Connect) -> str | None:
        """Why the SMTP client makes the filter sit out the connection (the key that failed), else None."""
        if self.client is not None and not _matches(self.client, client_address(command), _in_network):
            return "client"
        return None

    def message_fails(self, auth_authen: str | None, sender: str) -> str | None:
        """Why the message leaves the filter out (the key that failed), else None.

        ``auth_authen`` is the ``{auth_authen}`` macro (set for an authenticated
        client); ``sender`` the MAIL FROM address as sent.
        """
        if self.authenticated is not None and bool(auth_authen) != self.authenticated:
            return "authenticated"
        if self.sender_domain is not None and not _matches(
            self.sender_domain, sender_domain(sender), fnmatch.fnmatchcase
        ):
            return "sender_domain"
        return None


def _rules(values: Any, parse: Any, where: str) -> Rules:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ConfigurationError(f"{where} must be a non-empty list of strings")
    include: list[Any] = []
    exclude: list[Any] = []
    for value in values:
        if not isinstance(value, str) or not value.lstrip("!").strip():
            raise ConfigurationError(f"{where}: {value!r} is not a non-empty string")
        negated = value.startswith("!")
        (exclude if negated else include).append(parse(value[1:] if negated else value, where))
    return Rules(tuple(include), tuple(exclude))


def _network(text: str, where: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigurationError(
            f"{where}: {text!r} is not a network in CIDR form (192.0.2.0/24, 2001:db8::/32, or one address)"
        ) from None


def _pattern(text: str, where: str) -> str:
    pattern = _ascii_domain(text.strip())
    if not pattern or any(c.isspace() or c == "@" for c in pattern):
        raise ConfigurationError(f"{where}: {text!r} is not a domain pattern such as example.com or *.example.org")
    return pattern


def _matches(rules: Rules, value: Any, test: Any) -> bool:
    """Whether ``value`` (None matches nothing) passes ``rules``."""
    hit = value is not None and any(test(value, rule) for rule in rules.include)
    if rules.include and not hit:
        return False
    return value is None or not any(test(value, rule) for rule in rules.exclude)


def _in_network(address: ipaddress.IPv4Address | ipaddress.IPv6Address, network: Network) -> bool:
    return address.version == network.version and address in network


def client_address(command: Connect) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The SMTP client's IP address from CONNECT; None for a unix-socket or unknown client."""
    if command.family not in (Family.INET, Family.INET6):
        return None
    text = command.address
    if text[:5].lower() == "ipv6:":
        text = text[5:]  # Sendmail's spelling
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def sender_domain(sender: str) -> str | None:
    """The domain of a MAIL FROM address, lower-case and in ASCII (IDNA); None for the null sender."""
    return _ascii_domain(MailFrom(sender).domain.rstrip(".")) or None


def _ascii_domain(domain: str) -> str:
    """``domain`` lower-case, with non-ASCII labels in their IDNA (xn--) form; wildcards kept."""
    labels = []
    for label in domain.lower().split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(label.encode("idna").decode("ascii"))
        except UnicodeError:
            labels.append(label)
    return ".".join(labels)
