"""Tests for the negotiation arithmetic of txmilt.session (PROTOCOL.md §4.6, §4.7)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests import strategies as s
from txmilt.errors import LocalProtocolError, NegotiationError, RemoteProtocolError
from txmilt.messages import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    INTERNAL_PROTOCOL_BITS,
    Action,
    MacroStage,
    Negotiate,
    NegotiateReply,
    ProtocolFlag,
)
from txmilt.session import (
    TRACKING_EVENTS,
    Requirements,
    check_negotiation,
    negotiate,
    offered,
)

SENDMAIL = Negotiate(6, ALL_ACTIONS, ALL_PROTOCOL)
NO_DATA_UNKNOWN = ProtocolFlag.NO_DATA | ProtocolFlag.NO_UNKNOWN
#: Protocol bits the golden filter switches off: none of its callbacks is missing but data/unknown.
GOLDEN_NEEDS = Requirements(actions=Action.ADD_HEADERS, optional=NO_DATA_UNKNOWN)


class NegotiateTests(SynchronousTestCase):
    """negotiate() computes libmilter's reply."""

    def test_golden(self) -> None:
        """The golden filter gets 6/0x1/0x300 from 6/0x1FF/0x1FFFFF (PROTOCOL.md §8 packet 2)."""
        self.assertEqual(
            negotiate(SENDMAIL, GOLDEN_NEEDS), NegotiateReply(6, Action.ADD_HEADERS, ProtocolFlag(0x300))
        )

    def test_version_is_min(self) -> None:
        """The reply version is min(offer, 6)."""
        for offered_version, expected in ((2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 6), (0xFFFFFFFF, 6)):
            reply = negotiate(Negotiate(offered_version, ALL_ACTIONS, ALL_PROTOCOL), Requirements())
            self.assertEqual(reply.version, expected)

    def test_old_versions_refused(self) -> None:
        """Versions below 2 raise NegotiationError naming the version."""
        for version in (0, 1):
            error = self.assertRaises(NegotiationError, negotiate, Negotiate(version), Requirements())
            self.assertIn(f"version {version}", str(error))

    def test_zero_offer_defaults(self) -> None:
        """Offered actions 0 mean 0x0F and protocol 0 means 0x3F (libmilter's defaults)."""
        old = Negotiate(2, Action.NONE, ProtocolFlag.NONE)
        self.assertEqual(offered(old), (Action(0x0F), ProtocolFlag(0x3F)))
        reply = negotiate(old, Requirements(Action(0x0F), optional=ProtocolFlag(0x3FF)))
        self.assertEqual(reply, NegotiateReply(2, Action(0x0F), ProtocolFlag(0x3B)))
        self.assertRaises(NegotiationError, negotiate, old, Requirements(Action.CHANGE_HEADERS))

    def test_golden_on_old_offer(self) -> None:
        """The golden filter gets 2/0x1/0 from an offer of 2/0/0 (observed libmilter reply)."""
        reply = negotiate(Negotiate(2, Action.NONE, ProtocolFlag.NONE), GOLDEN_NEEDS)
        self.assertEqual(reply, NegotiateReply(2, Action.ADD_HEADERS, ProtocolFlag.NONE))

    def test_missing_action(self) -> None:
        """A required action the MTA does not offer raises NegotiationError naming it."""
        offer = Negotiate(6, Action(0x3F), ALL_PROTOCOL)
        error = self.assertRaises(NegotiationError, negotiate, offer, Requirements(Action.CHANGE_FROM))
        self.assertIn("CHANGE_FROM", str(error))
        self.assertIn("0x3f", str(error))
        error = self.assertRaises(
            NegotiationError, negotiate, offer, Requirements(Action.CHANGE_FROM | Action.ADD_RECIPIENTS_WITH_ARGS)
        )
        self.assertIn("CHANGE_FROM, ADD_RECIPIENTS_WITH_ARGS", str(error))

    def test_missing_protocol_bit(self) -> None:
        """A required protocol bit the MTA does not offer raises NegotiationError naming it."""
        offer = Negotiate(2, Action(0x3F), ProtocolFlag(0x7F))
        needs = Requirements(protocol=ProtocolFlag.HEADER_LEADING_SPACE)
        error = self.assertRaises(NegotiationError, negotiate, offer, needs)
        self.assertIn("HEADER_LEADING_SPACE", str(error))

    def test_unnamed_bit(self) -> None:
        """A required bit without a name is reported in hex."""
        error = self.assertRaises(NegotiationError, negotiate, SENDMAIL, Requirements(protocol=ProtocolFlag(0x400000)))
        self.assertIn("0x400000", str(error))

    def test_required_bits_granted(self) -> None:
        """Required bits the MTA offers are granted."""
        needs = Requirements(protocol=ProtocolFlag.HEADER_LEADING_SPACE | ProtocolFlag.RCPT_REJECTED)
        self.assertEqual(negotiate(SENDMAIL, needs).protocol, ProtocolFlag(0x100800))

    def test_optional_bits_dropped(self) -> None:
        """Optional bits the MTA does not offer are left out (NR_HDR on 2/0x3F/0x7F gives 2/0x1/0)."""
        offer = Negotiate(2, Action(0x3F), ProtocolFlag(0x7F))
        needs = Requirements(Action.ADD_HEADERS, optional=ProtocolFlag.NR_HEADER | NO_DATA_UNKNOWN)
        self.assertEqual(negotiate(offer, needs), NegotiateReply(2, Action.ADD_HEADERS, ProtocolFlag.NONE))
        needs = Requirements(optional=ProtocolFlag.NO_BODY | ProtocolFlag.SKIP | ProtocolFlag.NR_BODY)
        self.assertEqual(negotiate(offer, needs).protocol, ProtocolFlag.NO_BODY)
        self.assertEqual(negotiate(SENDMAIL, needs).protocol, needs.optional)

    def test_no_mail_never_granted(self) -> None:
        """NO_MAIL is never granted, optional or required: the session needs MAIL."""
        self.assertEqual(TRACKING_EVENTS, ProtocolFlag.NO_MAIL)
        for needs in (Requirements(optional=ProtocolFlag(0x3FF)), Requirements(protocol=ProtocolFlag.NO_MAIL)):
            reply = negotiate(SENDMAIL, needs)
            self.assertFalse(reply.protocol & ProtocolFlag.NO_MAIL)
        self.assertEqual(negotiate(SENDMAIL, Requirements(optional=ProtocolFlag(0x3FF))).protocol,
                         ProtocolFlag(0x3FB))

    def test_macro_lists(self) -> None:
        """Macro lists add SET_MACRO_LIST and are copied into the reply."""
        macros = {MacroStage.CONNECT: ("j", "{client_addr}"), MacroStage.END_OF_MESSAGE: ("i",)}
        reply = negotiate(SENDMAIL, Requirements(Action.ADD_HEADERS, optional=NO_DATA_UNKNOWN, macros=macros))
        self.assertEqual(reply, NegotiateReply(6, Action(0x101), ProtocolFlag(0x300), macros))

    def test_macro_lists_need_setsymlist(self) -> None:
        """Macro lists from an MTA that does not offer SET_MACRO_LIST raise NegotiationError."""
        offer = Negotiate(6, Action(0xFF), ALL_PROTOCOL)
        needs = Requirements(macros={MacroStage.HELO: ("{tls_version}",)})
        error = self.assertRaises(NegotiationError, negotiate, offer, needs)
        self.assertIn("SET_MACRO_LIST", str(error))

    def test_internal_bits_never_echoed(self) -> None:
        """MDS and other internal bits are neither requested nor echoed."""
        offer = Negotiate(6, ALL_ACTIONS, ALL_PROTOCOL | ProtocolFlag.MDS_1M | ProtocolFlag.MDS_256K)
        self.assertEqual(offered(offer)[1], ALL_PROTOCOL)
        reply = negotiate(offer, Requirements(optional=ProtocolFlag(0xFFFFFFFF)))
        self.assertFalse(reply.protocol & INTERNAL_PROTOCOL_BITS)
        self.assertRaises(NegotiationError, negotiate, offer, Requirements(protocol=ProtocolFlag.MDS_1M))

    def test_all_opts(self) -> None:
        """Asking for every action of a full offer gets them all (libmilter's ALL_OPTS)."""
        self.assertEqual(negotiate(SENDMAIL, Requirements(ALL_ACTIONS)).actions, ALL_ACTIONS)

    @given(
        st.integers(2, 10),
        s.u32.map(Action),
        s.u32.map(ProtocolFlag),
        st.integers(0, 0x1FF).map(Action),
        st.integers(0, 0x1FFFFF).map(ProtocolFlag),
        s.u32.map(ProtocolFlag),
        s.macro_lists(),
    )
    def test_reply_always_legal(
        self,
        version: int,
        offer_actions: Action,
        offer_protocol: ProtocolFlag,
        actions: Action,
        protocol: ProtocolFlag,
        optional: ProtocolFlag,
        macros: dict[MacroStage, tuple[str, ...]],
    ) -> None:
        """negotiate() either refuses or returns a reply the MTA accepts, granting what was required."""
        offer = Negotiate(version, offer_actions, offer_protocol)
        needs = Requirements(actions, protocol, optional, macros)
        try:
            reply = negotiate(offer, needs)
        except NegotiationError:
            granted_actions, granted_protocol = offered(offer)
            wanted = actions | (Action.SET_MACRO_LIST if macros else Action.NONE)
            self.assertTrue(wanted & ~granted_actions or protocol & ~granted_protocol)
            return
        check_negotiation(offer, reply)
        self.assertEqual(reply.version, min(version, 6))
        self.assertEqual(reply.actions & actions, actions)
        self.assertEqual(reply.protocol & protocol, protocol & ~TRACKING_EVENTS)
        self.assertFalse(reply.protocol & ~(protocol | optional))
        self.assertFalse(reply.protocol & (INTERNAL_PROTOCOL_BITS | TRACKING_EVENTS))
        self.assertEqual(dict(reply.macros), macros)


