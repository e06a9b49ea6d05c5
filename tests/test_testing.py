"""Tests for txmilt.testing: the in-memory MTA, its profiles and the recording milter."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from txmilt.chain import FilterSpec
from txmilt.errors import ConfigurationError, LocalProtocolError
from txmilt.interfaces import IMilter
from txmilt.messages import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    Abort,
    Accept,
    Action,
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Command,
    Connect,
    Continue,
    Data,
    DeleteRecipient,
    EndOfHeaders,
    EndOfMessage,
    Family,
    Header,
    Helo,
    InsertHeader,
    Macros,
    MacroStage,
    MailFrom,
    Negotiate,
    NegotiateReply,
    Progress,
    ProtocolFlag,
    Quarantine,
    Quit,
    RcptTo,
    Reject,
    ReplaceBody,
    Skip,
    TempFail,
    Unknown,
)
from txmilt.milter import Changes, FilterVerdict, Milter, Result
from txmilt.mta import MTA, Message, apply_modifications
from txmilt.protocol import MilterFactory
from txmilt.testing import POSTFIX, SENDMAIL, Call, FakeMTA, RecordingMilter, Step

# PROTOCOL.md §8, packet number -> bytes.
GOLDEN = {
    number: bytes.fromhex(text)
    for number, text in {
        1: "00 00 00 0d 4f 00 00 00 06 00 00 01 ff 00 1f ff ff",
        2: "00 00 00 0d 4f 00 00 00 06 00 00 00 01 00 00 03 00",
        3: "00 00 00 13 44 43 6a 00 6d 78 2e 65 78 61 6d 70 6c 65 2e 6e 65 74 00",
        4: "00 00 00 20 43 6d 61 69 6c 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00"
           " 34 d4 31 31 39 32 2e 30 2e 32 2e 31 30 00",
        5: "00 00 00 01 63",
        6: "00 00 00 12 48 6d 61 69 6c 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00",
        7: "00 00 00 01 63",
        8: "00 00 00 23 4d 3c 61 6c 69 63 65 40 65 78 61 6d 70 6c 65 2e 63 6f 6d 3e 00"
           " 42 4f 44 59 3d 38 42 49 54 4d 49 4d 45 00",
        9: "00 00 00 01 63",
        10: "00 00 00 13 52 3c 62 6f 62 40 65 78 61 6d 70 6c 65 2e 6e 65 74 3e 00",
        11: "00 00 00 01 63",
        12: "00 00 00 0f 4c 53 75 62 6a 65 63 74 00 48 65 6c 6c 6f 00",
        13: "00 00 00 01 63",
        14: "00 00 00 01 4e",
        15: "00 00 00 01 63",
        16: "00 00 00 09 42 48 69 20 42 6f 62 0d 0a",
        17: "00 00 00 01 63",
        18: "00 00 00 01 45",
        19: "00 00 00 0f 68 58 2d 43 68 65 63 6b 65 64 00 79 65 73 00",
        20: "00 00 00 01 63",
        21: "00 00 00 01 51",
    }.items()
}
# What txmilt answers instead of packet 2: libmilter's 6/0x1/0x300 plus SKIP (0x400), asked for because the
# filter reads the body so that the chain can pass a filter's Skip on; chain.merge_requirements decides it.
TXMILT_PACKET_2 = bytes.fromhex("00 00 00 0d 4f 00 00 00 06 00 00 00 01 00 00 07 00")
#: The MTA of the worked example: Sendmail that sends only ``j`` before CONNECT.
GOLDEN_PROFILE = replace(SENDMAIL, name="golden", macro_names={MacroStage.CONNECT: ("j",)})


class GoldenMilter(Milter):
    """The filter of PROTOCOL.md §8: everything but data/unknown; adds X-Checked at the end."""

    actions = Action.ADD_HEADERS

    def connect(self, command: Connect) -> Result:
        return None

    def helo(self, command: Helo) -> Result:
        return None

    def mail_from(self, command: MailFrom) -> Result:
        return None

    def rcpt_to(self, command: RcptTo) -> Result:
        return None

    def header(self, command: Header) -> Result:
        return None

    def end_of_headers(self, command: EndOfHeaders) -> Result:
        return None

    def body(self, command: BodyChunk) -> Result:
        return None

    def end_of_message(self, changes: Changes) -> Result:
        changes.add_header("X-Checked", "yes")
        return None


class HeaderOnly(Milter):
    """Reads headers only, so every other event is switched off."""

    def header(self, command: Header) -> Result:
        return None


class Everything(RecordingMilter):
    """A recorder allowed every modification."""

    actions = ALL_ACTIONS & ~Action.SET_MACRO_LIST


def letters(commands: list[Command]) -> str:
    """Command letters, macro packets written as D plus their letter."""
    return " ".join(f"D{c.command}" if isinstance(c, Macros) else c.letter for c in commands)


def macro_packets(mta: FakeMTA, letter: str) -> list[Macros]:
    return [c for c in mta.commands if isinstance(c, Macros) and c.command == letter]


class ProfileTests(SynchronousTestCase):
    """The POSTFIX and SENDMAIL profiles send what those MTAs send."""

    def test_postfix_aborts_after_each_message(self) -> None:
        """Postfix sends ABORT after every finished message, also between messages."""
        mta = FakeMTA([RecordingMilter])
        mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "1")], b"x\r\n")
        mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "2")], b"y\r\n")
        self.assertEqual(
            letters(mta.commands),
            "O DC C DH H"
            + " DM M DR R DT T DL L DN N DB B DE E A" * 2,
        )

    def test_postfix_macros_before_every_header_and_chunk(self) -> None:
        """Postfix sends D L (EOH list) before each header and D B (EOM list) before each 65535-byte chunk."""
        mta = FakeMTA([RecordingMilter])
        body = b"a" * 65535 + b"b" * 100
        mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "1"), ("To", "b")], body)
        sent = mta.commands
        for index, command in enumerate(sent):
            if isinstance(command, Header | BodyChunk):
                expected = "L" if isinstance(command, Header) else "B"
                self.assertEqual(sent[index - 1], Macros(expected, (("i", "4XkZ1T0abcz"),)))
        chunks = [c.data for c in sent if isinstance(c, BodyChunk)]
        self.assertEqual([len(c) for c in chunks], [65535, 100])
        self.assertEqual(b"".join(chunks), body)

    def test_sendmail_sends_no_abort_and_no_per_item_macros(self) -> None:
        """Sendmail sends neither ABORT after a message nor macros before headers and chunks."""
        mta = FakeMTA([RecordingMilter], profile=SENDMAIL)
        mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "1")], b"x\r\n")
        mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "2")], b"y\r\n")
        self.assertEqual(letters(mta.commands), "O DC C DH H" + " DM M DR R T L N B DE E" * 2)

    def test_sendmail_empty_macro_packet(self) -> None:
        """A stage whose macros all lack a value gets a macro packet without pairs."""
        mta = FakeMTA([RecordingMilter], profile=SENDMAIL)
        mta.connect()
        mta.helo("mail.example.com")
        self.assertEqual(macro_packets(mta, "H"), [Macros("H")])

    def test_postfix_queue_id_from_first_rcpt(self) -> None:
        """Postfix's i macro is missing at MAIL and present from the first RCPT on; Sendmail has it at MAIL."""
        postfix = FakeMTA([RecordingMilter])
        postfix.message("<a@example.com>", ["<b@example.net>"])
        self.assertNotIn("i", dict(macro_packets(postfix, "M")[0].pairs))
        self.assertEqual(dict(macro_packets(postfix, "R")[0].pairs)["i"], "4XkZ1T0abcz")
        sendmail = FakeMTA([RecordingMilter], profile=SENDMAIL)
        sendmail.message("<a@example.com>", ["<b@example.net>"])
        self.assertEqual(dict(macro_packets(sendmail, "M")[0].pairs)["i"], "5A1BcDeF012345")

    def test_default_macro_values(self) -> None:
        """Postfix's default CONNECT, MAIL and RCPT macros carry the session's values."""
        mta = FakeMTA([RecordingMilter])
        mta.connect("client.example.org", "198.51.100.7", 4000)
        mta.mail_from("<alice@example.com>")
        mta.rcpt_to("<bob@example.net>", "NOTIFY=NEVER")
        self.assertEqual(macro_packets(mta, "C"), [Macros("C", (
            ("j", "mx.example.net"), ("{daemon_name}", "mx.example.net"), ("{daemon_addr}", "192.0.2.1"),
            ("v", "Postfix 3.7.11"), ("_", "client.example.org [198.51.100.7]"),
        ))])
        self.assertEqual(macro_packets(mta, "M"), [Macros("M", (
            ("{mail_addr}", "alice@example.com"), ("{mail_host}", "example.com"), ("{mail_mailer}", "smtp"),
        ))])
        self.assertEqual(macro_packets(mta, "R"), [Macros("R", (
            ("i", "4XkZ1T0abcz"), ("{rcpt_addr}", "bob@example.net"), ("{rcpt_host}", "example.net"),
            ("{rcpt_mailer}", "smtp"),
        ))])

    def test_requested_macros_replace_defaults(self) -> None:
        """The requested list is sent for its stage, in its order, only names with a value.

        The chain asks for the filter's names and then the MTAs' default names, so that
        the filter loses none of the defaults.
        """
        recorder = RecordingMilter(macro_requests={MacroStage.CONNECT: ("{client_addr}", "j", "{nothing}")})
        mta = FakeMTA([recorder])
        mta.connect()
        self.assertEqual(macro_packets(mta, "C"), [Macros("C", (
            ("{client_addr}", "192.0.2.10"), ("j", "mx.example.net"), ("{daemon_name}", "mx.example.net"),
            ("{daemon_addr}", "192.0.2.1"), ("v", "Postfix 3.7.11"), ("_", "mail.example.com [192.0.2.10]"),
        ))])
        self.assertEqual(recorder.calls[0].macros, {
            "client_addr": "192.0.2.10", "j": "mx.example.net", "daemon_name": "mx.example.net",
            "daemon_addr": "192.0.2.1", "v": "Postfix 3.7.11", "_": "mail.example.com [192.0.2.10]",
        })

    def test_empty_requested_list(self) -> None:
        """An empty request still gets the MTA's default list (which has no HELO values here)."""
        for profile in (SENDMAIL, POSTFIX):
            mta = FakeMTA([RecordingMilter(macro_requests={MacroStage.HELO: ()})], profile=profile)
            mta.connect()
            mta.helo()
            self.assertEqual(macro_packets(mta, "H"), [Macros("H")], profile.name)

    def test_macro_overrides(self) -> None:
        """The macros argument overrides profile values; None removes a macro."""
        mta = FakeMTA([RecordingMilter], macros={"{daemon_name}": "edge", "v": None, "j": "mx.test"})
        mta.connect()
        self.assertEqual(dict(macro_packets(mta, "C")[0].pairs), {
            "j": "mx.test", "{daemon_name}": "edge", "{daemon_addr}": "192.0.2.1",
            "_": "mail.example.com [192.0.2.10]",
        })
        mta.macros["j"] = "changed"
        self.assertEqual(mta.macro_value("{j}"), "changed")

    def test_postfix_sends_empty_unknown_macros(self) -> None:
        """Postfix sends an empty D U before UNKNOWN; Sendmail sends none."""
        postfix = FakeMTA([RecordingMilter])
        postfix.connect()
        self.assertEqual(postfix.unknown("XFOO bar"), [Continue()])
        self.assertEqual(postfix.commands[-2:], [Macros("U"), Unknown("XFOO bar")])
        sendmail = FakeMTA([RecordingMilter], profile=SENDMAIL)
        sendmail.connect()
        sendmail.unknown("XFOO bar")
        self.assertEqual(macro_packets(sendmail, "U"), [])

    def test_custom_offer(self) -> None:
        """The offer argument replaces the profile's OPTNEG offer."""
        mta = FakeMTA([RecordingMilter], offer=Negotiate(2, Action(0x0F), ProtocolFlag(0x7F)))
        reply = mta.negotiate()
        self.assertEqual(reply, [NegotiateReply(2, Action.NONE, ProtocolFlag.NONE)])
        self.assertEqual(mta.negotiated, reply[0])


