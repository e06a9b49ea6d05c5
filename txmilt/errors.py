"""The exception tree: everything txmilt raises on purpose derives from MilterError."""

from __future__ import annotations


class MilterError(Exception):
    """Base of everything txmilt raises on purpose."""


class ConfigurationError(MilterError):
    """A filter, option or config file is wrong; fix it and start again."""


class NegotiationError(MilterError):
    """The MTA does not offer what the filters need; the connection closes unanswered."""


class ProtocolError(MilterError):
    """The milter protocol was broken by one side."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; drop the connection."""


class FrameSizeError(RemoteProtocolError):
    """A frame announced a length above the limit or one that cannot be real."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"frame announces {size} payload bytes, above the limit of {limit};"
            " raise the frame limit if the MTA really sends packets this large"
        )
        self.size = size
        self.limit = limit


class LocalProtocolError(ProtocolError):
    """We tried to send something illegal here: a bug in the caller."""


class ArgumentTypeError(LocalProtocolError, TypeError):
    """A filter called a txmilt method with an argument of the wrong type (also a TypeError)."""


class InvalidReplyError(LocalProtocolError):
    """An SMTP reply (code, enhanced status, text) that the MTA would refuse."""


class EventLoopError(MilterError):
    """A coroutine callback awaited something its event loop cannot wait for (asyncio vs Twisted)."""


class MilterUnavailableError(MilterError):
    """A milter cannot be reached, closed the connection, or was dropped; its pending commands fail."""
