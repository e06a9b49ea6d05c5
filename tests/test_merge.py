"""Tests for the chain's pure merges: verdicts, requirements and end-of-message changes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from txmilt.merge import ChangeMerger, merge_changes, merge_requirements, merge_verdicts
from txmilt.messages import (
    ALL_ACTIONS,
    MAX_BODY_CHUNK,
    Accept,
    Action,
    AddHeader,
    AddRecipient,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Continue,
    Data,
    DeleteRecipient,
    Discard,
    EndOfHeaders,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    Modification,
    ProtocolFlag,
    Quarantine,
    RcptTo,
    Reject,
    ReplaceBody,
    Skip,
    TempFail,
    Unknown,
)
from txmilt.milter import Changes, FilterVerdict
from txmilt.mta import MTA
from txmilt.session import NO_FLAG, NO_REPLY_FLAG, Requirements

# ------------------------------------------------------------------- verdicts

refusals = st.sampled_from([
    Reject(), TempFail(), Discard(), Reject("no thanks"), TempFail("later", code=421, status="4.3.2"),
])
passes = st.sampled_from([Continue(), Accept(), Skip()])
verdicts = st.one_of(refusals, passes)


class MergeVerdictsTests(SynchronousTestCase):
    def test_nothing(self) -> None:
        """No verdicts at all merge to Continue."""
        self.assertEqual(merge_verdicts([]), Continue())

    def test_passes(self) -> None:
        """Continue, Accept and Skip are per filter: together they merge to Continue."""
        self.assertEqual(merge_verdicts([Continue(), Accept(), Skip()]), Continue())
        self.assertEqual(merge_verdicts([Accept(), Accept()]), Continue())
        self.assertEqual(merge_verdicts([Skip()]), Continue())

    def test_first_refusal_in_order(self) -> None:
        """The first refusal in filter order is the answer, even when a harsher one follows."""
        self.assertEqual(merge_verdicts([Continue(), TempFail(), Reject()]), TempFail())
        self.assertEqual(merge_verdicts([Discard(), Reject()]), Discard())
        self.assertEqual(merge_verdicts([Accept(), Reject(), Discard()]), Reject())

    def test_custom_reply_kept(self) -> None:
        """A refusal with its own SMTP reply is returned as it is."""
        custom = Reject(("first line", "second line"), code=554, status="5.7.0")
        self.assertIs(merge_verdicts([Continue(), custom, Reject()]), custom)

    @given(st.lists(verdicts, max_size=8))
    def test_first_refusal_property(self, given_verdicts: list[FilterVerdict]) -> None:
        """merge_verdicts returns the first refusal (the same object), else Continue."""
        merged = merge_verdicts(given_verdicts)
        firsts = [v for v in given_verdicts if isinstance(v, Reject | TempFail | Discard)]
        if firsts:
            self.assertIs(merged, firsts[0])
        else:
            self.assertEqual(merged, Continue())

    @given(st.lists(passes, max_size=5), refusals, st.lists(verdicts, max_size=5))
    def test_later_verdicts_ignored(
        self, before: list[FilterVerdict], refusal: FilterVerdict, after: list[FilterVerdict]
    ) -> None:
        """Whatever follows the first refusal does not change the answer."""
        self.assertIs(merge_verdicts([*before, refusal, *after]), refusal)


# --------------------------------------------------------------- requirements

Member = tuple[Requirements, frozenset[type], frozenset[type]]
EVENTS: tuple[type, ...] = (Connect, Helo, MailFrom, RcptTo, Data, Header, EndOfHeaders, BodyChunk, Unknown)


def member(
    actions: Action = Action.NONE,
    protocol: ProtocolFlag = ProtocolFlag.NONE,
    macros: dict[MacroStage, tuple[str, ...]] | None = None,
    receives: Sequence[type] = (),
    silent: Sequence[type] = (),
) -> Member:
    return Requirements(actions, protocol, macros=macros or {}), frozenset(receives), frozenset(silent)


members = st.lists(
    st.builds(
        member,
        actions=st.sampled_from(list(Action)).map(Action),
        receives=st.lists(st.sampled_from(EVENTS), unique=True),
        silent=st.lists(st.sampled_from(EVENTS), unique=True),
    ).map(lambda m: (m[0], m[1], m[2] & m[1])),
    max_size=4,
)


class MergeRequirementsTests(SynchronousTestCase):
    def test_actions_union(self) -> None:
        """The chain asks for the union of the filters' actions."""
        merged = merge_requirements([member(Action.ADD_HEADERS), member(Action.CHANGE_FROM), member()])
        self.assertEqual(merged.actions, Action.ADD_HEADERS | Action.CHANGE_FROM)

    def test_protocol_union(self) -> None:
        """Protocol options any filter needs are needed by the chain."""
        merged = merge_requirements([
            member(protocol=ProtocolFlag.HEADER_LEADING_SPACE), member(protocol=ProtocolFlag.RCPT_REJECTED),
        ])
        self.assertEqual(merged.protocol, ProtocolFlag.HEADER_LEADING_SPACE | ProtocolFlag.RCPT_REJECTED)

    def test_unwanted_events_off(self) -> None:
        """An event nobody receives is switched off; one any filter receives stays on."""
        merged = merge_requirements([member(receives=[Header]), member(receives=[RcptTo, Header])])
        for command, flag in NO_FLAG.items():
            if command in (Header, RcptTo):
                self.assertFalse(merged.optional & flag, command)
            else:
                self.assertTrue(merged.optional & flag, command)

    def test_observed_events_on(self) -> None:
        """An event the chain itself observes stays on though no filter receives it."""
        merged = merge_requirements([member(), member()], observe=[Header])
        self.assertFalse(merged.optional & ProtocolFlag.NO_HEADERS)
        self.assertTrue(merged.optional & ProtocolFlag.NR_HEADER)

    def test_no_reply_needs_everyone(self) -> None:
        """A no-reply flag is asked for only if every filter receiving the event is silent on it."""
        merged = merge_requirements([
            member(receives=[Header, RcptTo], silent=[Header, RcptTo]),
            member(receives=[Header], silent=[]),
            member(receives=[Helo], silent=[Helo]),
        ])
        self.assertTrue(merged.optional & ProtocolFlag.NR_RCPT)
        self.assertFalse(merged.optional & ProtocolFlag.NR_HEADER)
        self.assertTrue(merged.optional & ProtocolFlag.NR_HELO)
        self.assertFalse(merged.optional & ProtocolFlag.NO_HELO)

    def test_no_reply_for_unreceived(self) -> None:
        """An event no filter receives needs no reply either."""
        merged = merge_requirements([member(receives=[Helo])])
        self.assertTrue(merged.optional & ProtocolFlag.NR_MAIL)
        self.assertFalse(merged.optional & ProtocolFlag.NR_HELO)

    def test_macros_union_in_order(self) -> None:
        """Macro requests are unioned per stage, in filter order, without duplicates."""
        merged = merge_requirements([
            member(macros={MacroStage.CONNECT: ("j", "{client_addr}"), MacroStage.END_OF_MESSAGE: ("i",)}),
            member(macros={MacroStage.CONNECT: ("{client_addr}", "{daemon_name}", "j")}),
            member(macros={MacroStage.MAIL: ("{auth_authen}",), MacroStage.END_OF_MESSAGE: ("i",)}),
        ])
        self.assertEqual(dict(merged.macros), {
            MacroStage.CONNECT: ("j", "{client_addr}", "{daemon_name}"),
            MacroStage.END_OF_MESSAGE: ("i",),
            MacroStage.MAIL: ("{auth_authen}",),
        })

    def test_skip_for_body_readers(self) -> None:
        """SKIP is asked for exactly when some filter reads the body."""
        self.assertTrue(merge_requirements([member(), member(receives=[BodyChunk])]).optional & ProtocolFlag.SKIP)
        self.assertFalse(merge_requirements([member(receives=[Header])]).optional & ProtocolFlag.SKIP)

    def test_rejected_recipients_need_rcpt_mailer(self) -> None:
        """With rejected recipients and an RCPT macro list, {rcpt_mailer} is added to tell them apart."""
        merged = merge_requirements([
            member(protocol=ProtocolFlag.RCPT_REJECTED, receives=[RcptTo]),
            member(macros={MacroStage.RCPT: ("{rcpt_addr}",)}, receives=[RcptTo]),
        ])
        self.assertEqual(merged.macros[MacroStage.RCPT], ("{rcpt_addr}", "{rcpt_mailer}"))

    def test_rcpt_mailer_not_doubled(self) -> None:
        """A {rcpt_mailer} already requested is not added again."""
        merged = merge_requirements([
            member(protocol=ProtocolFlag.RCPT_REJECTED, macros={MacroStage.RCPT: ("{rcpt_mailer}",)}),
        ])
        self.assertEqual(merged.macros[MacroStage.RCPT], ("{rcpt_mailer}",))

    def test_rcpt_default_list_left_alone(self) -> None:
        """Without an RCPT macro list the MTA's default (which has {rcpt_mailer}) is left alone."""
        merged = merge_requirements([member(protocol=ProtocolFlag.RCPT_REJECTED, receives=[RcptTo])])
        self.assertNotIn(MacroStage.RCPT, merged.macros)

    def test_no_filters(self) -> None:
        """A chain without filters switches every event off and needs nothing."""
        merged = merge_requirements([])
        self.assertEqual(merged.actions, Action.NONE)
        for flag in NO_FLAG.values():
            self.assertTrue(merged.optional & flag)

    @given(members)
    def test_properties(self, given_members: list[Member]) -> None:
        """Actions are the union; an event is off iff nobody wants it; NR iff it is sent and all receivers agree."""
        merged = merge_requirements(given_members)
        union = Action.NONE
        for needs, _, _ in given_members:
            union |= needs.actions
        self.assertEqual(merged.actions, union)
        for command in EVENTS:
            receivers = [(r, s) for _, r, s in given_members if command in r]
            self.assertEqual(bool(merged.optional & NO_FLAG[command]), not receivers, command)
            kept = bool(receivers) or command is MailFrom  # MAIL is never switched off (TRACKING_EVENTS)
            self.assertEqual(
                bool(merged.optional & NO_REPLY_FLAG[command]),
                kept and all(command in s for _, s in receivers),
                command,
            )
        reads_body = any(BodyChunk in r for _, r, _ in given_members)
        self.assertEqual(bool(merged.optional & ProtocolFlag.SKIP), reads_body)


