"""The benchmark filter on kilter.service (anyio): inspect every event, add one header.

kilter filters are coroutines that await the events they want.  The decorators
ask for a reply at every stage (``can_respond=True``), as the other milters do;
by default kilter would negotiate no-reply flags instead.

Usage: python kilter_filter.py PORT [HEADER-NAME]
"""

from __future__ import annotations

import sys

import anyio
from kilter.protocol.messages import Accept, Header
from kilter.service import END, Runner, Session
from kilter.service.options import (
    examine_body,
    examine_headers,
    examine_helo,
    examine_recipients,
    examine_sender,
    responds_to_connect,
)
from kilter.service.session import Phase

HEADER_NAME = "X-Bench"


@responds_to_connect()
@examine_helo(can_respond=True)
@examine_sender(can_respond=True)
@examine_recipients(can_respond=True)
@examine_headers(can_respond=True, can_add=True)
@examine_body(can_respond=True)
async def bench(session: Session) -> Accept:
    if session.phase <= Phase.CONNECT:
        await session.helo()
    await session.envelope_from()
    recipients = 0
    async for _ in session.envelope_recipients():
        recipients += 1
    headers = 0
    async with session.headers as header_iter:
        async for _ in header_iter:
            headers += 1
    body_bytes = 0
    async with session.body as body_iter:
        async for chunk in body_iter:
            body_bytes += len(chunk)
    await session.headers.insert(Header(HEADER_NAME, b"1"), END)
    return Accept()


async def serve(port: int) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port, backlog=1024)
    await listener.serve(Runner(bench))


def main() -> None:
    global HEADER_NAME
    port = int(sys.argv[1])
    if len(sys.argv) > 2:
        HEADER_NAME = sys.argv[2]
    anyio.run(serve, port)


if __name__ == "__main__":
    main()
