"""Tests for txmilt.messages: the reply model, its validation and the small helpers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests import strategies as s
from txmilt.codec import decode_response, encode, frame, parse_reply
from txmilt.errors import InvalidReplyError, LocalProtocolError, RemoteProtocolError
from txmilt.messages import (
    MAX_BODY_CHUNK,
    Action,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    InsertHeader,
    MailFrom,
    Modification,
    NegotiateReply,
    ProtocolFlag,
    Quarantine,
    RcptTo,
    Reject,
    ReplaceBody,
    TempFail,
    add_leading_space,
    required_action,
    split_body,
    strip_leading_space,
)


class RefusalDefaultsTests(SynchronousTestCase):
    """Plain and custom Reject/TempFail."""

    def test_plain(self) -> None:
        """Reject() and TempFail() carry no text and encode as 'r' and 't'."""
        for refusal, letter in ((Reject(), b"r"), (TempFail(), b"t")):
            self.assertFalse(refusal.custom)
            self.assertEqual((refusal.text, refusal.code, refusal.status), ((), None, None))
            self.assertEqual(encode(refusal), b"\0\0\0\1" + letter)

    def test_reject_text_defaults(self) -> None:
        """Reject("text") is 550 5.7.1 text."""
        refusal = Reject("go away")
        self.assertTrue(refusal.custom)
        self.assertEqual((refusal.text, refusal.code, refusal.status), (("go away",), 550, "5.7.1"))
        self.assertEqual(refusal.reply_text(), "550 5.7.1 go away")

    def test_tempfail_text_defaults(self) -> None:
        """TempFail("text") is 451 4.7.1 text."""
        self.assertEqual(TempFail("later").reply_text(), "451 4.7.1 later")

    def test_string_and_tuple_equal(self) -> None:
        """A single line given as a string equals the same line in a tuple."""
        self.assertEqual(Reject("x"), Reject(("x",)))
        self.assertEqual(hash(Reject("x")), hash(Reject(("x",))))

    def test_code_only(self) -> None:
        """A code alone gives the default status and an empty text."""
        self.assertEqual(Reject(code=554).reply_text(), "554 5.7.1")
        self.assertEqual(TempFail(code=421).reply_text(), "421 4.7.1")

    def test_no_status(self) -> None:
        """An empty status leaves it out, like setreply without xcode ("550 " with no text)."""
        self.assertEqual(Reject("no", status="").reply_text(), "550 no")
        self.assertEqual(Reject(status="").reply_text(), "550 ")

    def test_multiline(self) -> None:
        """Lines repeat code and status, '-' on all but the last, joined by CRLF."""
        refusal = Reject(("line one", "line two", "three"), code=550, status="5.0.0")
        self.assertEqual(
            refusal.reply_text(),
            "550-5.0.0 line one\r\n550-5.0.0 line two\r\n550 5.0.0 three",
        )

    def test_421(self) -> None:
        """A 421 TempFail is allowed (it makes the MTA drop the session)."""
        self.assertEqual(encode(TempFail("bye", 421, "4.7.0")), frame("y", b"421 4.7.0 bye\0"))


class RefusalValidationTests(SynchronousTestCase):
    """Custom replies the MTA would refuse raise InvalidReplyError at construction."""

    def test_code_class_matches_verdict(self) -> None:
        """Reject needs 5xx and TempFail 4xx."""
        for make in (lambda: Reject("x", 451), lambda: TempFail("x", 550), lambda: Reject("x", 250),
                     lambda: TempFail("x", 399), lambda: Reject("x", 600), lambda: Reject("x", 5500)):
            self.assertRaises(InvalidReplyError, make)

    def test_status_class_matches_code(self) -> None:
        """The enhanced status class must equal the reply code's first digit."""
        self.assertRaises(InvalidReplyError, Reject, "x", 550, "4.7.1")
        self.assertRaises(InvalidReplyError, TempFail, "x", 451, "5.7.1")
        self.assertRaises(InvalidReplyError, TempFail, "x", None, "2.0.0")

    def test_status_shape(self) -> None:
        """An enhanced status looks like x.y.z with up to three ASCII digits each."""
        for status in ("5.7", "5.7.1.1", "5.1234.1", "5.a.1", "5.\u0663.1", " 5.7.1", "5.7.1 "):
            self.assertRaises(InvalidReplyError, Reject, "x", 550, status)
        self.assertEqual(Reject("x", 550, "5.123.456").status, "5.123.456")

    def test_status_in_text(self) -> None:
        """Text starting with an enhanced status needs status= instead."""
        self.assertRaises(InvalidReplyError, Reject, "5.1.1 no such user", 550, "")
        self.assertEqual(Reject("4.1.1 odd", 550, "").reply_text(), "550 4.1.1 odd")

    def test_line_count(self) -> None:
        """Up to 32 lines are allowed, 33 are not."""
        self.assertEqual(len(Reject(("x",) * 32).text), 32)
        self.assertRaises(InvalidReplyError, Reject, ("x",) * 33)

    def test_line_length(self) -> None:
        """A line is at most 980 bytes, counted in UTF-8."""
        Reject("x" * 980)
        self.assertRaises(InvalidReplyError, Reject, "x" * 981)
        self.assertRaises(InvalidReplyError, Reject, "\u00e9" * 491)

    def test_cr_lf_nul(self) -> None:
        """CR, LF or NUL inside a line is refused."""
        for text in ("a\r\nb", "a\rb", "a\nb", "a\0b", ("ok", "a\nb")):
            self.assertRaises(InvalidReplyError, Reject, text)

    def test_lone_surrogate(self) -> None:
        """Text that cannot be encoded is an InvalidReplyError, not a UnicodeError."""
        self.assertRaises(InvalidReplyError, Reject, "\ud800")

    def test_is_local_error(self) -> None:
        """InvalidReplyError is a LocalProtocolError: our side is at fault."""
        self.assertTrue(issubclass(InvalidReplyError, LocalProtocolError))

    @given(s.refusals())
    def test_reply_text_parses_back(self, refusal: Reject | TempFail) -> None:
        """A custom reply's text parses back to the same verdict."""
        if refusal.custom:
            self.assertEqual(parse_reply(refusal.reply_text()), refusal)


