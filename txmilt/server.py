"""Serving filters from a Python program: ``serve(filters, address)``, with errors shown on stderr.

::

    from twisted.internet import reactor
    from txmilt import serve

    serve([NoCasino], "inet:8891@127.0.0.1")
    reactor.run()
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, LogEvent, LogLevel, eventAsText, globalLogBeginner, globalLogPublisher
from zope.interface import implementer

from txmilt.chain import FilterSpec
from txmilt.interfaces import IMilter
from txmilt.listen import remove_stale_socket, to_strports, unix_socket_path
from txmilt.protocol import MilterFactory

#: Levels printed on stderr until the program begins logging (Twisted itself prints critical ones).
_SHOWN_LEVELS = frozenset({LogLevel.warn, LogLevel.error})


def serve(
    filters: Sequence[FilterSpec | Callable[[], IMilter]],
    address: str,
    *,
    reactor: Any = None,
    **limits: Any,
) -> Deferred[IListeningPort]:
    """Listen on ``address`` and serve a chain of ``filters`` on each MTA connection; a Deferred of the port.

    ``address`` is a libmilter/Postfix spec (``inet:8891@127.0.0.1``,
    ``unix:/run/txmilt.sock``) or a Twisted strports description; a stale unix
    socket is removed first. ``limits`` are ``MilterFactory``'s keywords
    (``timeout`` belongs to each ``FilterSpec``). Stop with
    ``port.stopListening()``. Until the program begins Twisted logging
    (``globalLogBeginner.beginLoggingTo``), warnings and errors, a filter's
    traceback included, are printed on stderr.
    """
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    description = to_strports(address)
    factory = MilterFactory(filters, reactor, **limits)
    path = unix_socket_path(description)
    if path is not None:
        remove_stale_socket(path)
    show_errors_until_logging_begins()
    listening: Deferred[IListeningPort] = serverFromString(reactor, description).listen(factory)
    return listening


@implementer(ILogObserver)
class _StderrUntilLoggingBegins:
    """Prints warnings and errors on stderr while nobody has begun Twisted logging."""

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") not in _SHOWN_LEVELS or _logging_begun():
            return
        sys.stderr.write(eventAsText(event) + "\n")
        sys.stderr.flush()


_observer = _StderrUntilLoggingBegins()
_UNKNOWN = object()


def _logging_begun() -> bool:
    """Whether the program called ``beginLoggingTo`` (Twisted then drops its temporary observer)."""
    return getattr(globalLogBeginner, "_temporaryObserver", _UNKNOWN) is None


def show_errors_until_logging_begins() -> None:
    """Print warnings and errors on stderr until the program begins Twisted logging (idempotent)."""
    globalLogPublisher.removeObserver(_observer)
    globalLogPublisher.addObserver(_observer)
