"""Tests for txmilt.mta: the MTAs' default macros and how they apply modifications."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txmilt.messages import (
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    InsertHeader,
    MacroStage,
    Negotiate,
    Quarantine,
    ReplaceBody,
)
from txmilt.mta import DEFAULT_MACROS, MTA, Message, apply_modifications, default_macros, mta_of_version, possible_mtas
from txmilt.mta import union_of_names as union


class DefaultMacroTests(SynchronousTestCase):
    def test_version_six_could_be_either(self) -> None:
        """A version 6 offer fits Postfix and Sendmail; a lower one only Postfix."""
        self.assertEqual(possible_mtas(Negotiate(6)), (MTA.POSTFIX, MTA.SENDMAIL))
        self.assertEqual(possible_mtas(Negotiate(2)), (MTA.POSTFIX,))

    def test_union_of_both_mtas(self) -> None:
        """Without knowing the MTA, each stage's list holds both MTAs' defaults, once each."""
        merged = default_macros(Negotiate(6))
        for mta in MTA:
            for stage, names in DEFAULT_MACROS[mta].items():
                self.assertTrue(set(names) <= set(merged[stage]), (mta, stage))
        self.assertEqual(merged[MacroStage.CONNECT],
                         ("j", "{daemon_name}", "{daemon_addr}", "v", "_", "{if_name}", "{if_addr}"))
        self.assertEqual(merged[MacroStage.END_OF_MESSAGE], ("i", "{msg_id}"))

    def test_postfix_only(self) -> None:
        """An offer only Postfix makes gets Postfix's lists."""
        self.assertEqual(default_macros(Negotiate(4)), dict(DEFAULT_MACROS[MTA.POSTFIX]))

    def test_union_treats_braces_as_one_name(self) -> None:
        """``i`` and ``{i}`` are one macro; the first spelling is kept."""
        self.assertEqual(union(("i", "{j}"), ("{i}", "j", "k")), ("i", "{j}", "k"))

    def test_version_macro(self) -> None:
        """The ``v`` macro tells Postfix from Sendmail."""
        self.assertIs(mta_of_version("Postfix 3.7.11"), MTA.POSTFIX)
        self.assertIs(mta_of_version("8.17.1.9"), MTA.SENDMAIL)
        self.assertIsNone(mta_of_version(None))
        self.assertIsNone(mta_of_version("Exim"))


class ApplyTests(SynchronousTestCase):
    def message(self) -> Message:
        return Message(
            [("From", "a@example.com"), ("Subject", "one"), ("Subject", "two")], b"old\r\n",
            "<a@example.com>", (), [("<b@example.net>", ()), ("<c@example.net>", ())],
        )

    def test_headers(self) -> None:
        """Add appends, insert counts the hidden Received header, change is per name, empty deletes."""
        message = self.message()
        apply_modifications(message, [
            AddHeader("X-Last", "z"),
            InsertHeader(0, "X-Top", "t"),       # above the MTA's own Received:
            InsertHeader(1, "X-Second", "s"),    # right below it: still the first visible header
            ChangeHeader(2, "subject", "TWO"),
            ChangeHeader(1, "From", ""),
            ChangeHeader(3, "Subject", "three"),  # missing: appended
            ChangeHeader(5, "X-None", ""),        # missing and empty: nothing
        ])
        self.assertEqual(message.headers, [
            ("X-Top", "t"), ("X-Second", "s"), ("Subject", "one"), ("subject", "TWO"), ("X-Last", "z"),
            ("Subject", "three"),
        ])

    def test_envelope_body_quarantine(self) -> None:
        """Sender, recipients, body (first packet replaces, later ones append) and quarantine."""
        message = self.message()
        apply_modifications(message, [
            ChangeFrom("<new@example.com>", ("RET=HDRS",)),
            AddRecipient("<d@example.org>", ("NOTIFY=NEVER",)),
            DeleteRecipient("b@example.net"),
            ReplaceBody(b"new "), ReplaceBody(b"body\r\n"),
            Quarantine("held"),
        ])
        self.assertEqual((message.sender, message.sender_args), ("<new@example.com>", ("RET=HDRS",)))
        self.assertEqual(message.recipients, [("<c@example.net>", ()), ("<d@example.org>", ("NOTIFY=NEVER",))])
        self.assertEqual(message.body, b"new body\r\n")
        self.assertEqual(message.quarantined, "held")

    def test_value_form(self) -> None:
        """Values pass through the given function (e.g. to drop the leading space)."""
        message = self.message()
        apply_modifications(message, [AddHeader("X-A", " spaced")], lambda v: v.lstrip(" "))
        self.assertEqual(message.headers[-1], ("X-A", "spaced"))


class PlacementTests(SynchronousTestCase):
    def test_sendmail_puts_a_known_name_first(self) -> None:
        """Sendmail puts a header added under a name already present before the first of that name."""
        for mta, expected in (
            (MTA.POSTFIX, [("Received", "a"), ("Subject", "s"), ("Received", "b"), ("X-New", "n"), ("Received", "c")]),
            (MTA.SENDMAIL, [("Received", "c"), ("Received", "a"), ("Subject", "s"), ("Received", "b"), ("X-New", "n")]),
        ):
            message = Message([("Received", "a"), ("Subject", "s"), ("Received", "b")])
            apply_modifications(message, [AddHeader("X-New", "n"), AddHeader("received", "c")], mta=mta)
            self.assertEqual(message.headers, [
                ("received" if value == "c" else name, value) for name, value in expected
            ], mta)

    def test_sendmail_change_at_a_missing_occurrence(self) -> None:
        """A change beyond the last occurrence adds the header, where each MTA adds one."""
        for mta, expected in ((MTA.POSTFIX, ["Subject: one", "To: t", "Subject: two"]),
                              (MTA.SENDMAIL, ["Subject: two", "Subject: one", "To: t"])):
            message = Message([("Subject", "one"), ("To", "t")])
            apply_modifications(message, [ChangeHeader(2, "Subject", "two")], mta=mta)
            self.assertEqual([f"{n}: {v}" for n, v in message.headers], expected, mta)
