"""txmilt-check's command line."""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from txmilt.check.options import UsageError, parse_options
from txmilt.messages import Connect, Family
from txmilt.mta import POSTFIX, SENDMAIL


class OptionTests(SynchronousTestCase):
    """parse_options reads milters, the message and the options, and refuses what makes no sense."""

    def refused(self, *argv: str) -> str:
        with self.assertRaises(UsageError) as caught:
            parse_options(argv)
        return str(caught.exception)

    def test_defaults(self) -> None:
        """One milter, no message: Postfix, the default client, no load."""
        options = parse_options(["inet:8891@127.0.0.1"])
        self.assertEqual((options.milters, options.message_file), (("inet:8891@127.0.0.1",), None))
        self.assertEqual(options.profile, POSTFIX)
        self.assertEqual(options.client, Connect("mail.example.com", Family.INET, 54321, "192.0.2.10"))
        self.assertEqual((options.helo, options.timeout, options.load), ("mail.example.com", 30.0, False))

    def test_message_comes_last(self) -> None:
        """The last argument is the message when it is -, has no colon, or is a file."""
        self.assertEqual(parse_options(["inet:1@a", "inet:2@b", "-"]).milters, ("inet:1@a", "inet:2@b"))
        self.assertEqual(parse_options(["inet:1@a", "mail.eml"]).message_file, "mail.eml")
        fd, path = tempfile.mkstemp(prefix="odd:name")
        os.close(fd)
        self.addCleanup(os.unlink, path)
        self.assertEqual(parse_options(["unix:/run/milter.sock", path]).message_file, path)
        self.assertEqual(parse_options(["unix:/run/milter.sock"]).milters, ("unix:/run/milter.sock",))

    def test_milter_needed(self) -> None:
        """A message alone, or a message before a milter, is refused."""
        self.assertIn("give at least one milter address", self.refused("-"))
        self.assertIn("'mail.eml' is not a milter address", self.refused("mail.eml"))
        self.assertIn("'mail.eml' is not a milter address", self.refused("mail.eml", "inet:1@a", "-"))
        self.assertIn("the following arguments are required", self.refused())

    def test_mta_options(self) -> None:
        """Profile, macros, client, HELO, envelope and timeout."""
        options = parse_options([
            "--profile", "sendmail", "--macro", "{daemon_name}=edge", "--macro", "v=",
            "--client-address", "2001:db8::1",
            "--client-name", "client.example", "--from", "a@example.org", "--to", "b@example.net", "--to", "c@x",
            "--timeout", "2.5", "--json", "inet:1@a",
        ])
        self.assertEqual(options.profile, SENDMAIL)
        self.assertEqual(options.macros, {"{daemon_name}": "edge", "v": None})
        self.assertEqual(options.client, Connect("client.example", Family.INET6, 54321, "2001:db8::1"))
        self.assertEqual((options.helo, options.sender, options.recipients), ("client.example", "a@example.org",
                                                                              ("b@example.net", "c@x")))
        self.assertEqual((options.timeout, options.json), (2.5, True))
        self.assertEqual(parse_options(["--helo", "h.example", "inet:1@a"]).helo, "h.example")

    def test_bad_values(self) -> None:
        """Bad values are refused with a message saying what is wrong."""
        self.assertIn(
            "'nowhere' is not an IPv4 or IPv6 address", self.refused("--client-address", "nowhere", "inet:1@a")
        )
        self.assertIn("expected NAME=VALUE", self.refused("--macro", "j", "inet:1@a"))
        self.assertIn("0 is not above 0", self.refused("--timeout", "0", "inet:1@a"))
        self.assertIn("'x' is not a number", self.refused("--count", "x", "inet:1@a"))
        self.assertIn("invalid choice: 'exim'", self.refused("--profile", "exim", "inet:1@a"))

    def test_load(self) -> None:
        """--count turns the load mode on; its other options need it."""
        options = parse_options(["--count", "100", "--concurrency", "8", "--messages-per-connection", "5", "inet:1@a"])
        self.assertEqual((options.load, options.count, options.concurrency, options.messages_per_connection),
                         (True, 100, 8, 5))
        self.assertEqual((parse_options(["--count", "3", "inet:1@a"]).concurrency), 1)
        self.assertIn("need --count", self.refused("--concurrency", "2", "inet:1@a"))
