"""``when``: filters that apply only to some clients, authenticated users, or sender domains."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txmilt.chain import FilterSpec
from txmilt.conditions import When, client_address, sender_domain
from txmilt.config import parse_config
from txmilt.errors import ConfigurationError
from txmilt.messages import Accept, Connect, Family, MacroStage, Reject
from txmilt.protocol import MilterFactory
from txmilt.testing import POSTFIX, FakeMTA, RecordingMilter

MESSAGE: tuple[Any, ...] = (["<b@example.net>"], [("Subject", "s")], b"body\r\n")


class Observer:
    """Counts skips (the rest of the chain observer is not needed here)."""

    def __init__(self) -> None:
        self.skips: list[tuple[str, str]] = []

    def verdict(self, *args: Any) -> None:
        pass

    def change(self, *args: Any) -> None:
        pass

    def latency(self, *args: Any) -> None:
        pass

    def failure(self, *args: Any) -> None:
        pass

    def skipped(self, filter_name: str, reason: str) -> None:
        self.skips.append((filter_name, reason))


def mta_for(spec: FilterSpec, observer: Observer | None = None, **macros: str | None) -> FakeMTA:
    return FakeMTA(MilterFactory([spec], Clock(), observer=observer), macros=macros)


class ParseTests(SynchronousTestCase):
    def test_every_key(self) -> None:
        """Networks (IPv4, IPv6, negated), a boolean and domain patterns parse."""
        when = When.parse({
            "client": ["10.0.0.0/8", "!10.9.0.0/16", "2001:db8::/32", "192.0.2.7"],
            "authenticated": False, "sender_domain": ["example.com", "*.EXAMPLE.org", "!spam.example.com"],
        }, "here")
        assert when.client is not None and when.sender_domain is not None
        self.assertEqual(len(when.client.include), 3)
        self.assertEqual(len(when.client.exclude), 1)
        self.assertEqual(when.sender_domain.include, ("example.com", "*.example.org"))
        self.assertTrue(when.connection_level and when.message_level)

    def test_errors(self) -> None:
        """Unknown keys, bad networks, bad patterns and wrong types name the problem."""
        for table, words in (
            ({"clients": ["10.0.0.0/8"]}, ("unknown when key 'clients'", "client, authenticated")),
            ({"client": ["10.0.0.0/33"]}, ("'10.0.0.0/33'", "CIDR")),
            ({"client": "10.0.0.0/8"}, ("when.client", "list")),
            ({"client": []}, ("when.client", "non-empty")),
            ({"authenticated": "yes"}, ("when.authenticated", "true or false")),
            ({"sender_domain": ["a@b.example"]}, ("'a@b.example'", "domain pattern")),
            ({"sender_domain": ["!"]}, ("when.sender_domain",)),
        ):
            error = self.assertRaises(ConfigurationError, When.parse, table, "filter x")
            for word in words:
                self.assertIn(word, str(error), table)

    def test_config_file(self) -> None:
        """A [[filter]] when table is checked before anything listens, with the filter named."""
        config = parse_config({"filter": [{
            "class": "txmilt.testing:RecordingMilter", "when": {"authenticated": True},
        }]})
        self.assertEqual(config.filters[0].conditions, When(authenticated=True))
        error = self.assertRaises(ConfigurationError, parse_config, {"filter": [{
            "class": "txmilt.testing:RecordingMilter", "when": {"client": ["nope"]},
        }]}, "milter.toml")
        self.assertIn("milter.toml [[filter]] #1: when.client", str(error))

    def test_spec_takes_a_mapping(self) -> None:
        """FilterSpec(when=...) takes the same table as the config file."""
        spec = FilterSpec(RecordingMilter, when={"sender_domain": ["example.com"]})
        self.assertEqual(spec.conditions, When(sender_domain=When.parse({"sender_domain": ["example.com"]},
                                                                         "x").sender_domain))


class MatchTests(SynchronousTestCase):
    def test_client_addresses(self) -> None:
        """IPv4, IPv6 (also Sendmail's IPv6: spelling), IPv4-mapped; unix and unknown clients have none."""
        when = When.parse({"client": ["192.0.2.0/24", "2001:db8::/32", "!192.0.2.66"]}, "x")
        for family, address, fails in (
            (Family.INET, "192.0.2.10", False),
            (Family.INET, "192.0.2.66", True),
            (Family.INET, "198.51.100.1", True),
            (Family.INET6, "2001:db8::1", False),
            (Family.INET6, "IPv6:2001:db8::1", False),
            (Family.INET6, "::ffff:192.0.2.10", False),
            (Family.INET6, "2001:db9::1", True),
            (Family.UNIX, "/var/run/client", True),
            (Family.UNKNOWN, "", True),
        ):
            command = Connect("client", family, 25, address)
            self.assertEqual(when.connection_fails(command) is not None, fails, (family, address))

    def test_only_exclusions(self) -> None:
        """With only ! rules, everything else passes, unix clients and the null sender included."""
        when = When.parse({"client": ["!127.0.0.0/8"], "sender_domain": ["!example.com"]}, "x")
        self.assertIsNone(when.connection_fails(Connect("c", Family.UNIX, 0, "/sock")))
        self.assertIsNotNone(when.connection_fails(Connect("c", Family.INET, 1, "127.0.0.1")))
        self.assertIsNone(when.message_fails(None, "<>"))
        self.assertEqual(when.message_fails(None, "<a@Example.COM>"), "sender_domain")

    def test_sender_domains(self) -> None:
        """Patterns match case-insensitively and in IDNA form; the null sender has no domain."""
        when = When.parse({"sender_domain": ["*.example.org", "bücher.example"]}, "x")
        self.assertIsNone(when.message_fails(None, "<a@mail.EXAMPLE.org>"))
        self.assertIsNone(when.message_fails(None, "<a@xn--bcher-kva.example>"))
        self.assertIsNone(when.message_fails(None, "a@BÜCHER.example"))
        self.assertEqual(when.message_fails(None, "<a@example.org>"), "sender_domain")
        self.assertEqual(when.message_fails(None, "<>"), "sender_domain")
        self.assertIsNone(sender_domain("<>"))
        self.assertEqual(sender_domain("<User@Bücher.Example.>"), "xn--bcher-kva.example")

    def test_authenticated(self) -> None:
        """authenticated compares against whether {auth_authen} has a value."""
        self.assertIsNone(When(authenticated=True).message_fails("alice", "<a@x>"))
        self.assertEqual(When(authenticated=True).message_fails("", "<a@x>"), "authenticated")
        self.assertIsNone(When(authenticated=False).message_fails(None, "<a@x>"))

    def test_client_address_helper(self) -> None:
        """client_address reads CONNECT's address."""
        self.assertEqual(str(client_address(Connect("c", Family.INET6, 1, "IPv6:::1"))), "::1")


class ChainTests(SynchronousTestCase):
    def test_client_skips_the_connection(self) -> None:
        """A filter whose client rule fails sees nothing of the connection, as if it had accepted at CONNECT."""
        refuser = RecordingMilter({"connect": Reject(), "rcpt_to": Reject()})
        observer = Observer()
        mta = mta_for(FilterSpec(lambda: refuser, name="r", when={"client": ["10.0.0.0/8"]}), observer)
        result = mta.message("<a@example.com>", *MESSAGE)
        self.assertTrue(result.delivered)
        self.assertEqual(result.steps[1].verdict, Accept())  # nobody left to filter: the MTA is told at CONNECT
        self.assertEqual(refuser.names, ["close"])  # only the end of the connection, as for every instance
        self.assertEqual(observer.skips, [("r", "client")])

    def test_client_rule_negotiates_connect(self) -> None:
        """The chain asks for CONNECT to check a client rule, though no filter reads it."""
        mta = mta_for(FilterSpec(RecordingMilter, when={"client": ["10.0.0.0/8"]}))
        mta.negotiate()
        assert mta.negotiated is not None
        self.assertFalse(mta.negotiated.protocol & 0x1)  # NO_CONNECT not asked for

    def test_sender_domain_per_message(self) -> None:
        """A message-level rule leaves the filter out of that message only; it returns for the next."""
        recorder = RecordingMilter({"end_of_message": Reject()})
        observer = Observer()
        mta = mta_for(FilterSpec(lambda: recorder, name="r", when={"sender_domain": ["example.com"]}), observer)
        self.assertTrue(mta.message("<a@other.example>", *MESSAGE).delivered)
        self.assertEqual(mta.message("<a@example.com>", *MESSAGE).verdict, Reject())
        self.assertTrue(mta.message("<>", *MESSAGE).delivered)
        self.assertEqual(recorder.names.count("mail_from"), 1)
        self.assertEqual(recorder.names.count("reset"), 1)  # only the message it took part in ended for it
        self.assertEqual(observer.skips, [("r", "sender_domain"), ("r", "sender_domain")])

    def test_authenticated(self) -> None:
        """authenticated reads {auth_authen}, which the chain asks for at MAIL."""
        for authen, delivered in (("alice", False), (None, True)):
            mta = mta_for(
                FilterSpec(lambda: RecordingMilter({"rcpt_to": Reject()}), when={"authenticated": True}),
                auth_authen=authen,
            )
            mta.negotiate()
            assert mta.negotiated is not None
            self.assertIn("{auth_authen}", mta.negotiated.macros[MacroStage.MAIL])
            result = mta.message("<a@example.com>", *MESSAGE)
            self.assertEqual(result.delivered, delivered, authen)

    def test_others_unaffected(self) -> None:
        """Filters without when go on as usual beside a skipped one."""
        skipped = RecordingMilter()
        other = RecordingMilter({"end_of_message": Reject()})
        mta = FakeMTA(MilterFactory([
            FilterSpec(lambda: skipped, when={"sender_domain": ["example.com"]}), lambda: other,
        ], Clock()), profile=POSTFIX)
        self.assertEqual(mta.message("<a@elsewhere.example>", *MESSAGE).verdict, Reject())
        self.assertNotIn("mail_from", skipped.names)
        self.assertIn("end_of_message", other.names)
