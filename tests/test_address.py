"""Tests for txmilt.address: one table of addresses, read alike by the listening and the connecting side."""

from __future__ import annotations

from typing import Final

from twisted.internet.endpoints import HostnameEndpoint, TCP6ServerEndpoint, UNIXClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from txmilt.address import MilterAddress, connect_address, parse_address
from txmilt.client import check_milter_address, milter_endpoint
from txmilt.errors import ConfigurationError
from txmilt.listen import to_strports

LOCALHOST: Final = MilterAddress("inet", "127.0.0.1", 8891)
IPV6_LOOPBACK: Final = MilterAddress("inet6", "::1", 8891)
SOCKET: Final = MilterAddress("unix", path="/run/txmilt/txmilt.sock")

#: Every form of the grammar and what it names. An inet address without a host
#: listens on every interface; connecting to one is refused (see the test).
ADDRESSES: Final[list[tuple[str, MilterAddress]]] = [
    ("inet:8891@127.0.0.1", LOCALHOST),
    ("inet:127.0.0.1:8891", LOCALHOST),
    ("inet:8891@[127.0.0.1]", LOCALHOST),
    ("inet:[127.0.0.1]:8891", LOCALHOST),
    ("INET:8891@127.0.0.1", LOCALHOST),
    ("inet:8891@localhost", MilterAddress("inet", "localhost", 8891)),
    ("inet:mx.example:25", MilterAddress("inet", "mx.example", 25)),
    ("inet:[::1]:8891", MilterAddress("inet", "::1", 8891)),
    ("inet:8891", MilterAddress("inet", None, 8891)),
    ("inet6:8891@::1", IPV6_LOOPBACK),
    ("inet6:8891@[::1]", IPV6_LOOPBACK),
    ("inet6:[::1]:8891", IPV6_LOOPBACK),
    ("inet6:localhost:8891", MilterAddress("inet6", "localhost", 8891)),
    ("inet6:8891", MilterAddress("inet6", None, 8891)),
    ("unix:/run/txmilt/txmilt.sock", SOCKET),
    ("local:/run/txmilt/txmilt.sock", SOCKET),
    ("LOCAL:/run/txmilt/txmilt.sock", SOCKET),
    ("unix:/run/a:b.sock", MilterAddress("unix", path="/run/a:b.sock")),
]

#: Addresses of the grammar that cannot work, and what the message says.
REFUSED: Final[list[tuple[str, str]]] = [
    ("inet:99999@127.0.0.1", "port 99999 is out of range (1 to 65535)"),
    ("inet:0@127.0.0.1", "port 0 is out of range"),
    ("inet:127.0.0.1:70000", "port 70000 is out of range"),
    ("inet:smtp@127.0.0.1", "port 'smtp' is not a number; expected inet:PORT@HOST or inet:HOST:PORT"),
    ("inet:-1@127.0.0.1", "port '-1' is not a number"),
    ("inet:@127.0.0.1", "port '' is not a number"),
    ("inet:8891@", "no host after '@'"),
    ("inet:", "is not understood; use e.g. inet:8891@127.0.0.1"),
    ("8891", "is not understood"),
    ("inet6:::1:8891", "put an IPv6 address in brackets before a port, as in inet6:[::1]:8891"),
    ("inet6:[::1]8891", "expected inet6:[ADDRESS]:PORT"),
    ("inet6:8891@127.0.0.1", "127.0.0.1 is an IPv4 address; use inet:8891@127.0.0.1"),
    ("inet:[mx.example]:8891", "brackets hold an IP address, not 'mx.example'"),
    ("inet:8891@mx example", "'mx example' is not a host name or address"),
    ("inet:8891@fe80::zz", "'fe80::zz' is not an IPv6 address"),
    ("unix:run/txmilt.sock", "the socket path must be absolute"),
    ("local:txmilt.sock", "the socket path must be absolute"),
]


