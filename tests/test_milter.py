"""Tests for the filter API: the Milter base class, ``overrides`` and the Changes recorder."""

from __future__ import annotations

import traceback
from typing import Any, ClassVar

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from txmilt.errors import ArgumentTypeError, LocalProtocolError
from txmilt.interfaces import IMilter
from txmilt.messages import (
    ALL_ACTIONS,
    Action,
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Data,
    DeleteRecipient,
    EndOfHeaders,
    Header,
    Helo,
    InsertHeader,
    MailFrom,
    RcptTo,
    Reject,
    Unknown,
)
from txmilt.milter import CALLBACKS, Changes, Milter, Result, overrides
from txmilt.session import EMPTY_MACROS


class HeaderReader(Milter):
    """Reads headers only."""

    def header(self, command: Header) -> Result:
        return None


class StrictHeaderReader(HeaderReader):
    """Inherits the header override and adds an end-of-headers one."""

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        return Reject()


class Borrower(Milter):
    """Binds the base class's own function under the callback's name: no override."""

    header = Milter.header


class Declaring(Milter):
    """Declares actions, macros and options as class attributes."""

    actions = Action.ADD_HEADERS | Action.CHANGE_FROM
    leading_space = True
    rejected_recipients = True
    no_reply = frozenset({"header"})

    def header(self, command: Header) -> Result:
        return None


@implementer(IMilter)
class Bare:
    """Provides IMilter without deriving from Milter."""

    actions = Action.NONE
    macro_requests: ClassVar[dict[int, tuple[str, ...]]] = {}
    leading_space = False
    rejected_recipients = False
    no_reply: frozenset[str] = frozenset()
    macros = EMPTY_MACROS

    def connect(self, command: Connect) -> Result:
        return None

    def helo(self, command: Helo) -> Result:
        return None

    def mail_from(self, command: MailFrom) -> Result:
        return None

    def rcpt_to(self, command: RcptTo) -> Result:
        return None

    def data(self, command: Data) -> Result:
        return None

    def header(self, command: Header) -> Result:
        return None

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        return None

    def body(self, command: BodyChunk) -> Result:
        return None

    def end_of_message(self, changes: Changes) -> Result:
        return None

    def unknown(self, command: Unknown) -> Result:
        return None

    def abort(self) -> Result:
        return None

    def reset(self) -> Result:
        return None

    def close(self) -> Result:
        return None


class MilterTests(SynchronousTestCase):
    def test_base_provides_imilter(self) -> None:
        """The Milter base class provides IMilter."""
        verifyClass(IMilter, Milter)
        self.assertTrue(verifyObject(IMilter, Milter()))

    def test_subclasses_provide_imilter(self) -> None:
        """Subclasses of Milter provide IMilter, whatever they override or declare."""
        for milter in (HeaderReader(), StrictHeaderReader(), Borrower(), Declaring()):
            self.assertTrue(verifyObject(IMilter, milter))

    def test_bare_provider(self) -> None:
        """A class that only declares IMilter satisfies it too."""
        self.assertTrue(verifyObject(IMilter, Bare()))

    def test_callbacks_continue(self) -> None:
        """Every callback of the base class answers None, which means continue."""
        milter = Milter()
        self.assertIsNone(milter.connect(Connect("host")))
        self.assertIsNone(milter.helo(Helo("mx")))
        self.assertIsNone(milter.mail_from(MailFrom("<a@example.com>")))
        self.assertIsNone(milter.rcpt_to(RcptTo("<b@example.com>")))
        self.assertIsNone(milter.data(Data()))
        self.assertIsNone(milter.header(Header("Subject", "hi")))
        self.assertIsNone(milter.end_of_headers(EndOfHeaders()))
        self.assertIsNone(milter.body(BodyChunk(b"x")))
        self.assertIsNone(milter.end_of_message(Changes(Action.NONE)))
        self.assertIsNone(milter.unknown(Unknown("HELP")))
        self.assertIsNone(milter.abort())
        self.assertIsNone(milter.close())

    def test_declaration_defaults(self) -> None:
        """By default a filter needs no action, macro, leading space or rejected recipient."""
        milter = Milter()
        self.assertEqual(milter.actions, Action.NONE)
        self.assertEqual(dict(milter.macro_requests), {})
        self.assertFalse(milter.leading_space)
        self.assertFalse(milter.rejected_recipients)
        self.assertEqual(milter.no_reply, frozenset())
        self.assertEqual(dict(milter.macros), {})

    def test_callback_table(self) -> None:
        """CALLBACKS names a Milter method for every command a filter can receive."""
        for command, name in CALLBACKS.items():
            self.assertTrue(callable(getattr(Milter, name)), (command, name))
        self.assertNotIn("end_of_message", CALLBACKS.values())


