"""txmilt-check's message file: parsed as an MTA hands it to milters, written back, envelope defaults."""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from txmilt.check.command import MADE_UP_RECIPIENT, MADE_UP_SENDER, read_mail
from txmilt.check.message import (
    MessageFileError,
    Text,
    angle_address,
    header_addresses,
    made_up_message,
    parse_message,
    render_message,
)
from txmilt.check.options import parse_options


class ParseTests(SynchronousTestCase):
    """parse_message reads headers and body the way an MTA passes them on."""

    def test_headers_and_body(self) -> None:
        """One space after the colon goes; folded lines keep their break as LF; the body gets CRLF."""
        text = parse_message(
            b"Subject: Hello\nX-Spaced:  two\nX-Tight:no\nX-Folded: first\n\tsecond\nX-Empty:\n\nline 1\nline 2\n"
        )
        self.assertEqual(text.headers, (
            ("Subject", "Hello"), ("X-Spaced", " two"), ("X-Tight", "no"), ("X-Folded", "first\n\tsecond"),
            ("X-Empty", ""),
        ))
        self.assertEqual(text.body, b"line 1\r\nline 2\r\n")

    def test_crlf_file(self) -> None:
        """CRLF files read the same; the body keeps its bytes."""
        text = parse_message(b"To: a@example.com\r\n\r\n\xff\xfe binary\r\n")
        self.assertEqual(text, Text((("To", "a@example.com"),), b"\xff\xfe binary\r\n"))

    def test_no_body(self) -> None:
        """A file of headers only has an empty body."""
        self.assertEqual(parse_message(b"Subject: x\n").body, b"")
        self.assertEqual(parse_message(b"Subject: x").headers, (("Subject", "x"),))

    def test_no_headers(self) -> None:
        """An empty first line means no headers at all."""
        self.assertEqual(parse_message(b"\nbody\n"), Text((), b"body\r\n"))

    def test_eight_bit_header(self) -> None:
        """Header bytes that are not UTF-8 survive as surrogate escapes."""
        text = parse_message(b"Subject: caf\xe9\n\n")
        self.assertEqual(text.headers[0][1].encode("utf-8", "surrogateescape"), b"caf\xe9")

    def test_malformed(self) -> None:
        """Files that are no message are refused with the line at fault."""
        for data, expected in (
            (b"", "msg is empty"),
            (b"  \n", "msg is empty"),
            (b"not a header\n\nbody", "msg, line 1: 'not a header' is not a header field"),
            (b"Subject: x\nFrom x@y\n", "msg, line 2: 'From x@y' is not a header field"),
            (b" continued\n", "msg, line 1: ' continued' continues a header, but no header comes before it"),
            (b"Subject: a\0b\n", "msg, line 1: a header holds a bare CR or a NUL byte"),
            (b": no name\n", "msg, line 1: ': no name' is not a header field"),
            (b"\x89PNG\r\n\x1a\n", "msg, line 1: '\ufffdPNG' is not a header field"),
        ):
            with self.assertRaises(MessageFileError) as caught:
                parse_message(data, "msg")
            self.assertTrue(str(caught.exception).startswith(expected), (data, str(caught.exception)))


class RenderTests(SynchronousTestCase):
    """render_message writes the message as the MTA stores it."""

    def test_round_trip(self) -> None:
        """A parsed message renders to CRLF text with one space after each colon."""
        text = parse_message(b"Subject: Hello\nX-Folded: a\n b\nX-Empty:\n\nbody\n")
        self.assertEqual(
            render_message(text.headers, text.body),
            b"Subject: Hello\r\nX-Folded: a\r\n b\r\nX-Empty:\r\n\r\nbody\r\n",
        )

    def test_made_up(self) -> None:
        """The made-up message is a small, well-formed message to the given recipients."""
        text = made_up_message("a@example.org", ["b@example.net", "c@example.net"])
        names = [name for name, _ in text.headers]
        self.assertEqual(names[:3], ["From", "To", "Subject"])
        self.assertIn("Message-ID", names)
        self.assertEqual(parse_message(render_message(text.headers, text.body)), text)
        self.assertEqual(header_addresses(text.headers, ["to"]), ["b@example.net", "c@example.net"])


class EnvelopeTests(SynchronousTestCase):
    """read_mail takes the envelope from the options, else from the message's headers."""

    def write(self, data: bytes) -> str:
        fd, path = tempfile.mkstemp(suffix=".eml")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        self.addCleanup(os.unlink, path)
        return path

    def test_from_headers(self) -> None:
        """From gives the sender, To and Cc the recipients, in angle brackets."""
        path = self.write(b"From: Alice <alice@example.org>\nTo: b@example.net, Carol <c@example.net>\n"
                          b"Cc: d@example.net\nSubject: s\n\nhi\n")
        mail = read_mail(parse_options(["inet:1@a", path]))
        self.assertEqual(mail.sender, "<alice@example.org>")
        self.assertEqual([r for r, _ in mail.recipients], ["<b@example.net>", "<c@example.net>", "<d@example.net>"])
        self.assertEqual(mail.body, b"hi\r\n")

    def test_options_win(self) -> None:
        """--from and --to replace the headers' addresses; --from '' is the null sender."""
        path = self.write(b"From: a@example.org\nTo: b@example.net\n\n")
        mail = read_mail(parse_options(["inet:1@a", "--from", "", "--to", "<x@example.com>", path]))
        self.assertEqual((mail.sender, mail.recipients), ("<>", [("<x@example.com>", ())]))

    def test_missing_addresses(self) -> None:
        """A file without From or To needs --from or --to."""
        no_from = self.write(b"To: b@example.net\n\n")
        with self.assertRaises(MessageFileError) as caught:
            read_mail(parse_options(["inet:1@a", no_from]))
        self.assertIn("has no From address: give the envelope sender with --from", str(caught.exception))
        no_to = self.write(b"From: a@example.org\n\n")
        with self.assertRaises(MessageFileError):
            read_mail(parse_options(["inet:1@a", no_to]))
        self.assertEqual(read_mail(parse_options(["inet:1@a", "--to", "b@example.net", no_to])).sender,
                         "<a@example.org>")

    def test_unreadable(self) -> None:
        """A file that cannot be read is a MessageFileError naming it."""
        with self.assertRaises(MessageFileError) as caught:
            read_mail(parse_options(["inet:1@a", "/nonexistent/message.eml"]))
        self.assertEqual(
            str(caught.exception), "cannot read the message file /nonexistent/message.eml: No such file or directory"
        )

    def test_made_up_envelope(self) -> None:
        """Without a file the message is made up, from and to the defaults or the options."""
        mail = read_mail(parse_options(["inet:1@a"]))
        self.assertEqual((mail.sender, mail.recipients), (f"<{MADE_UP_SENDER}>", [(f"<{MADE_UP_RECIPIENT}>", ())]))
        mail = read_mail(parse_options(["inet:1@a", "--to", "x@example.com", "--from", "y@example.com"]))
        self.assertEqual(header_addresses(mail.headers, ["From", "To"]), ["y@example.com", "x@example.com"])

    def test_angle_address(self) -> None:
        """Addresses get angle brackets once; the empty sender is <>."""
        self.assertEqual([angle_address(a) for a in ("a@b", "<a@b>", " a@b ", "")], ["<a@b>", "<a@b>", "<a@b>", "<>"])
