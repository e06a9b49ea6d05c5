"""A tiny external milter for the supervision tests: ``python fake_milter.py PORT [--delay SECONDS]``.

It continues everything and adds ``X-Fake-Milter: pid <its pid>`` at end of
message, one thread per connection, built on txmilt's sans-IO session. With
``--delay`` it waits that long before listening, like a milter that loads its
data first. It exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import socketserver
import sys
import time

from txmilt.messages import Action, AddHeader, Continue, EndOfMessage, Negotiate
from txmilt.session import NEED_DATA, Disconnected, MilterSession, Requirements, negotiate

HEADER = "X-Fake-Milter"


class Handler(socketserver.BaseRequestHandler):
    """Serves one MTA connection."""

    def handle(self) -> None:
        session = MilterSession()
        while True:
            event = session.next_event()
            if event is NEED_DATA:
                data = self.request.recv(65536)
                if not data:
                    return
                session.receive_data(data)
                continue
            if isinstance(event, Disconnected):
                return
            if isinstance(event, Negotiate):
                reply = negotiate(event, Requirements(actions=Action.ADD_HEADERS))
                self.request.sendall(session.send(reply))
                continue
            if not session.reply_due:
                continue
            out = b""
            if isinstance(event, EndOfMessage):
                out += session.send(AddHeader(HEADER, f"pid {os.getpid()}"))
            self.request.sendall(out + session.send(Continue()))


class Server(socketserver.ThreadingTCPServer):
    """Threads per connection, reusable address, daemon threads."""

    allow_reuse_address = True
    daemon_threads = True
    address_family = socket.AF_INET


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--delay", type=float, default=0.0)
    arguments = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(arguments.delay)
    with Server(("127.0.0.1", arguments.port), Handler) as server:
        print(f"fake milter listening on 127.0.0.1:{arguments.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
