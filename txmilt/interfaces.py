"""The zope interface every filter in a chain provides."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from txmilt.messages import (
        BodyChunk,
        Connect,
        Data,
        EndOfHeaders,
        Header,
        Helo,
        MailFrom,
        RcptTo,
        Unknown,
    )
    from txmilt.milter import Changes, Result


class IMilter(Interface):
    """One filter in a chain; each callback answers now, via a Deferred, or as a coroutine.

    A callback returns a verdict (``Continue``, ``Accept``, ``Reject``,
    ``TempFail``, ``Discard``, ``Skip``), ``None`` (continue), a Deferred of
    one, or is ``async def``. One instance serves one SMTP session.

    Optional: a true ``whole_body`` attribute has the chain buffer the body
    and set ``body_file`` (a binary file) for ``end_of_message``.
    """

    actions = Attribute("Action flags this filter may use at end of message.")
    macro_requests = Attribute("Mapping of MacroStage to the macro names this filter needs.")
    leading_space = Attribute("True to see header values exactly as sent, leading space included.")
    rejected_recipients = Attribute("True to also see recipients the MTA itself rejected.")
    no_reply = Attribute("Names of callbacks that only observe: they always continue.")
    macros = Attribute("MacroView of the macro values visible now; set by the chain before each call.")

    def connect(command: Connect) -> Result:
        """Judge the SMTP client's connection."""

    def helo(command: Helo) -> Result:
        """Judge the HELO/EHLO name."""

    def mail_from(command: MailFrom) -> Result:
        """Judge the envelope sender; a new message begins."""

    def rcpt_to(command: RcptTo) -> Result:
        """Judge one recipient; a refusal refuses only this recipient."""

    def data(command: Data) -> Result:
        """Judge the DATA command."""

    def header(command: Header) -> Result:
        """Judge one header."""

    def end_of_headers(command: EndOfHeaders) -> Result:
        """Judge the message once all headers are in."""

    def body(command: BodyChunk) -> Result:
        """Judge one body chunk; ``Skip`` asks for no more chunks."""

    def end_of_message(changes: Changes) -> Result:
        """Give the final verdict and record changes on ``changes``."""

    def unknown(command: Unknown) -> Result:
        """Judge an SMTP command the MTA did not recognise."""

    def abort() -> Result:
        """The message was abandoned before its end (libmilter's ``xxfi_abort``); the verdict is ignored.

        Called when the MTA aborts an open message (RSET, a refusal by the MTA or
        by another filter, a new MAIL or HELO mid-message, the connection lost),
        not after end of message and not for a filter that accepted the message.
        """

    def reset() -> Result:
        """The message is over for this filter, however it ended; the verdict is ignored.

        Called exactly once per message the filter took part in: after end of
        message is answered, after ``abort``, when a refusal ends the message,
        when this filter accepted it, or when the connection closes mid-message.
        """

    def close() -> Result:
        """The SMTP session is over; called exactly once."""