class GoldenSessionTests(SynchronousTestCase):
    """The worked example of PROTOCOL.md §8 runs byte for byte."""

    def expected_milter_bytes(self) -> bytes:
        return TXMILT_PACKET_2 + b"".join(GOLDEN[n] for n in (5, 7, 9, 11, 13, 15, 17, 19, 20))

    def expected_mta_bytes(self) -> bytes:
        return b"".join(GOLDEN[n] for n in (1, 3, 4, 6, 8, 10, 12, 14, 16, 18, 21))

    def test_packet_2_differs_only_in_optional_bits(self) -> None:
        """txmilt's OPTNEG reply is libmilter's plus SKIP and NR bits for switched-off events."""
        self.assertEqual(TXMILT_PACKET_2[:13], GOLDEN[2][:13])
        extra = int.from_bytes(TXMILT_PACKET_2[13:]) & ~int.from_bytes(GOLDEN[2][13:])
        self.assertEqual(ProtocolFlag(extra), ProtocolFlag.SKIP)

    def test_steps(self) -> None:
        """Step by step, the milter writes packets 2-20 and the MTA sends packets 1-21."""
        clock = Clock()
        mta = FakeMTA(MilterFactory([GoldenMilter], clock), profile=GOLDEN_PROFILE)
        self.assertEqual(mta.clock, clock)
        self.assertEqual(mta.negotiate(), [NegotiateReply(6, Action.ADD_HEADERS, ProtocolFlag(0x700))])
        self.assertEqual(mta.connect("mail.example.com", "192.0.2.10", 54321), [Continue()])
        self.assertEqual(mta.helo("mail.example.com"), [Continue()])
        self.assertEqual(mta.mail_from("<alice@example.com>", "BODY=8BITMIME"), [Continue()])
        self.assertEqual(mta.rcpt_to("<bob@example.net>"), [Continue()])
        self.assertEqual(mta.data(), [])
        self.assertEqual(mta.skipped, [Data()])
        self.assertEqual(mta.header("Subject", "Hello"), [Continue()])
        self.assertEqual(mta.end_of_headers(), [Continue()])
        self.assertEqual(mta.body(b"Hi Bob\r\n"), [Continue()])
        self.assertEqual(mta.end_of_message(), [AddHeader("X-Checked", "yes"), Continue()])
        self.assertEqual(mta.quit(), [])
        self.assertFalse(mta.connected)
        self.assertEqual(mta.transport.value(), self.expected_milter_bytes())
        self.assertEqual(mta.sent, self.expected_mta_bytes())

    def test_message(self) -> None:
        """message() produces the same bytes on both sides."""
        mta = FakeMTA([GoldenMilter], profile=GOLDEN_PROFILE)
        result = mta.message(
            "<alice@example.com>", ["<bob@example.net>"], [("Subject", "Hello")], b"Hi Bob\r\n",
            sender_args=["BODY=8BITMIME"],
        )
        mta.quit()
        self.assertEqual(mta.transport.value(), self.expected_milter_bytes())
        self.assertEqual(mta.sent, self.expected_mta_bytes())
        self.assertEqual(result.verdict, Continue())
        self.assertEqual(result.headers, [("Subject", "Hello"), ("X-Checked", "yes")])
        self.assertEqual(result.modifications, [AddHeader("X-Checked", "yes")])