def listened(spec: str) -> MilterAddress:
    """What the listening side does with ``spec``: the address a server endpoint is bound to."""
    reactor = MemoryReactorClock()
    endpoint = serverFromString(reactor, to_strports(spec))
    endpoint.listen(Factory.forProtocol(Protocol))
    if reactor.unixServers:
        return MilterAddress("unix", path=reactor.unixServers[0][0])
    ((port, _, _, interface),) = reactor.tcpServers
    if isinstance(endpoint, TCP6ServerEndpoint):
        return MilterAddress("inet6", None if interface == "::" else interface, port)
    return MilterAddress("inet", interface or None, port)


def connected(spec: str) -> tuple[str | None, int] | str:
    """What the connecting side does with ``spec``: (host, port) or a unix socket path."""
    reactor = MemoryReactorClock()
    endpoint = milter_endpoint(spec, reactor)
    if isinstance(endpoint, UNIXClientEndpoint):
        endpoint.connect(Factory.forProtocol(Protocol))
        ((path, *_),) = reactor.unixClients
        return str(path)
    assert isinstance(endpoint, HostnameEndpoint)
    return endpoint._hostText, endpoint._port


class AddressTableTests(SynchronousTestCase):
    """Every row is read the same by parse_address, the listening side and the connecting side."""

    def test_grammar(self) -> None:
        """parse_address gives each row's address."""
        for spec, expected in ADDRESSES:
            self.assertEqual(parse_address(spec), expected, spec)

    def test_listen(self) -> None:
        """The listening side binds to each row's address (no host: every interface)."""
        for spec, expected in ADDRESSES:
            self.assertEqual(listened(spec), expected, spec)

    def test_connect(self) -> None:
        """The connecting side dials each row's address; a row without a host is refused, saying so."""
        for spec, expected in ADDRESSES:
            if expected.kind == "unix":
                self.assertEqual(connected(spec), expected.path, spec)
            elif expected.host is None:
                message = str(self.assertRaises(ConfigurationError, milter_endpoint, spec, MemoryReactorClock()))
                self.assertIn(f"milter address {spec!r} names no host, which connecting needs", message)
                self.assertIn(f"{expected.kind}:{expected.port}@127.0.0.1", message)
                self.assertRaises(ConfigurationError, check_milter_address, spec)
            else:
                self.assertEqual(connected(spec), (expected.host, expected.port), spec)
                check_milter_address(spec)

    def test_refused_alike(self) -> None:
        """An address that cannot work is refused by both sides with the same reason."""
        for spec, reason in REFUSED:
            self.assertRaises(ConfigurationError, parse_address, spec)
            listen = str(self.assertRaises(ConfigurationError, to_strports, spec))
            connect = str(self.assertRaises(ConfigurationError, milter_endpoint, spec, MemoryReactorClock()))
            self.assertIn(f"listen address {spec!r}", listen)
            self.assertIn(f"milter address {spec!r}", connect)
            self.assertIn(reason, listen, spec)
            self.assertIn(reason, connect, spec)


class TwistedDescriptionTests(SynchronousTestCase):
    """Addresses outside the grammar are left to Twisted's parsers."""

    def test_not_the_grammar(self) -> None:
        """Other kinds, and unix addresses with options, are no address of the grammar."""
        for spec in ("tcp:8891", "systemd:domain=INET:index=0", "unix:/run/m.sock:mode=600", "unix:path=/run/m.sock"):
            self.assertIsNone(parse_address(spec), spec)
            self.assertIsNone(connect_address(spec), spec)

    def test_local_with_options(self) -> None:
        """local: with options is read as Twisted's unix: on both sides."""
        self.assertEqual(to_strports("local:/run/m.sock:mode=600"), "unix:/run/m.sock:mode=600")
        endpoint = milter_endpoint("local:/run/m.sock:timeout=3", MemoryReactorClock())
        self.assertIsInstance(endpoint, UNIXClientEndpoint)