class OverridesTests(SynchronousTestCase):
    def test_base_overrides_nothing(self) -> None:
        """The base class overrides none of the callbacks."""
        for name in CALLBACKS.values():
            self.assertFalse(overrides(Milter(), name), name)

    def test_subclass_override(self) -> None:
        """A subclass overrides exactly the callbacks it defines."""
        milter = HeaderReader()
        self.assertTrue(overrides(milter, "header"))
        for name in set(CALLBACKS.values()) - {"header"}:
            self.assertFalse(overrides(milter, name), name)

    def test_inherited_override(self) -> None:
        """An override inherited from an intermediate class counts."""
        milter = StrictHeaderReader()
        self.assertTrue(overrides(milter, "header"))
        self.assertTrue(overrides(milter, "end_of_headers"))
        self.assertFalse(overrides(milter, "body"))

    def test_borrowed_base_function(self) -> None:
        """Rebinding the base class's own function is not an override."""
        self.assertFalse(overrides(Borrower(), "header"))

    def test_non_milter_provider(self) -> None:
        """A provider not derived from Milter is assumed to want every callback."""
        for name in CALLBACKS.values():
            self.assertTrue(overrides(Bare(), name), name)


def everything() -> Changes:
    return Changes(ALL_ACTIONS)


class ChangesActionTests(SynchronousTestCase):
    def test_undeclared_actions_refused(self) -> None:
        """Each change refuses at the call when its action was not declared, naming the action."""
        changes = Changes(Action.NONE)
        calls = [
            (lambda: changes.add_header("X-A", "1"), "ADD_HEADERS"),
            (lambda: changes.insert_header("X-A", "1", index=0), "ADD_HEADERS"),
            (lambda: changes.change_header("X-A", "1"), "CHANGE_HEADERS"),
            (lambda: changes.delete_header("X-A"), "CHANGE_HEADERS"),
            (lambda: changes.add_recipient("<r@example.com>"), "ADD_RECIPIENTS"),
            (lambda: changes.add_recipient("<r@example.com>", ["NOTIFY=NEVER"]), "ADD_RECIPIENTS_WITH_ARGS"),
            (lambda: changes.delete_recipient("<r@example.com>"), "DELETE_RECIPIENTS"),
            (lambda: changes.change_from("<s@example.com>"), "CHANGE_FROM"),
            (lambda: changes.replace_body(b"new\r\n"), "CHANGE_BODY"),
            (lambda: changes.quarantine("spam"), "QUARANTINE"),
        ]
        for call, action in calls:
            error = self.assertRaises(LocalProtocolError, call)
            self.assertIn(action, str(error))
        self.assertTrue(changes.empty)

    def test_other_actions_do_not_help(self) -> None:
        """Declaring a different action does not allow a change."""
        changes = Changes(ALL_ACTIONS & ~Action.CHANGE_HEADERS)
        self.assertRaises(LocalProtocolError, changes.change_header, "X-A", "1")

    def test_plain_recipient_needs_plain_action(self) -> None:
        """ADD_RECIPIENTS_WITH_ARGS alone does not allow adding a recipient without arguments."""
        changes = Changes(Action.ADD_RECIPIENTS_WITH_ARGS)
        self.assertRaises(LocalProtocolError, changes.add_recipient, "<r@example.com>")
        changes.add_recipient("<r@example.com>", ())
        self.assertEqual(changes.edits, [AddRecipient("<r@example.com>", ())])

    def test_records_in_order(self) -> None:
        """Header and recipient changes are recorded in call order."""
        changes = everything()
        changes.add_header("X-A", "1")
        changes.insert_header("X-B", "2", index=3)
        changes.change_header("Subject", "new", index=2)
        changes.delete_header("Received")
        changes.add_recipient("<r@example.com>")
        changes.add_recipient("<p@example.com>", ["NOTIFY=NEVER", "ORCPT=rfc822;p@example.com"])
        changes.delete_recipient("<q@example.com>")
        self.assertEqual(changes.edits, [
            AddHeader("X-A", "1"),
            InsertHeader(3, "X-B", "2"),
            ChangeHeader(2, "Subject", "new"),
            ChangeHeader(1, "Received", ""),
            AddRecipient("<r@example.com>"),
            AddRecipient("<p@example.com>", ("NOTIFY=NEVER", "ORCPT=rfc822;p@example.com")),
            DeleteRecipient("<q@example.com>"),
        ])
        self.assertFalse(changes.empty)

    def test_single_things(self) -> None:
        """Sender, body and quarantine reason are kept apart from the edits; a later call replaces."""
        changes = everything()
        changes.change_from("<a@example.com>")
        changes.change_from("<b@example.com>", ["RET=HDRS"])
        changes.replace_body(b"one\r\n")
        changes.replace_body(b"two\r\n")
        changes.quarantine("first")
        changes.quarantine("second")
        self.assertEqual(changes.edits, [])
        self.assertEqual(changes.sender, ChangeFrom("<b@example.com>", ("RET=HDRS",)))
        self.assertEqual(changes.body, b"two\r\n")
        self.assertEqual(changes.quarantine_reason, "second")

    def test_sender_without_args(self) -> None:
        """A sender change without arguments sends none (args is None, not empty)."""
        changes = everything()
        changes.change_from("<a@example.com>")
        self.assertEqual(changes.sender, ChangeFrom("<a@example.com>", None))

    def test_empty(self) -> None:
        """A fresh recorder is empty; an empty replacement body still counts as a change."""
        changes = everything()
        self.assertTrue(changes.empty)
        changes.replace_body(b"")
        self.assertFalse(changes.empty)

    def test_progress(self) -> None:
        """progress() calls the chain's hook at once, and does nothing without one."""
        calls: list[None] = []
        Changes(Action.NONE, on_progress=lambda: calls.append(None)).progress()
        self.assertEqual(calls, [None])
        Changes(Action.NONE).progress()