class StepTests(SynchronousTestCase):
    """Step methods send one command each and return its responses."""

    def test_switched_off_commands_are_skipped(self) -> None:
        """A command the milter switched off is not sent; its macros still are, and the skip is recorded."""
        mta = FakeMTA([HeaderOnly], profile=SENDMAIL)
        self.assertEqual(mta.connect(), [])
        self.assertEqual(mta.helo(), [])
        self.assertEqual(mta.mail_from("<a@example.com>"), [])  # always sent (it marks messages), never answered
        self.assertEqual(mta.rcpt_to("<b@example.net>"), [])
        self.assertEqual(mta.header("Subject", "x"), [Continue()])
        self.assertEqual(mta.skipped, [Connect("mail.example.com", Family.INET, 54321, "192.0.2.10"),
                                       Helo("mail.example.com"), RcptTo("<b@example.net>")])
        self.assertEqual(letters(mta.commands), "O DC DH DM M DR L")
        self.assertFalse(mta.steps[1].sent)

    def test_pending_reply_collected_later(self) -> None:
        """A reply a filter still owes arrives with collect() after the clock moves."""
        clock = Clock()

        def later(command: RcptTo) -> Deferred[FilterVerdict | None]:
            d: Deferred[FilterVerdict | None] = Deferred()
            clock.callLater(5, d.callback, Reject())
            return d

        mta = FakeMTA([RecordingMilter({"rcpt_to": later})], clock=clock)
        mta.connect()
        mta.mail_from("<a@example.com>")
        self.assertEqual(mta.rcpt_to("<b@example.net>"), [])
        self.assertTrue(mta.session.reply_due)
        self.assertRaises(LocalProtocolError, mta.rcpt_to, "<c@example.net>")
        clock.advance(5)
        self.assertEqual(mta.collect(), [Reject()])
        self.assertEqual(mta.steps[-1].responses, [Reject()])
        self.assertEqual(mta.steps[-1].verdict, Reject())
        self.assertEqual(mta.rcpt_to("<c@example.net>"), [])  # the same rule again: pending

    def test_body_is_chunked(self) -> None:
        """body() sends at most 65535 bytes per BODY packet and returns every chunk's reply."""
        recorder = RecordingMilter()
        mta = FakeMTA([recorder])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        mta.end_of_headers()
        self.assertEqual(mta.body(b"x" * 140000), [Continue()] * 3)
        self.assertEqual(
            [len(c.data) for c in recorder.arguments("body") if isinstance(c, BodyChunk)], [65535, 65535, 8930]
        )

    def test_body_stops_at_skip(self) -> None:
        """body() sends no more chunks after a Skip."""
        recorder = RecordingMilter({"body": Skip()})
        mta = FakeMTA([recorder])
        mta.connect()
        mta.mail_from("<a@example.com>")
        mta.rcpt_to("<b@example.net>")
        self.assertEqual(mta.body(b"x" * 140000), [Skip()])
        self.assertEqual(len(recorder.arguments("body")), 1)

    def test_disconnect(self) -> None:
        """disconnect() drops the connection: the filter aborts the open message and closes."""
        recorder = RecordingMilter()
        mta = FakeMTA([recorder])
        mta.connect()
        mta.mail_from("<a@example.com>")
        self.assertEqual(mta.disconnect(), [])
        self.assertFalse(mta.connected)
        self.assertEqual(recorder.names, ["connect", "mail_from", "abort", "reset", "close"])
        self.assertRaises(LocalProtocolError, mta.rcpt_to, "<b@example.net>")

    def test_quit(self) -> None:
        """QUIT gets no reply; the milter closes the transport and the filters."""
        recorder = RecordingMilter()
        mta = FakeMTA([recorder])
        mta.connect()
        self.assertEqual(mta.quit(), [])
        self.assertFalse(mta.connected)
        self.assertFalse(mta.transport.connected)
        self.assertEqual(recorder.names, ["connect", "close"])
        self.assertEqual(mta.commands[-1], Quit())

    def test_negotiation_failure(self) -> None:
        """A milter that cannot work with the offer closes without answering."""

        class NeedsChangeFrom(Milter):
            actions = Action.CHANGE_FROM

        mta = FakeMTA([NeedsChangeFrom], offer=Negotiate(6, Action(0x3F), ALL_PROTOCOL))
        self.assertEqual(mta.negotiate(), [])
        self.assertFalse(mta.connected)
        self.assertIsNone(mta.negotiated)
        self.assertIsNone(mta.message("<a@example.com>", ["<b@example.net>"]).verdict)

    def test_factory_needs_a_clock(self) -> None:
        """A factory running on the real reactor needs an explicit clock."""
        from twisted.internet import reactor

        factory = MilterFactory([RecordingMilter], reactor)
        self.assertRaises(ConfigurationError, FakeMTA, factory)

    def test_connection_limit(self) -> None:
        """A factory at its connection limit refuses the FakeMTA."""
        factory = MilterFactory([RecordingMilter], Clock(), max_connections=1)
        FakeMTA(factory)
        self.assertRaises(ConnectionRefusedError, FakeMTA, factory)

    def test_unknown_family_and_send_raw(self) -> None:
        """CONNECT with family UNKNOWN carries no address; send_raw feeds bytes as they are."""
        recorder = RecordingMilter()
        mta = FakeMTA([recorder])
        mta.connect("[unknown]", family=Family.UNKNOWN)
        self.assertEqual(recorder.arguments("connect"), [Connect("[unknown]")])
        self.assertEqual(mta.send_raw(b"\x00\x00\x00\x01Z"), [])
        self.assertFalse(mta.connected)


