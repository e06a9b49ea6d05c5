"""Conversation with several milters in turn, as Postfix's ``smtpd_milters = a, b``: order, stops, changes.

The one-milter case is FakeMTA's (tests/test_testing.py); these tests drive the
generator directly, answering each instruction from a table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import cast

from twisted.trial.unittest import SynchronousTestCase

from txmilt.conversation import DEFAULT_CLIENT, Answer, Conversation, Instruction, MacroState, Mail, Outcome, Send
from txmilt.messages import (
    Abort,
    Accept,
    AddHeader,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    MacroStage,
    MailFrom,
    NegotiateReply,
    ProtocolFlag,
    Quarantine,
    RcptTo,
    Reject,
    ReplaceBody,
    Skip,
    TempFail,
)
from txmilt.mta import POSTFIX, SENDMAIL, MTAProfile
from txmilt.session import MTASession

MAIL = Mail("<a@example.com>", [("<b@example.net>", ()), ("<c@example.net>", ())], [("Subject", "hi")], b"body\r\n")

Responder = Callable[[int, Command], Answer]


class StubSession:
    """What a Conversation reads of an MTASession: the negotiated flags and whether a message is open."""

    def __init__(self, leading_space: bool = False, in_transaction: bool = False) -> None:
        self.protocol = ProtocolFlag.HEADER_LEADING_SPACE if leading_space else ProtocolFlag.NONE
        self.in_transaction = in_transaction


def conversation(*sessions: StubSession, profile: MTAProfile = POSTFIX) -> Conversation:
    return Conversation(profile, cast(Sequence[MTASession], sessions))


def continuing(milter: int, command: Command) -> Answer:
    return Answer()


def play(talk: Conversation, respond: Responder = continuing, mail: Mail = MAIL) -> tuple[list[Instruction], Outcome]:
    """Run one message, answering each Send with ``respond``; the instructions and the outcome."""
    instructions: list[Instruction] = []
    steps = talk.message(mail)
    try:
        instruction = next(steps)
        while True:
            instructions.append(instruction)
            if isinstance(instruction, Send):
                answer = respond(instruction.milter, instruction.command)
            else:
                answer = Answer(None, connected=False)
            instruction = steps.send(answer)
    except StopIteration as done:
        outcome: Outcome = done.value
        return instructions, outcome


def sent(instructions: Sequence[Instruction]) -> list[str]:
    """``0M 1M ...``: milter number and command letter of each Send; ``0X`` for a hang-up, ``0Q`` after QUIT."""
    out = []
    for instruction in instructions:
        if isinstance(instruction, Send):
            out.append(f"{instruction.milter}{instruction.command.letter}")
        else:
            out.append(f"{instruction.milter}{'Q' if instruction.quit else 'X'}")
    return out


def rule(milter: int, kind: type, answer: Answer) -> Responder:
    """Answer ``answer`` when milter ``milter`` gets a command of type ``kind``; continue otherwise."""

    def respond(number: int, command: Command) -> Answer:
        return answer if number == milter and isinstance(command, kind) else Answer()

    return respond


class OrderTests(SynchronousTestCase):
    """SMTP commands go to each milter in turn; content goes to one milter after the other."""

    def test_two_milters(self) -> None:
        """Envelope commands alternate; milter 1 gets the headers, body and EOM after milter 0's EOM."""
        instructions, outcome = play(conversation(StubSession(), StubSession()))
        self.assertEqual(" ".join(sent(instructions)), (
            "0C 1C 0H 1H 0M 1M 0R 1R 0R 1R 0T 1T"
            " 0L 0N 0B 0E 1L 1N 1B 1E 0A 1A"
        ))
        self.assertEqual(outcome.verdict, Continue())
        self.assertEqual(instructions[0], Send(0, DEFAULT_CLIENT))

    def test_later_milter_sees_earlier_changes(self) -> None:
        """Milter 0's added header and new body reach milter 1; milter 1's changes come on top."""
        seen: list[Command] = []

        def respond(milter: int, command: Command) -> Answer:
            if milter == 1:
                seen.append(command)
            if isinstance(command, EndOfMessage):
                change = AddHeader("X-First", "1") if milter == 0 else AddHeader("X-Second", "2")
                body = (ReplaceBody(b"new body\r\n"),) if milter == 0 else ()
                return Answer(Continue(), (change, *body))
            return Answer()

        _, outcome = play(conversation(StubSession(), StubSession()), respond)
        self.assertIn(Header("X-First", "1"), seen)
        self.assertIn(BodyChunk(b"new body\r\n"), seen)
        message = outcome.message
        self.assertEqual(message.headers, [("Subject", "hi"), ("X-First", "1"), ("X-Second", "2")])
        self.assertEqual(message.body, b"new body\r\n")
        self.assertEqual([m for m, _ in outcome.changes], [0, 1])

    def test_leading_space_per_milter(self) -> None:
        """A milter with leading space gets ' hi' and gives ' x' back, stored as 'x' for the next milter."""
        seen: list[tuple[int, Command]] = []

        def respond(milter: int, command: Command) -> Answer:
            seen.append((milter, command))
            if milter == 0 and isinstance(command, EndOfMessage):
                return Answer(Continue(), (AddHeader("X-Spaced", " x"),))
            return Answer()

        _, outcome = play(conversation(StubSession(leading_space=True), StubSession()), respond)
        headers = [(m, c) for m, c in seen if isinstance(c, Header)]
        self.assertEqual(headers, [
            (0, Header("Subject", " hi")), (1, Header("Subject", "hi")), (1, Header("X-Spaced", "x")),
        ])
        self.assertEqual(outcome.message.headers[-1], ("X-Spaced", "x"))

    def test_skip_ends_body_for_that_milter_only(self) -> None:
        """Skip stops body chunks to milter 0; milter 1 still gets every chunk."""
        talk = conversation(StubSession(), StubSession(), profile=replace(POSTFIX, body_chunk_size=2))
        instructions, _ = play(talk, rule(0, BodyChunk, Answer(Skip())))
        letters = sent(instructions)
        self.assertEqual(letters.count("0B"), 1)
        self.assertEqual(letters.count("1B"), 3)
        self.assertLess(letters.index("0E"), letters.index("1L"))