class PercentTests(SynchronousTestCase):
    """'%' handling in reply texts."""

    def test_doubled_on_wire(self) -> None:
        """Every '%' is written '%%'."""
        self.assertEqual(encode(Reject("100% sure")), frame("y", b"550 5.7.1 100%% sure\0"))

    def test_undoubled_on_decode(self) -> None:
        """'%%' decodes to '%'."""
        self.assertEqual(decode_response("y", b"550 5.7.1 100%% sure, %%%%\0"), Reject("100% sure, %%"))

    def test_lone_percent(self) -> None:
        """A lone '%' on decode is a RemoteProtocolError."""
        for text in (b"550 5.7.1 %d\0", b"550 5.7.1 %\0", b"550-a\r\n550 b%\0"):
            self.assertRaises(RemoteProtocolError, decode_response, "y", text)

    @given(st.lists(st.sampled_from(["%", "a", " "]), max_size=12).map("".join))
    def test_round_trip(self, text: str) -> None:
        """Any arrangement of '%' survives encode and decode."""
        self.assertEqual(decode_response("y", encode(Reject(text))[5:]), Reject(text))


class ModificationTests(SynchronousTestCase):
    """Modification helpers."""

    def test_required_actions(self) -> None:
        """Each modification needs its action flag; ADDRCPT with args needs ADDRCPT_PAR."""
        cases: list[tuple[Modification, Action]] = [
            (AddHeader("X", "v"), Action.ADD_HEADERS),
            (InsertHeader(0, "X", "v"), Action.ADD_HEADERS),
            (ChangeHeader(1, "X", ""), Action.CHANGE_HEADERS),
            (ChangeFrom("<a>"), Action.CHANGE_FROM),
            (AddRecipient("<a>"), Action.ADD_RECIPIENTS),
            (AddRecipient("<a>", ()), Action.ADD_RECIPIENTS_WITH_ARGS),
            (DeleteRecipient("<a>"), Action.DELETE_RECIPIENTS),
            (ReplaceBody(b""), Action.CHANGE_BODY),
            (Quarantine("x"), Action.QUARANTINE),
        ]
        for modification, action in cases:
            self.assertEqual(required_action(modification), action, modification)

    def test_addrcpt_letters(self) -> None:
        """AddRecipient without args is '+', with args (even empty) '2'."""
        self.assertEqual(encode(AddRecipient("<a>"))[4:5], b"+")
        self.assertEqual(encode(AddRecipient("<a>", ()))[4:5], b"2")

    def test_split_body(self) -> None:
        """Replacement bodies are cut into 65535-byte packets; an empty body is one empty packet."""
        self.assertEqual(split_body(b""), (ReplaceBody(b""),))
        self.assertEqual(split_body(b"x" * MAX_BODY_CHUNK), (ReplaceBody(b"x" * MAX_BODY_CHUNK),))
        parts = split_body(b"x" * (2 * MAX_BODY_CHUNK + 1))
        self.assertEqual([len(p.data) for p in parts], [MAX_BODY_CHUNK, MAX_BODY_CHUNK, 1])

    @given(st.binary(max_size=3 * MAX_BODY_CHUNK).filter(bool) | st.just(b""))
    def test_split_body_joins(self, body: bytes) -> None:
        """The packets of a split body join back to the body."""
        parts = split_body(body)
        self.assertEqual(b"".join(p.data for p in parts), body)
        self.assertTrue(all(len(p.data) <= MAX_BODY_CHUNK for p in parts))

    def test_leading_space(self) -> None:
        """Exactly one space (not a tab) is stripped or added."""
        self.assertEqual(strip_leading_space("  x"), " x")
        self.assertEqual(strip_leading_space("\tx"), "\tx")
        self.assertEqual(strip_leading_space("x"), "x")
        self.assertEqual(add_leading_space("x"), " x")