class CheckNegotiationTests(SynchronousTestCase):
    """check_negotiation() accepts what Sendmail accepts."""

    def test_golden(self) -> None:
        """The golden reply is legal."""
        check_negotiation(SENDMAIL, negotiate(SENDMAIL, GOLDEN_NEEDS))

    def test_version(self) -> None:
        """A reply version above the offer or below 2 is refused."""
        for offer_version, reply_version in ((6, 7), (2, 3), (6, 1), (6, 0)):
            offer = Negotiate(offer_version, ALL_ACTIONS, ALL_PROTOCOL)
            error = self.assertRaises(
                RemoteProtocolError, check_negotiation, offer, NegotiateReply(reply_version)
            )
            self.assertIn(f"version {reply_version}", str(error))
        check_negotiation(Negotiate(6), NegotiateReply(2))

    def test_actions(self) -> None:
        """Actions beyond the offer (0 meaning 0x0F) are refused."""
        error = self.assertRaises(
            RemoteProtocolError,
            check_negotiation,
            Negotiate(6, Action(0x3F), ALL_PROTOCOL),
            NegotiateReply(6, Action.CHANGE_FROM),
        )
        self.assertIn("CHANGE_FROM", str(error))
        check_negotiation(Negotiate(2, Action.NONE, ProtocolFlag.NONE), NegotiateReply(2, Action(0x0F)))
        self.assertRaises(
            RemoteProtocolError,
            check_negotiation,
            Negotiate(2, Action.NONE, ProtocolFlag.NONE),
            NegotiateReply(2, Action.CHANGE_HEADERS),
        )

    def test_protocol(self) -> None:
        """Protocol bits beyond the offer are refused; internal bits are ignored."""
        offer = Negotiate(2, ALL_ACTIONS, ProtocolFlag(0x7F))
        error = self.assertRaises(
            RemoteProtocolError, check_negotiation, offer, NegotiateReply(2, protocol=ProtocolFlag.NO_DATA)
        )
        self.assertIn("NO_DATA", str(error))
        check_negotiation(offer, NegotiateReply(2, protocol=ProtocolFlag(0x7F) | ProtocolFlag.MDS_256K))
        check_negotiation(Negotiate(2, Action.NONE, ProtocolFlag.NONE), NegotiateReply(2, protocol=ProtocolFlag(0x3F)))

    def test_macros_need_setsymlist(self) -> None:
        """Macro lists without SET_MACRO_LIST are refused."""
        reply = NegotiateReply(6, Action.NONE, ProtocolFlag.NONE, {MacroStage.CONNECT: ("j",)})
        error = self.assertRaises(RemoteProtocolError, check_negotiation, SENDMAIL, reply)
        self.assertIn("SETSYMLIST", str(error))

    def test_error_type(self) -> None:
        """The error class is chosen by the caller."""
        self.assertRaises(LocalProtocolError, check_negotiation, SENDMAIL, NegotiateReply(7), LocalProtocolError)