class StopTests(SynchronousTestCase):
    """Where the MTA stops, and who decided."""

    def test_refusal_stops_at_the_first_milter(self) -> None:
        """A refusal at MAIL by milter 0 never reaches milter 1; both get ABORT from Postfix."""
        instructions, outcome = play(conversation(StubSession(), StubSession()), rule(0, MailFrom, Answer(Reject())))
        self.assertEqual(" ".join(sent(instructions)), "0C 1C 0H 1H 0M 0A 1A")
        self.assertEqual((outcome.verdict, outcome.decided_by), (Reject(), 0))

    def test_sendmail_aborts_only_open_messages(self) -> None:
        """Sendmail sends ABORT only to the milters that still hold the message."""
        talk = conversation(StubSession(in_transaction=True), StubSession(), profile=SENDMAIL)
        instructions, _ = play(talk, rule(1, EndOfHeaders, Answer(TempFail())))
        self.assertEqual(sent(instructions)[-2:], ["1N", "0A"])

    def test_recipient_refused_by_second_milter(self) -> None:
        """Milter 1 refusing a RCPT refuses that recipient only; the message goes on."""

        def respond(milter: int, command: Command) -> Answer:
            refused = milter == 1 and isinstance(command, RcptTo) and command.address == "<b@example.net>"
            return Answer(Reject()) if refused else Answer()

        _, outcome = play(conversation(StubSession(), StubSession()), respond)
        self.assertEqual(outcome.verdict, Continue())
        self.assertEqual(outcome.refused_recipients, [("<b@example.net>", Reject())])
        self.assertEqual(outcome.message.recipients, [("<c@example.net>", ())])

    def test_every_recipient_refused(self) -> None:
        """With every recipient refused the message ends with the last refusal, by the milter that gave it."""
        instructions, outcome = play(conversation(StubSession(), StubSession()), rule(1, RcptTo, Answer(TempFail())))
        self.assertEqual((outcome.verdict, outcome.decided_by), (TempFail(), 1))
        self.assertNotIn("0T", sent(instructions))

    def test_end_of_message_refusal_after_changes(self) -> None:
        """Milter 1 rejecting at EOM decides, whatever milter 0 changed."""

        def respond(milter: int, command: Command) -> Answer:
            if isinstance(command, EndOfMessage):
                return Answer(Continue(), (Quarantine("held"),)) if milter == 0 else Answer(Reject())
            return Answer()

        _, outcome = play(conversation(StubSession(), StubSession()), respond)
        self.assertEqual((outcome.verdict, outcome.decided_by), (Reject(), 1))
        self.assertFalse(outcome.delivered)

    def test_milter_gone(self) -> None:
        """A milter that closes the connection ends the message without a verdict; it gets nothing more."""
        instructions, outcome = play(
            conversation(StubSession(), StubSession()), rule(1, Data, Answer(None, connected=False))
        )
        self.assertIsNone(outcome.verdict)
        self.assertEqual(sent(instructions)[-2:], ["1T", "0A"])