class ChangesValidationTests(SynchronousTestCase):
    def test_bad_header_names(self) -> None:
        """Empty names and names with spaces, colons, controls or non-ASCII are refused."""
        changes = everything()
        for name in ("", "X A", "X:A", "X\tA", "X\nA", "X\0A", "Ünïcode", "X\x7f"):
            self.assertRaises(LocalProtocolError, changes.add_header, name, "v")
            self.assertRaises(LocalProtocolError, changes.insert_header, name, "v")
            self.assertRaises(LocalProtocolError, changes.change_header, name, "v")
            self.assertRaises(LocalProtocolError, changes.delete_header, name)
        self.assertTrue(changes.empty)

    @given(st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1))
    def test_printable_names_accepted(self, name: str) -> None:
        """Any non-empty printable-ASCII name without a colon is accepted."""
        changes = everything()
        changes.add_header(name, "v")
        self.assertEqual(changes.edits, [AddHeader(name, "v")])

    @given(st.text(min_size=1).filter(lambda s: any(not 33 <= ord(c) <= 126 or c == ":" for c in s)))
    def test_other_names_refused(self, name: str) -> None:
        """A name with any character outside printable ASCII, or a colon, is refused."""
        self.assertRaises(LocalProtocolError, everything().add_header, name, "v")

    def test_cr_in_value(self) -> None:
        """A CR in a header value is refused: lines are folded with LF and whitespace."""
        changes = everything()
        for value in ("a\rb", "a\r\n b", "a\r"):
            self.assertRaises(LocalProtocolError, changes.add_header, "X-A", value)
            self.assertRaises(LocalProtocolError, changes.insert_header, "X-A", value, index=1)
            self.assertRaises(LocalProtocolError, changes.change_header, "X-A", value)
        self.assertTrue(changes.empty)

    def test_nul_and_surrogate_in_value(self) -> None:
        """A NUL or an unencodable lone surrogate in a header value is refused."""
        changes = everything()
        self.assertRaises(LocalProtocolError, changes.add_header, "X-A", "a\0b")
        self.assertRaises(LocalProtocolError, changes.add_header, "X-A", "a\ud800b")

    def test_escaped_bytes_in_value(self) -> None:
        """Undecodable bytes carried as surrogate escapes are allowed (they round-trip)."""
        changes = everything()
        changes.add_header("X-A", "caf\udce9")
        self.assertEqual(changes.edits, [AddHeader("X-A", "caf\udce9")])

    def test_folded_value(self) -> None:
        """A value folded with LF and a space or tab is accepted."""
        changes = everything()
        changes.add_header("X-A", "one\n two\n\tthree")
        self.assertEqual(changes.edits, [AddHeader("X-A", "one\n two\n\tthree")])

    def test_unfolded_line_break(self) -> None:
        """An LF not followed by whitespace would start a new header, so it is refused."""
        changes = everything()
        for value in ("a\nBcc: evil@example.com", "a\n", "\nb"):
            self.assertRaises(LocalProtocolError, changes.add_header, "X-A", value)
            self.assertRaises(LocalProtocolError, changes.change_header, "X-A", value)
        self.assertTrue(changes.empty)

    def test_indexes(self) -> None:
        """Insert positions start at 0, change positions at 1, and both must fit in 32 bits."""
        changes = everything()
        self.assertRaises(LocalProtocolError, changes.insert_header, "X-A", "v", index=-1)
        self.assertRaises(LocalProtocolError, changes.insert_header, "X-A", "v", index=2**32)
        self.assertRaises(LocalProtocolError, changes.change_header, "X-A", "v", index=0)
        self.assertRaises(LocalProtocolError, changes.delete_header, "X-A", index=-3)
        self.assertRaises(LocalProtocolError, changes.change_header, "X-A", "v", index=2**32)
        changes.insert_header("X-A", "v", index=2**32 - 1)
        changes.change_header("X-A", "v", index=2**32 - 1)
        self.assertEqual(len(changes.edits), 2)

    def test_added_leading_space(self) -> None:
        """With add_space, values get the space the MTA no longer adds; deletions stay empty."""
        changes = Changes(ALL_ACTIONS, add_space=True)
        changes.add_header("X-A", "1")
        changes.insert_header("X-B", "2", index=0)
        changes.change_header("X-C", "3")
        changes.delete_header("X-D")
        self.assertEqual(changes.edits, [
            AddHeader("X-A", " 1"), InsertHeader(0, "X-B", " 2"), ChangeHeader(1, "X-C", " 3"),
            ChangeHeader(1, "X-D", ""),
        ])

    def test_value_kept_without_add_space(self) -> None:
        """Without add_space, values are recorded exactly as given."""
        changes = everything()
        changes.add_header("X-A", " spaced")
        self.assertEqual(changes.edits, [AddHeader("X-A", " spaced")])

    def test_empty_quarantine_reason(self) -> None:
        """Quarantine needs a non-empty reason without NUL."""
        changes = everything()
        self.assertRaises(LocalProtocolError, changes.quarantine, "")
        self.assertRaises(LocalProtocolError, changes.quarantine, "a\0b")
        self.assertIsNone(changes.quarantine_reason)

    def test_esmtp_args_with_spaces(self) -> None:
        """An ESMTP argument containing a space, or an empty one, is refused."""
        changes = everything()
        for args in (["SIZE=10 BODY=8BITMIME"], ["NOTIFY=NEVER", ""], [" "]):
            self.assertRaises(LocalProtocolError, changes.add_recipient, "<r@example.com>", args)
            self.assertRaises(LocalProtocolError, changes.change_from, "<s@example.com>", args)
        self.assertTrue(changes.empty)

    def test_esmtp_args_as_string(self) -> None:
        """Arguments given as one plain string are refused, naming the mistake."""
        changes = everything()
        error = self.assertRaises(LocalProtocolError, changes.add_recipient, "<r@example.com>", "NOTIFY=NEVER")
        self.assertIn("not the string", str(error))
        self.assertRaises(LocalProtocolError, changes.change_from, "<s@example.com>", "RET=HDRS")
        self.assertTrue(changes.empty)

    def test_esmtp_args_with_nul(self) -> None:
        """An ESMTP argument with a NUL is refused."""
        self.assertRaises(LocalProtocolError, everything().change_from, "<s@example.com>", ["A=\0"])

    def test_addresses_with_nul(self) -> None:
        """Addresses with a NUL are refused."""
        changes = everything()
        self.assertRaises(LocalProtocolError, changes.add_recipient, "<a\0@example.com>")
        self.assertRaises(LocalProtocolError, changes.delete_recipient, "<a\0@example.com>")
        self.assertRaises(LocalProtocolError, changes.change_from, "<a\0@example.com>")
        self.assertTrue(changes.empty)

    def test_body_must_be_bytes(self) -> None:
        """A replacement body given as text is refused."""
        changes = everything()
        self.assertRaises(LocalProtocolError, changes.replace_body, "text")
        self.assertIsNone(changes.body)