class MessageTests(SynchronousTestCase):
    """message() runs a whole message, stops where the MTA would, and applies the changes."""

    def test_modifications_applied(self) -> None:
        """Header, envelope, body and quarantine changes land in the message as Postfix applies them."""
        new_body = b"n" * 70000

        def edit(changes: Changes) -> None:
            changes.insert_header("X-Top", "0", index=0)
            changes.insert_header("X-Second", "2", index=2)  # counts X-Top and the MTA's Received
            changes.change_header("Subject", "changed")
            changes.delete_header("X-Spam")
            changes.change_header("X-Dup", "second", index=2)
            changes.change_header("X-Dup", "beyond", index=5)
            changes.delete_header("X-Missing")
            changes.add_header("X-Added", "folded\n\tline")
            changes.change_from("<new@example.com>", ["SIZE=10"])
            changes.add_recipient("<c@example.org>")
            changes.add_recipient("<d@example.org>", ["NOTIFY=NEVER"])
            changes.delete_recipient("<b@example.net>")
            changes.replace_body(new_body)
            changes.quarantine("held")

        mta = FakeMTA([Everything(changes=edit)])
        headers = [("Subject", "hello"), ("X-Spam", "yes"), ("X-Dup", "1"), ("X-Dup", "2"), ("To", "b")]
        result = mta.message("<a@example.com>", ["<b@example.net>", ("<e@example.net>", ["NOTIFY=DELAY"])],
                             headers, b"old\r\n")
        self.assertTrue(result.delivered)
        self.assertEqual(result.headers, [
            ("X-Top", "0"), ("X-Second", "2"), ("Subject", "changed"), ("X-Dup", "1"), ("X-Dup", "second"),
            ("To", "b"), ("X-Dup", "beyond"), ("X-Added", "folded\n\tline"),
        ])
        self.assertEqual((result.sender, result.sender_args), ("<new@example.com>", ("SIZE=10",)))
        self.assertEqual(result.recipients, [
            ("<e@example.net>", ("NOTIFY=DELAY",)), ("<c@example.org>", ()), ("<d@example.org>", ("NOTIFY=NEVER",)),
        ])
        self.assertEqual(result.body, new_body)
        self.assertEqual(result.quarantined, "held")
        self.assertEqual(
            [type(m) for m in result.modifications].count(ReplaceBody), 2, "a 70000-byte body is two packets"
        )
        self.assertEqual(result.modifications[-1], Quarantine("held"))

    def test_model_rules(self) -> None:
        """Insert 0 and 1 go to the top, change index counts per name, beyond the count appends."""
        headers = [("A", "1"), ("B", "2"), ("b", "3")]
        result = Message(headers, b"body", "<a@example.com>", (), [("<b@example.net>", ())])
        apply_modifications(result, [
            InsertHeader(1, "Top", "t"), InsertHeader(3, "Mid", "m"), InsertHeader(99, "End", "e"),
            ChangeHeader(2, "B", "changed"), ChangeHeader(1, "a", ""), ChangeHeader(3, "b", ""),
            ChangeHeader(4, "b", "appended"), AddHeader("Last", "l"),
            ChangeFrom("<x@example.com>"), AddRecipient("<c@example.org>", ()), DeleteRecipient("b@example.net"),
            ReplaceBody(b"one"), ReplaceBody(b"two"), Quarantine("q"),
        ], mta=MTA.POSTFIX)
        self.assertEqual(result.headers, [
            ("Top", "t"), ("Mid", "m"), ("B", "2"), ("B", "changed"), ("End", "e"), ("b", "appended"), ("Last", "l"),
        ])
        self.assertEqual(result.sender, "<x@example.com>")
        self.assertEqual(result.recipients, [("<c@example.org>", ())])
        self.assertEqual(result.body, b"onetwo")
        self.assertEqual(result.quarantined, "q")

    def test_leading_space(self) -> None:
        """With HEADER_LEADING_SPACE the filter sees and gives the space; the stored result has none."""

        class Spacer(Milter):
            actions = Action.ADD_HEADERS | Action.CHANGE_HEADERS
            leading_space = True
            seen: list[str]

            def header(self, command: Header) -> Result:
                type(self).seen.append(command.value)
                return None

            def end_of_message(self, changes: Changes) -> Result:
                changes.add_header("X-Checked", " yes")
                changes.change_header("Subject", " new")
                return None

        Spacer.seen = []
        mta = FakeMTA([Spacer])
        result = mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "Hello"), ("X-Empty", "")])
        self.assertTrue(mta.leading_space)
        self.assertEqual(Spacer.seen, [" Hello", ""])
        self.assertEqual(result.headers, [("Subject", "new"), ("X-Empty", ""), ("X-Checked", "yes")])

    def test_leading_space_adapted_per_filter(self) -> None:
        """A filter that did not ask for leading space sees values without it next to one that did."""
        spacer = RecordingMilter()
        plain = Everything(changes=[AddHeader("X-Plain", "p")])
        spacer.leading_space = True  # type: ignore[misc]
        mta = FakeMTA([spacer, plain])
        result = mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "Hello")])
        self.assertEqual(spacer.arguments("header"), [Header("Subject", " Hello")])
        self.assertEqual(plain.arguments("header"), [Header("Subject", "Hello")])
        self.assertEqual(result.modifications, [AddHeader("X-Plain", " p")])
        self.assertEqual(result.headers, [("Subject", "Hello"), ("X-Plain", "p")])

    def test_several_messages_per_connection(self) -> None:
        """One connection carries several messages; connect and helo happen once."""
        recorder = Everything(changes=[AddHeader("X-N", "1")])
        mta = FakeMTA([recorder])
        results = [mta.message(f"<a{n}@example.com>", ["<b@example.net>"], [("Subject", str(n))]) for n in range(3)]
        self.assertEqual([r.headers for r in results], [[("Subject", str(n)), ("X-N", "1")] for n in range(3)])
        self.assertEqual(recorder.names.count("connect"), 1)
        self.assertEqual(recorder.names.count("helo"), 1)
        self.assertEqual(recorder.names.count("mail_from"), 3)
        self.assertEqual(recorder.names.count("end_of_message"), 3)
        self.assertTrue(all(r.steps[-1].command == Abort() for r in results))
        self.assertTrue(mta.connected)

    def test_recipient_refusal(self) -> None:
        """A RCPT refusal refuses only that recipient; the message goes on for the others."""
        recorder = RecordingMilter({"rcpt_to": lambda c: Reject() if "bad" in c.address else None})
        mta = FakeMTA([recorder])
        result = mta.message("<a@example.com>", ["<bad@example.net>", "<good@example.net>"])
        self.assertTrue(result.delivered)
        self.assertEqual(result.recipients, [("<good@example.net>", ())])
        self.assertEqual(result.refused_recipients, [("<bad@example.net>", Reject())])
        self.assertEqual(result.responses(RcptTo), [Reject(), Continue()])

    def test_all_recipients_refused(self) -> None:
        """When every recipient is refused the message stops before DATA and is aborted."""
        recorder = RecordingMilter({"rcpt_to": TempFail()})
        mta = FakeMTA([recorder], profile=SENDMAIL)
        result = mta.message("<a@example.com>", ["<x@example.net>", "<y@example.net>"], [("Subject", "s")])
        self.assertEqual(result.verdict, TempFail())
        self.assertFalse(result.delivered)
        self.assertEqual(result.recipients, [])
        self.assertEqual(letters([s.command for s in result.steps]), "O C H M R R A")
        self.assertEqual(recorder.names[-2:], ["abort", "reset"])

    def test_message_refusals_stop(self) -> None:
        """A refusal at MAIL, DATA, a header, EOH or a body chunk ends the message there."""
        for stage, last in (("mail_from", "M"), ("data", "T"), ("header", "L"), ("end_of_headers", "N"),
                            ("body", "B")):
            mta = FakeMTA([RecordingMilter({stage: Reject()})])
            result = mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "s")], b"body\r\n")
            self.assertEqual(result.verdict, Reject(), stage)
            self.assertEqual(letters([s.command for s in result.steps])[-3:], f"{last} A", stage)
            self.assertNotIn(EndOfMessage(), [s.command for s in result.steps], stage)
            self.assertTrue(mta.connected)

    def test_accept_ends_filtering(self) -> None:
        """Accept at RCPT delivers the message unchanged with every recipient; the milter sees no more."""
        recorder = Everything({"rcpt_to": Accept()}, changes=[AddHeader("X-Never", "1")])
        mta = FakeMTA([recorder])
        result = mta.message("<a@example.com>", ["<b@example.net>", "<c@example.net>"], [("Subject", "s")])
        self.assertEqual(result.verdict, Accept())
        self.assertTrue(result.delivered)
        self.assertEqual(result.recipients, [("<b@example.net>", ()), ("<c@example.net>", ())])
        self.assertEqual(result.headers, [("Subject", "s")])
        self.assertNotIn("end_of_message", recorder.names)

    def test_connection_refusal_postfix(self) -> None:
        """Postfix drops the milter socket after a CONNECT refusal; later messages are refused unsent."""
        recorder = RecordingMilter({"connect": Reject()})
        mta = FakeMTA([recorder])
        first = mta.message("<a@example.com>", ["<b@example.net>"])
        self.assertEqual(first.verdict, Reject())
        self.assertFalse(mta.connected)
        self.assertEqual(recorder.names, ["connect", "close"])
        second = mta.message("<a@example.com>", ["<b@example.net>"])
        self.assertEqual((second.verdict, second.steps), (Reject(), []))

    def test_connection_refusal_sendmail(self) -> None:
        """Sendmail sends QUIT to the milter after a HELO refusal."""
        mta = FakeMTA([RecordingMilter({"helo": TempFail()})], profile=SENDMAIL)
        result = mta.message("<a@example.com>", ["<b@example.net>"])
        self.assertEqual(result.verdict, TempFail())
        self.assertEqual(mta.commands[-1], Quit())
        self.assertFalse(mta.connected)

    def test_waits_for_slow_filter(self) -> None:
        """message() waits for a slow end of message, receiving progress packets meanwhile."""
        clock = Clock()

        def slow(changes: Changes) -> Deferred[FilterVerdict | None]:
            changes.add_header("X-Slow", "yes")
            d: Deferred[FilterVerdict | None] = Deferred()
            clock.callLater(25, d.callback, None)
            return d

        class Slow(Milter):
            actions = Action.ADD_HEADERS

            def end_of_message(self, changes: Changes) -> Result:
                return slow(changes)

        mta = FakeMTA([FilterSpec(Slow, timeout=60)], clock=clock)
        result = mta.message("<a@example.com>", ["<b@example.net>"])
        self.assertEqual(result.verdict, Continue())
        self.assertEqual(result.progress_count, 2)
        self.assertEqual(
            result.responses(EndOfMessage), [Progress(), Progress(), AddHeader("X-Slow", "yes"), Continue()]
        )
        self.assertEqual(clock.seconds(), 25)

    def test_hanging_filter_gets_fallback(self) -> None:
        """A filter that never answers gets its fallback when its timeout passes."""
        hang = RecordingMilter({"mail_from": lambda c: Deferred()})
        mta = FakeMTA([FilterSpec(lambda: hang, timeout=7)])
        result = mta.message("<a@example.com>", ["<b@example.net>"])
        self.assertEqual(result.verdict, TempFail())
        self.assertEqual(mta.clock.seconds(), 7)

    def test_milter_gone_mid_message(self) -> None:
        """When the milter drops the connection mid-message, the message has no verdict and nothing more is sent."""
        factory = MilterFactory([RecordingMilter], Clock(), frame_limit=1000)
        mta = FakeMTA(factory)
        result = mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "s"), ("X-Big", "x" * 2000)])
        self.assertIsNone(result.verdict)
        self.assertFalse(result.delivered)
        self.assertFalse(mta.connected)
        self.assertIsInstance(result.steps[-1].command, Header)
        self.assertIsNone(mta.message("<a@example.com>", ["<b@example.net>"]).verdict)

    def test_skip_goes_to_end_of_message(self) -> None:
        """After Skip no more body chunks are sent; end of message follows."""
        recorder = RecordingMilter({"body": Skip()})
        mta = FakeMTA([recorder])
        result = mta.message("<a@example.com>", ["<b@example.net>"], body=b"z" * 200000)
        self.assertTrue(result.delivered)
        self.assertEqual(len(recorder.arguments("body")), 1)
        self.assertIn("end_of_message", recorder.names)


