"""The Python examples of README.rst, run as written (the serving ones in tests/integration/test_serve.py)."""

from __future__ import annotations

import re
import textwrap
import unittest
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from txmilt.codec import encode
from txmilt.messages import Action, Connect, Continue, Family, Negotiate, NegotiateReply, Reject
from txmilt.session import NEED_DATA, MTASession
from txmilt.testing import FakeMTA

README = Path(__file__).resolve().parent.parent / "README.rst"

#: Every Python block of the README, by section title and position there; each is run by a test.
EXPECTED_BLOCKS = {
    ("A filter in ten lines", 0),
    ("Serving from Python", 0),
    ("Serving from Python", 1),
    ("Testing a filter", 0),
    ("The sans-IO core", 0),
}


def readme_blocks() -> dict[tuple[str, int], str]:
    """The ``.. code-block:: python`` blocks of README.rst, dedented, by (section title, index in section)."""
    lines = README.read_text().splitlines()
    blocks: dict[tuple[str, int], str] = {}
    section = ""
    counts: dict[str, int] = {}
    for number, line in enumerate(lines):
        if number + 1 < len(lines) and re.fullmatch(r"=+", lines[number + 1]) and line.strip():
            section = line.strip()
        if line.strip() != ".. code-block:: python":
            continue
        body = []
        for following in lines[number + 1:]:
            if following.strip() and not following.startswith(" "):
                break
            body.append(following)
        index = counts.get(section, 0)
        counts[section] = index + 1
        blocks[section, index] = textwrap.dedent("\n".join(body)).strip() + "\n"
    return blocks


def run_block(key: tuple[str, int], namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute one README block in ``namespace`` (which it extends)."""
    exec(compile(readme_blocks()[key], f"README.rst: {key[0]} #{key[1]}", "exec"), namespace)
    return namespace


class ReadmeTests(SynchronousTestCase):
    def test_every_block_is_run(self) -> None:
        """The README's Python blocks are the ones these tests run (a new block needs a test)."""
        self.assertEqual(set(readme_blocks()), EXPECTED_BLOCKS)

    def test_filter_in_ten_lines(self) -> None:
        """NoCasino refuses a casino subject with its reply and stamps other mail."""
        no_casino = run_block(("A filter in ten lines", 0), {})["NoCasino"]
        refused = FakeMTA([no_casino]).message("<a@example.com>", ["<b@example.net>"],
                                               [("Subject", "Casino night")], b"Hi\r\n")
        self.assertEqual(refused.verdict, Reject("No gambling, please.", code=550, status="5.7.1"))
        passed = FakeMTA([no_casino]).message("<a@example.com>", ["<b@example.net>"], [("Subject", "Hi")], b"Hi\r\n")
        self.assertEqual(passed.verdict, Continue())
        self.assertIn(("X-Casino-Checked", "yes"), passed.headers)

    def test_testing_a_filter(self) -> None:
        """The README's test case runs and passes against the README's filter."""
        namespace = run_block(("Testing a filter", 0), run_block(("A filter in ten lines", 0), {}))
        result = unittest.TestResult()
        unittest.defaultTestLoader.loadTestsFromTestCase(namespace["NoCasinoTests"]).run(result)
        self.assertEqual((result.testsRun, result.errors, result.failures), (1, [], []))

    def test_sans_io_core(self) -> None:
        """The sans-IO loop answers an MTA's negotiation and commands."""
        mta = MTASession()
        written: list[bytes] = []

        class Transport:
            def write(self, data: bytes) -> None:
                written.append(data)

        connect = Connect("client.example", Family.INET, 25, "192.0.2.1")
        data = mta.send(Negotiate()) + encode(connect)  # the MTA's packets, as they arrive
        run_block(("The sans-IO core", 0), {"data_from_mta": data, "transport": Transport()})
        mta.receive_data(b"".join(written))
        negotiated = mta.next_event()
        assert isinstance(negotiated, NegotiateReply)
        self.assertEqual(negotiated.actions, Action.ADD_HEADERS)
        self.assertEqual(mta.send(connect), encode(connect))
        self.assertEqual(mta.next_event(), Continue())
        self.assertIs(mta.next_event(), NEED_DATA)
