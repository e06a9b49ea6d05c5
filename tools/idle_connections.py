"""Hold many idle MTA connections open against a ``twistd milter`` process and report its memory per connection.

Raises RLIMIT_NOFILE (for this process and the daemon it starts), starts
``twistd -n milter`` with the three-filter chain of ``tools/soak.py``, opens
``--connections`` connections that each negotiate and send CONNECT (so every
connection has its session and its filter instances), holds them ``--hold``
seconds, closes them, and does it all again ``--rounds`` times; prints the
daemon's RSS and open descriptors before, while held and after closing, with
the RSS per connection (a second round that needs more memory than the first
would mean a leak).

    python3 tools/idle_connections.py                     # 10,000 connections
    python3 tools/idle_connections.py --connections 2000
"""

from __future__ import annotations

import argparse
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.soak import sample, start_milter  # noqa: E402 - after the path is set
from txmilt.messages import Command, Connect, Family, Macros, Negotiate, NegotiateReply  # noqa: E402
from txmilt.session import NEED_DATA, MTASession  # noqa: E402


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's descriptor limit (children inherit it); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def reply(sock: socket.socket, session: MTASession) -> object:
    """Read until the owed reply arrives."""
    while True:
        event = session.next_event()
        if event is not NEED_DATA:
            if not session.reply_due:
                return event
            continue
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("the milter closed an idle connection")
        session.receive_data(data)


def open_connection(port: int, number: int) -> socket.socket:
    """A connection that negotiated and sent CONNECT, then stays idle."""
    for attempt in range(5):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            break
        except OSError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    session = MTASession()
    sock.sendall(session.send(Negotiate()))
    assert isinstance(reply(sock, session), NegotiateReply)
    address = f"198.51.{number // 250 % 250}.{number % 250 + 1}"
    packets: list[Command] = [Macros("C", (("j", "mx.example"), ("{client_addr}", address))),
               Connect("client.example", Family.INET, 40000 + number % 20000, address)]
    sock.sendall(b"".join(session.send(packet) for packet in packets if session.wants(type(packet))))
    if session.reply_due:
        reply(sock, session)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold them open")
    parser.add_argument("--rounds", type=int, default=2, help="times to open and close them all")
    args = parser.parse_args(argv)

    limit = raise_fd_limit(args.connections * 2 + 1000)
    if limit < args.connections + 100:
        print(f"descriptor limit {limit} is too low for {args.connections} connections", file=sys.stderr)
        return 1
    directory = Path(tempfile.mkdtemp(prefix="txmilt-idle-"))
    process, port = start_milter(directory, args.connections // 4 + 100)
    started = time.monotonic()
    try:
        warm = [open_connection(port, number) for number in range(50)]  # load the code paths once
        for sock in warm:
            sock.close()
        time.sleep(1.0)
        before = sample(process.pid, started, 0)
        print(f"daemon pid {process.pid}: RSS {before.rss_kib / 1024:.1f} MiB, {before.fds} fds before", flush=True)
        rounds = []
        for round_number in range(1, args.rounds + 1):
            held = []
            for number in range(args.connections):
                held.append(open_connection(port, number))
                if (number + 1) % 2000 == 0:
                    now = sample(process.pid, started, number + 1)
                    print(f"round {round_number}: {number + 1:>6} open, RSS {now.rss_kib / 1024:.1f} MiB,"
                          f" {now.fds} fds", flush=True)
            time.sleep(args.hold)
            during = sample(process.pid, started, len(held))
            alive = 0
            for sock in held:
                sock.setblocking(False)
                try:
                    alive += sock.recv(1) != b""
                except BlockingIOError:
                    alive += 1  # nothing to read and not closed: still open
            print(f"round {round_number}: held {alive} of {len(held)} connections for {args.hold:.0f}s", flush=True)
            for sock in held:
                sock.close()
            time.sleep(2.0)
            after = sample(process.pid, started, len(held))
            rounds.append((during, after, alive))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    during, after, alive = rounds[0]
    per = (during.rss_kib - before.rss_kib) / args.connections
    print(f"\n{'':>16} {'RSS MiB':>8} {'fds':>6}")
    print(f"{'before':>16} {before.rss_kib / 1024:>8.1f} {before.fds:>6}")
    for number, (held_sample, closed_sample, _) in enumerate(rounds, 1):
        print(f"{f'round {number} held':>16} {held_sample.rss_kib / 1024:>8.1f} {held_sample.fds:>6}")
        print(f"{f'round {number} closed':>16} {closed_sample.rss_kib / 1024:>8.1f} {closed_sample.fds:>6}")
    print(f"{args.connections} connections held ({alive} still open after {args.hold:.0f}s):"
          f" {per:.1f} KiB RSS per connection; descriptors {during.fds - before.fds:+d} while held,"
          f" {after.fds - before.fds:+d} after closing")
    if len(rounds) > 1:
        last = rounds[-1][0]
        print(f"RSS while held, round {len(rounds)} vs round 1: {(last.rss_kib - during.rss_kib) / 1024:+.1f} MiB")
    ok = all(one[2] == args.connections for one in rounds) and all(one[1].fds <= before.fds + 2 for one in rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
