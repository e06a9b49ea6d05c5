"""txmilt: the Sendmail milter protocol on Twisted, with many filters per connection.

The sans-IO names load eagerly; the Twisted-based ones (Milter, Changes, Chain,
FilterSpec, MilterFactory, IMilter, serve) load on first use, so ``import
txmilt.session`` does not import Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from txmilt.errors import (
    ConfigurationError,
    LocalProtocolError,
    MilterError,
    NegotiationError,
    ProtocolError,
    RemoteProtocolError,
)
from txmilt.messages import (
    Accept,
    Action,
    BodyChunk,
    Connect,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    Family,
    Header,
    Helo,
    MacroStage,
    MailFrom,
    RcptTo,
    Reject,
    Skip,
    TempFail,
    Unknown,
)

if TYPE_CHECKING:
    from txmilt.chain import Chain, FilterSpec
    from txmilt.interfaces import IMilter
    from txmilt.milter import Changes, Milter, Result
    from txmilt.protocol import MilterFactory
    from txmilt.server import serve

_LAZY = {
    "Chain": "txmilt.chain",
    "FilterSpec": "txmilt.chain",
    "IMilter": "txmilt.interfaces",
    "Changes": "txmilt.milter",
    "Milter": "txmilt.milter",
    "Result": "txmilt.milter",
    "MilterFactory": "txmilt.protocol",
    "serve": "txmilt.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'txmilt' has no attribute {name!r}")


__all__ = [
    "Accept",
    "Action",
    "BodyChunk",
    "Chain",
    "Changes",
    "ConfigurationError",
    "Connect",
    "Continue",
    "Data",
    "Discard",
    "EndOfHeaders",
    "Family",
    "FilterSpec",
    "Header",
    "Helo",
    "IMilter",
    "LocalProtocolError",
    "MacroStage",
    "MailFrom",
    "Milter",
    "MilterError",
    "MilterFactory",
    "NegotiationError",
    "ProtocolError",
    "RcptTo",
    "Reject",
    "RemoteProtocolError",
    "Result",
    "Skip",
    "TempFail",
    "Unknown",
    "serve",
]