class ChangesArgumentTypeTests(SynchronousTestCase):
    def test_header_calls_share_one_order(self) -> None:
        """insert, change and delete take the name first, then the value, then the index."""
        changes = everything()
        changes.insert_header("X-A", "top")
        changes.insert_header("X-B", "third", 2)
        changes.change_header("X-C", "second", index=2)
        changes.delete_header("X-D", index=3)
        changes.delete_header("X-E", 2)
        self.assertEqual(changes.edits, [
            InsertHeader(0, "X-A", "top"), InsertHeader(2, "X-B", "third"), ChangeHeader(2, "X-C", "second"),
            ChangeHeader(3, "X-D", ""), ChangeHeader(2, "X-E", ""),
        ])

    def test_libmilter_order_is_a_type_error(self) -> None:
        """libmilter's argument order fails at the call with a TypeError naming the call and its types."""
        changes: Any = everything()  # untyped, as in a filter without annotations
        calls = [
            (lambda: changes.change_header("X-Dup", 2, "v"), "change_header(name: str, value: str, index: int = 1)",
             "value must be str, not int 2"),
            (lambda: changes.insert_header(0, "X-A", "v"), "insert_header(name: str, value: str, index: int = 0)",
             "name must be str, not int 0"),
            (lambda: changes.delete_header(2, "X-A"), "delete_header(name: str, index: int = 1)",
             "name must be str, not int 2"),
            (lambda: changes.change_header("X-A", "v", "2"), "change_header(", "index must be int, not str '2'"),
            (lambda: changes.insert_header("X-A", "v", True), "insert_header(", "index must be int, not bool True"),
        ]
        for call, signature, problem in calls:
            error = self.assertRaises(TypeError, call)
            self.assertIsInstance(error, ArgumentTypeError)
            self.assertIn(f"Changes.{signature}", str(error))
            self.assertIn(problem, str(error))
        self.assertTrue(changes.empty)

    def test_error_names_the_filter_line(self) -> None:
        """The TypeError is raised inside the call, so the filter's own line is in its traceback."""
        changes: Any = everything()

        def filter_code() -> None:
            changes.add_header("X-A", b"bytes")

        try:
            filter_code()
        except TypeError as error:
            frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
        self.assertIn("filter_code", frames)
        self.assertEqual(frames[-1], "_check_type")

    def test_other_calls_check_types(self) -> None:
        """Recipient, sender, body and quarantine calls refuse wrong types the same way."""
        changes: Any = everything()
        calls = [
            (lambda: changes.add_recipient(b"<r@example.com>"), "add_recipient(address: str"),
            (lambda: changes.add_recipient("<r@example.com>", [1]), "each of args must be str, not int 1"),
            (lambda: changes.add_recipient("<r@example.com>", 5), "args must be a sequence of strings"),
            (lambda: changes.delete_recipient(None), "delete_recipient(address: str)"),
            (lambda: changes.change_from(["<s@example.com>"]), "change_from(address: str"),
            (lambda: changes.replace_body("text"), "body must be bytes or bytearray or memoryview, not str"),
            (lambda: changes.quarantine(3), "quarantine(reason: str)"),
        ]
        for call, text in calls:
            error = self.assertRaises(ArgumentTypeError, call)
            self.assertIn(text, str(error))
        self.assertTrue(changes.empty)