class AcceptTests(SynchronousTestCase):
    """Accept retires one milter; the message is accepted once every milter has."""

    def test_accept_retires_that_milter(self) -> None:
        """Milter 0 accepting at MAIL gets nothing more for the message; milter 1 filters on."""
        instructions, outcome = play(conversation(StubSession(), StubSession()), rule(0, MailFrom, Answer(Accept())))
        later = sent(instructions)[sent(instructions).index("0M") + 1:]
        self.assertEqual([s for s in later if s.startswith("0")], ["0A"])
        self.assertIn("1E", later)
        self.assertEqual(outcome.verdict, Continue())

    def test_everyone_accepts(self) -> None:
        """When both milters accept at the first RCPT, the message is accepted with every recipient."""
        def respond(milter: int, command: Command) -> Answer:
            return Answer(Accept()) if isinstance(command, RcptTo) else Answer()

        instructions, outcome = play(conversation(StubSession(), StubSession()), respond)
        self.assertEqual(outcome.verdict, Accept())
        self.assertEqual(len(outcome.message.recipients), 2)
        self.assertNotIn("0T", sent(instructions))

    def test_accept_at_connect_retires_for_the_session(self) -> None:
        """Postfix drops a milter that accepted at CONNECT; the next message goes to the other one only."""
        talk = conversation(StubSession(), StubSession())
        first, _ = play(talk, rule(0, Connect, Answer(Accept())))
        self.assertEqual(sent(first)[:3], ["0C", "0X", "1C"])
        second, outcome = play(talk)
        self.assertTrue(all(s.startswith("1") for s in sent(second)))
        self.assertEqual(outcome.verdict, Continue())

    def test_refusal_at_helo_decides_the_session(self) -> None:
        """A HELO refusal by milter 1 decides every message of the session; Sendmail QUITs that milter."""
        talk = conversation(StubSession(), StubSession(), profile=SENDMAIL)
        first, outcome = play(talk, rule(1, Helo, Answer(Reject())))
        self.assertEqual(sent(first)[-1], "1Q")
        self.assertEqual((outcome.verdict, outcome.decided_by), (Reject(), 1))
        second, again = play(talk)
        self.assertEqual((second, again.verdict), ([], Reject()))


class MacroStateTests(SynchronousTestCase):
    """MacroState: the values and packets FakeMTA and txmilt-check send."""

    def test_requested_lists_per_milter(self) -> None:
        """One session's values; each milter gets the list it asked for."""
        state = MacroState(POSTFIX, {"{daemon_name}": "edge"})
        state.track(DEFAULT_CLIENT)
        asked = NegotiateReply(macros={MacroStage.CONNECT: ("{client_addr}", "{daemon_name}")})
        packet = state.packet(DEFAULT_CLIENT, asked)
        self.assertEqual(packet.pairs if packet else None, (("{client_addr}", "192.0.2.10"), ("{daemon_name}", "edge")))
        default = state.packet(DEFAULT_CLIENT, NegotiateReply())
        self.assertEqual(dict(default.pairs if default else ())["_"], "mail.example.com [192.0.2.10]")

    def test_restore(self) -> None:
        """restore() goes back to a snapshot: the queue id is hidden again before the first RCPT."""
        state = MacroState(POSTFIX)
        saved = state.snapshot()
        self.assertIsNone(state.value("i"))
        state.prepare(RcptTo("<b@example.net>"), None)
        self.assertEqual(state.value("i"), "4XkZ1T0abcz")
        state.restore(saved)
        self.assertIsNone(state.value("i"))

    def test_abort_has_no_packet(self) -> None:
        """Commands without a macro stage (ABORT) get no packet."""
        self.assertIsNone(MacroState(POSTFIX).packet(Abort(), None))