class NegotiateReplyTests(SynchronousTestCase):
    """NegotiateReply equality and hashing."""

    def test_hashable(self) -> None:
        """Equal replies hash equally, macro lists included."""
        a = NegotiateReply(6, Action.ADD_HEADERS, ProtocolFlag.NO_DATA, {})
        b = NegotiateReply(6, Action.ADD_HEADERS, ProtocolFlag.NO_DATA)
        self.assertEqual(a, b)
        self.assertEqual(hash(a), hash(b))
        self.assertEqual(len({a, b}), 1)


class EnvelopeAddressTests(SynchronousTestCase):
    """MailFrom and RcptTo give the address without brackets too."""

    def test_mailbox_and_domain(self) -> None:
        """The mailbox drops the brackets and any source route; the domain follows the last @, as written."""
        cases = {
            "<alice@Example.COM>": ("alice@Example.COM", "Example.COM"),
            " <bob@example.net> ": ("bob@example.net", "example.net"),
            "carol@example.org": ("carol@example.org", "example.org"),
            "<@relay.example,@hop.example:dave@example.com>": ("dave@example.com", "example.com"),
            '<"a@b"@example.com>': ('"a@b"@example.com', "example.com"),
            "<postmaster>": ("postmaster", ""),
            "<>": ("", ""),
        }
        for address, (mailbox, domain) in cases.items():
            for command in (MailFrom(address, ("SIZE=10",)), RcptTo(address)):
                self.assertEqual((command.mailbox, command.domain), (mailbox, domain), address)

    def test_address_unchanged(self) -> None:
        """The address field keeps the MTA's spelling; equality and hashing ignore the new properties."""
        command = RcptTo("<Bob@Example.net>", ("NOTIFY=NEVER",))
        self.assertEqual(command.address, "<Bob@Example.net>")
        self.assertEqual(command, RcptTo("<Bob@Example.net>", ("NOTIFY=NEVER",)))
        self.assertEqual(hash(command), hash(RcptTo("<Bob@Example.net>", ("NOTIFY=NEVER",))))
        self.assertFalse(hasattr(command, "__dict__"))