class RecordingMilterTests(SynchronousTestCase):
    """RecordingMilter records what a chain delivers and answers as told."""

    def test_provides_imilter(self) -> None:
        """RecordingMilter provides IMilter."""
        self.assertTrue(verifyObject(IMilter, RecordingMilter()))

    def test_records_calls_with_macros(self) -> None:
        """Every callback is recorded with its argument and the macros visible then."""
        recorder = RecordingMilter()
        mta = FakeMTA([recorder], profile=SENDMAIL)
        mta.message("<a@example.com>", ["<b@example.net>"], [("Subject", "s")], b"b\r\n")
        mta.quit()
        self.assertEqual(recorder.names, [
            "connect", "helo", "mail_from", "rcpt_to", "data", "header", "end_of_headers", "body",
            "end_of_message", "reset", "close",
        ])
        self.assertEqual(recorder.calls[2], Call("mail_from", MailFrom("<a@example.com>"), {
            "i": "5A1BcDeF012345", "mail_mailer": "esmtp", "mail_host": "example.com", "mail_addr": "a@example.com",
            "j": "mx.example.net", "_": "mail.example.com [192.0.2.10]", "daemon_name": "MTA",
            "if_name": "mx.example.net", "if_addr": "192.0.2.1",
        }))
        self.assertIsInstance(recorder.calls[8].argument, Changes)
        self.assertIsNone(recorder.calls[-1].argument)

    def test_class_attribute_configuration(self) -> None:
        """A subclass can set verdicts and changes as class attributes."""

        class Stamper(RecordingMilter):
            verdicts = MappingProxyType({"helo": Continue(), "unknown": Reject()})
            changes = (AddHeader("X-Stamp", "1"), ChangeFrom("<s@example.com>"))

        stamper = Stamper()
        self.assertEqual(stamper.actions, Action.ADD_HEADERS | Action.CHANGE_FROM)
        mta = FakeMTA([stamper])
        mta.connect()
        self.assertEqual(mta.unknown("XFOO"), [Reject()])
        result = mta.message("<a@example.com>", ["<b@example.net>"])
        self.assertEqual(result.sender, "<s@example.com>")
        self.assertEqual(result.headers, [("X-Stamp", "1")])

    def test_changes_callable_needs_actions(self) -> None:
        """With a function for changes, the actions must be given."""
        recorder = RecordingMilter(changes=lambda c: c.add_header("X", "1"), actions=Action.ADD_HEADERS)
        result = FakeMTA([recorder]).message("<a@example.com>", ["<b@example.net>"])
        self.assertEqual(result.headers, [("X", "1")])

    def test_step_record(self) -> None:
        """Each step is kept with its macro packet and responses."""
        mta = FakeMTA([RecordingMilter], profile=SENDMAIL)
        mta.connect()
        step = mta.steps[-1]
        self.assertIsInstance(step, Step)
        self.assertEqual(step.macros, macro_packets(mta, "C")[0])
        self.assertEqual((step.responses, step.verdict, step.sent), ([Continue()], Continue(), True))
        self.assertEqual(mta.replies[-1], Continue())