# -------------------------------------------------------------------- changes


def recorder() -> Changes:
    return Changes(ALL_ACTIONS)


def mods(*edits: Modification) -> list[Modification]:
    return list(edits)


class MergeChangesTests(SynchronousTestCase):
    def test_nothing(self) -> None:
        """No contributions give no modifications and no warnings."""
        merged = merge_changes([("Subject", "hi")], [])
        self.assertEqual((merged.modifications, merged.warnings), ([], []))

    def test_filter_order(self) -> None:
        """Edits are applied in filter order; sender, body and quarantine come after all edits."""
        first, second = recorder(), recorder()
        first.add_header("X-First", "1")
        first.change_from("<new@example.com>")
        first.add_recipient("<r@example.com>")
        second.add_header("X-Second", "2")
        second.delete_recipient("<old@example.com>")
        second.replace_body(b"body\r\n")
        second.quarantine("held")
        merged = merge_changes([], [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(
            AddHeader("X-First", "1"),
            AddRecipient("<r@example.com>"),
            AddHeader("X-Second", "2"),
            DeleteRecipient("<old@example.com>"),
            ChangeFrom("<new@example.com>"),
            ReplaceBody(b"body\r\n"),
            Quarantine("held"),
        ))
        self.assertEqual(merged.warnings, [])

    def test_insert_above_shifts_change(self) -> None:
        """Filter 1 inserts X-A at the top; filter 2's change of the original X-A #1 becomes #2."""
        first, second = recorder(), recorder()
        first.insert_header("X-A", "new", index=0)
        second.change_header("X-A", "changed", index=1)
        merged = merge_changes([("Subject", "hi"), ("X-A", "old")], [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(InsertHeader(0, "X-A", "new"), ChangeHeader(2, "X-A", "changed")))
        self.assertEqual(merged.warnings, [])

    def test_insert_case_insensitive(self) -> None:
        """Header names are compared without case when rebasing."""
        first, second = recorder(), recorder()
        first.insert_header("x-a", "new", index=1)
        second.delete_header("X-A", index=1)
        merged = merge_changes([("X-A", "old")], [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(InsertHeader(1, "x-a", "new"), ChangeHeader(2, "X-A", "")))

    def test_two_deletes_rebased(self) -> None:
        """Filter 1 deletes Received #1 and filter 2 deletes Received #2: the second becomes #1."""
        first, second = recorder(), recorder()
        first.delete_header("Received", index=1)
        second.delete_header("Received", index=2)
        headers = [("Received", "from a"), ("Received", "from b"), ("Subject", "hi")]
        merged = merge_changes(headers, [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(ChangeHeader(1, "Received", ""), ChangeHeader(1, "Received", "")))
        self.assertEqual(merged.warnings, [])

    def test_delete_then_change_of_later_header(self) -> None:
        """A change of header #3 after an earlier filter deleted #1 is sent as #2."""
        first, second = recorder(), recorder()
        first.delete_header("Received", index=1)
        second.change_header("Received", "from z", index=3)
        headers = [("Received", "a"), ("Received", "b"), ("Received", "c")]
        merged = merge_changes(headers, [("one", first), ("two", second)])
        self.assertEqual(
            merged.modifications, mods(ChangeHeader(1, "Received", ""), ChangeHeader(2, "Received", "from z"))
        )

    def test_insert_after_deleted_header(self) -> None:
        """Filter 2's insert right after a header filter 1 deleted lands where that header was."""
        first, second = recorder(), recorder()
        first.delete_header("B")
        second.insert_header("X-New", "v", index=3)  # [hidden, A, B | C]
        headers = [("A", "1"), ("B", "2"), ("C", "3")]
        merged = merge_changes(headers, [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(ChangeHeader(1, "B", ""), InsertHeader(2, "X-New", "v")))

    def test_insert_before_deleted_header(self) -> None:
        """Filter 2's insert just before a header filter 1 deleted is anchored to the next one left."""
        first, second = recorder(), recorder()
        first.delete_header("B")
        second.insert_header("X-New", "v", index=2)  # [hidden, A | B, C]
        headers = [("A", "1"), ("B", "2"), ("C", "3")]
        merged = merge_changes(headers, [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(ChangeHeader(1, "B", ""), InsertHeader(2, "X-New", "v")))

    def test_insert_after_last_deleted(self) -> None:
        """An insert after a deleted last header is appended."""
        first, second = recorder(), recorder()
        first.delete_header("B")
        second.insert_header("X-New", "v", index=2)  # [hidden, A | B]
        merged = merge_changes([("A", "1"), ("B", "2")], [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(ChangeHeader(1, "B", ""), InsertHeader(2, "X-New", "v")))

    def test_insert_shifted_by_earlier_insert(self) -> None:
        """An insert below an earlier filter's insert moves down by one."""
        first, second = recorder(), recorder()
        first.insert_header("X-One", "1", index=1)
        second.insert_header("X-Two", "2", index=2)  # after A in filter 2's view
        merged = merge_changes([("A", "a"), ("B", "b")], [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(InsertHeader(1, "X-One", "1"), InsertHeader(3, "X-Two", "2")))

    def test_two_inserts_at_top(self) -> None:
        """Two filters inserting at the very top keep filter order above the MTA's hidden header."""
        first, second = recorder(), recorder()
        first.insert_header("X-One", "1", index=0)
        second.insert_header("X-Two", "2", index=0)
        merged = merge_changes([("A", "a")], [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(InsertHeader(0, "X-One", "1"), InsertHeader(1, "X-Two", "2")))

    def test_insert_past_end_stays_append(self) -> None:
        """An insert past the end of the list still appends after rebasing."""
        first, second = recorder(), recorder()
        first.delete_header("A")
        second.insert_header("X-Two", "2", index=50)
        merged = merge_changes([("A", "a"), ("B", "b")], [("one", first), ("two", second)])
        self.assertEqual(len(merged.modifications), 2)
        inserted = merged.modifications[1]
        assert isinstance(inserted, InsertHeader)
        self.assertGreaterEqual(inserted.index, 2)

    def test_same_header_changed_twice(self) -> None:
        """Two filters changing the same header: the later wins and a warning names both."""
        first, second = recorder(), recorder()
        first.change_header("Subject", "one")
        second.change_header("Subject", "two")
        merged = merge_changes([("Subject", "hi")], [("alpha", first), ("beta", second)])
        self.assertEqual(
            merged.modifications, mods(ChangeHeader(1, "Subject", "one"), ChangeHeader(1, "Subject", "two"))
        )
        self.assertEqual(len(merged.warnings), 1)
        self.assertIn("alpha", merged.warnings[0])
        self.assertIn("beta", merged.warnings[0])

    def test_one_filter_changing_twice(self) -> None:
        """A filter changing its own header twice is no conflict and gives no warning."""
        first = recorder()
        first.change_header("Subject", "one")
        first.change_header("Subject", "two")
        merged = merge_changes([("Subject", "hi")], [("alpha", first), ("beta", recorder())])
        self.assertEqual(merged.warnings, [])
        self.assertEqual(len(merged.modifications), 2)

    def test_change_of_deleted_header_ignored(self) -> None:
        """A change of a header an earlier filter deleted is dropped, with a warning naming both."""
        first, second = recorder(), recorder()
        first.delete_header("Subject")
        second.change_header("Subject", "two")
        second.add_header("X-Two", "2")
        merged = merge_changes([("Subject", "hi")], [("alpha", first), ("beta", second)])
        self.assertEqual(merged.modifications, mods(ChangeHeader(1, "Subject", ""), AddHeader("X-Two", "2")))
        self.assertEqual(len(merged.warnings), 1)
        self.assertIn("alpha", merged.warnings[0])
        self.assertIn("beta", merged.warnings[0])

    def test_delete_after_change(self) -> None:
        """A delete of a header an earlier filter changed is sent, with a warning."""
        first, second = recorder(), recorder()
        first.change_header("Subject", "one")
        second.delete_header("Subject")
        merged = merge_changes([("Subject", "hi")], [("alpha", first), ("beta", second)])
        self.assertEqual(merged.modifications, mods(ChangeHeader(1, "Subject", "one"), ChangeHeader(1, "Subject", "")))
        self.assertEqual(len(merged.warnings), 1)

    def test_change_beyond_rebased_after_add(self) -> None:
        """A change of a missing header (which appends) still appends after an earlier filter added one."""
        first, second = recorder(), recorder()
        first.add_header("X-A", "added")
        second.change_header("X-A", "appended", index=1)
        merged = merge_changes([("Subject", "hi")], [("one", first), ("two", second)])
        self.assertEqual(merged.modifications, mods(AddHeader("X-A", "added"), ChangeHeader(2, "X-A", "appended")))

    def test_change_far_beyond_counts_as_append(self) -> None:
        """A change of a missing header #3 appends one header, which later filters see shift their indices."""
        first, second = recorder(), recorder()
        first.change_header("X-A", "appended", index=3)
        second.insert_header("X-B", "b", index=1)
        second.change_header("X-A", "again", index=2)  # filter 2's #2 is still missing, so it appends too
        merged = merge_changes([], [("one", first), ("two", second)])
        self.assertEqual(merged.modifications[0], ChangeHeader(3, "X-A", "appended"))
        last = merged.modifications[2]
        assert isinstance(last, ChangeHeader)
        self.assertGreater(last.index, 1)

    def test_two_sender_changes(self) -> None:
        """Two sender changes: the later filter's is sent, once, and a warning names both."""
        first, second = recorder(), recorder()
        first.change_from("<one@example.com>")
        second.change_from("<two@example.com>", ["RET=HDRS"])
        merged = merge_changes([], [("alpha", first), ("beta", second)])
        self.assertEqual(merged.modifications, mods(ChangeFrom("<two@example.com>", ("RET=HDRS",))))
        self.assertEqual(len(merged.warnings), 1)
        self.assertIn("alpha", merged.warnings[0])
        self.assertIn("beta", merged.warnings[0])
        self.assertIn("sender", merged.warnings[0])

    def test_two_body_replacements(self) -> None:
        """Two body replacements: the later filter's body is sent and a warning names both."""
        first, second = recorder(), recorder()
        first.replace_body(b"one\r\n")
        second.replace_body(b"two\r\n")
        merged = merge_changes([], [("alpha", first), ("beta", second)])
        self.assertEqual(merged.modifications, mods(ReplaceBody(b"two\r\n")))
        self.assertEqual(len(merged.warnings), 1)
        self.assertIn("alpha", merged.warnings[0])
        self.assertIn("beta", merged.warnings[0])
        self.assertIn("body", merged.warnings[0])

    def test_two_quarantines(self) -> None:
        """Two quarantine reasons: the later one is sent, with a warning."""
        first, second = recorder(), recorder()
        first.quarantine("one")
        second.quarantine("two")
        merged = merge_changes([], [("alpha", first), ("beta", second)])
        self.assertEqual(merged.modifications, mods(Quarantine("two")))
        self.assertEqual(len(merged.warnings), 1)

    def test_body_split(self) -> None:
        """A long body is cut into packets of at most 65535 bytes; an empty one is one empty packet."""
        first = recorder()
        first.replace_body(b"x" * (MAX_BODY_CHUNK + 10))
        merged = merge_changes([], [("one", first)])
        self.assertEqual(merged.modifications, mods(ReplaceBody(b"x" * MAX_BODY_CHUNK), ReplaceBody(b"x" * 10)))
        empty = recorder()
        empty.replace_body(b"")
        self.assertEqual(merge_changes([], [("one", empty)]).modifications, mods(ReplaceBody(b"")))

    def test_same_name_twice(self) -> None:
        """Two chain members with the same name are still told apart."""
        first, second = recorder(), recorder()
        first.change_header("Subject", "one")
        second.change_header("Subject", "two")
        merged = merge_changes([("Subject", "hi")], [("same", first), ("same", second)])
        self.assertEqual(len(merged.warnings), 1)


# ---------------------------------------------- a model MTA for the properties


@dataclass(eq=False)
class Line:
    """One header in the model MTA's list; ``origin`` names where it came from."""

    origin: str
    name: str
    value: str


def apply(lines: list[Line], edits: Sequence[Modification]) -> list[Line]:
    """Apply header edits as both MTAs do (PROTOCOL.md §3.3), on copies of ``lines``."""
    out = [Line(line.origin, line.name, line.value) for line in lines]
    for edit in edits:
        if isinstance(edit, AddHeader):
            out.append(Line(edit.value, edit.name, edit.value))
        elif isinstance(edit, InsertHeader):
            out.insert(min(edit.index, len(out)), Line(edit.value, edit.name, edit.value))
        elif isinstance(edit, ChangeHeader):
            same = [line for line in out if line.name and line.name.lower() == edit.name.lower()]
            index = max(edit.index, 1)
            if index <= len(same):
                if edit.value:
                    same[index - 1].value = edit.value
                else:
                    out.remove(same[index - 1])
            elif edit.value:
                out.append(Line(edit.value, edit.name, edit.value))
    return out


NAMES = ["Received", "received", "X-A", "Subject"]


@st.composite
def scenarios(draw: st.DrawFn, max_filters: int = 3) -> tuple[list[Line], list[Changes], list[list[Line]]]:
    """Original headers, each filter's Changes, and each filter's own view after its changes."""
    names = draw(st.lists(st.sampled_from(NAMES), max_size=6))
    original = [Line("hidden", "", ""), *(Line(f"orig{n}", name, f"orig{n}") for n, name in enumerate(names))]
    contributions: list[Changes] = []
    views: list[list[Line]] = []
    for number in range(draw(st.integers(1, max_filters))):
        changes = recorder()
        view = apply(original, [])
        for step in range(draw(st.integers(0, 5))):
            value = f"f{number}s{step}"
            kind = draw(st.sampled_from(["insert", "add", "change", "delete"]))
            targets = [line for line in view if line.name]
            if kind in ("change", "delete") and targets:
                target = draw(st.sampled_from(targets))
                same = [line for line in targets if line.name.lower() == target.name.lower()]
                name = draw(st.sampled_from([target.name, target.name.upper()]))
                changes.change_header(name, value if kind == "change" else "", index=same.index(target) + 1)
            elif kind == "add":
                changes.add_header(draw(st.sampled_from(NAMES)), value)
            else:
                changes.insert_header(draw(st.sampled_from(NAMES)), value, index=draw(st.integers(0, len(view) + 1)))
            view = apply(view, changes.edits[-1:])
        contributions.append(changes)
        views.append(view)
    return original, contributions, views


class MergeChangesPropertyTests(SynchronousTestCase):
    @given(scenarios(max_filters=1), st.booleans(), st.booleans())
    def test_single_filter_unchanged(
        self, scenario: tuple[list[Line], list[Changes], list[list[Line]]], sender: bool, body: bool
    ) -> None:
        """With a single filter merge_changes returns its edits unchanged and no warnings."""
        original, (changes,), _ = scenario
        if sender:
            changes.change_from("<s@example.com>")
        if body:
            changes.replace_body(b"b\r\n")
        merged = merge_changes([(line.name, line.value) for line in original[1:]], [("only", changes)])
        tail: list[Modification] = []
        if changes.sender is not None:
            tail.append(changes.sender)
        if changes.body is not None:
            tail.append(ReplaceBody(changes.body))
        self.assertEqual(merged.modifications, [*changes.edits, *tail])
        self.assertEqual(merged.warnings, [])

    @given(scenarios())
    def test_each_filter_gets_what_it_meant(self, scenario: tuple[list[Line], list[Changes], list[list[Line]]]) -> None:
        """Applied by a model MTA, the merged edits give every filter the headers it meant, in its order."""
        # Each header a filter added or changed has that filter's value (a later filter wins a
        # conflict, a deletion wins over changes); each filter's headers stand in the order it saw.
        original, contributions, views = scenario
        merged = merge_changes(
            [(line.name, line.value) for line in original[1:]],
            [(f"f{number}", changes) for number, changes in enumerate(contributions)],
        )
        result = apply(original, merged.modifications)
        final = {line.origin: line.value for line in result}
        expected: dict[str, str] = {}
        for line in original:
            states = [{v.origin: v.value for v in view}.get(line.origin) for view in views]
            if None in states:
                continue
            changed = [value for value in states if value is not None and value != line.value]
            expected[line.origin] = changed[-1] if changed else line.value
        originals = {line.origin for line in original}
        for view in views:
            for line in view:
                if line.origin not in originals:
                    expected[line.origin] = line.value
        self.assertEqual(final, expected)
        for view in views:
            mine = [line.origin for line in view if line.origin in final]
            kept = set(mine)
            self.assertEqual([line.origin for line in result if line.origin in kept], mine)


class SendmailPlacementTests(SynchronousTestCase):
    def test_rebased_around_an_added_header(self) -> None:
        """Under Sendmail an added X-Dup lands first, so a later filter's change of the original #1 goes out as #2."""
        first, second = recorder(), recorder()
        first.add_header("X-Dup", "added")
        second.change_header("X-Dup", "changed", 1)
        headers = [("Subject", "s"), ("X-Dup", "original")]
        postfix = merge_changes(headers, [("first", first), ("second", second)])
        self.assertEqual(postfix.modifications, [AddHeader("X-Dup", "added"), ChangeHeader(1, "X-Dup", "changed")])
        merger = ChangeMerger(headers, MTA.SENDMAIL)
        merger.add("first", first)
        merger.add("second", second)
        self.assertEqual(
            merger.result().modifications, [AddHeader("X-Dup", "added"), ChangeHeader(2, "X-Dup", "changed")]
        )
        self.assertEqual(merger.headers(), [("Subject", "s"), ("X-Dup", "added"), ("X-Dup", "changed")])
