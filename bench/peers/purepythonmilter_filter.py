"""The benchmark filter on purepythonmilter (asyncio): inspect every event, add one header.

Every hook is annotated to return a response, so purepythonmilter asks the MTA
for a reply at every stage, as the other milters do.

Usage: python purepythonmilter_filter.py PORT [HEADER-NAME]
"""

from __future__ import annotations

import logging
import sys

from purepythonmilter import (
    AppendHeader,
    BodyChunk,
    Connect,
    Continue,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    MailFrom,
    PurePythonMilter,
    RcptTo,
)

HEADER_NAME = "X-Bench"
state = {"recipients": 0, "headers": 0, "body_bytes": 0}


async def on_connect(cmd: Connect) -> Continue:
    state["client"] = cmd.connection_info_args  # type: ignore[assignment]
    return Continue()


async def on_helo(cmd: Helo) -> Continue:
    state["helo"] = cmd.hostname  # type: ignore[assignment]
    return Continue()


async def on_mail_from(cmd: MailFrom) -> Continue:
    state["recipients"] = state["headers"] = state["body_bytes"] = 0
    return Continue()


async def on_rcpt_to(cmd: RcptTo) -> Continue:
    state["recipients"] += 1
    return Continue()


async def on_header(cmd: Header) -> Continue:
    state["headers"] += 1
    return Continue()


async def on_end_of_headers(cmd: EndOfHeaders) -> Continue:
    return Continue()


async def on_body_chunk(cmd: BodyChunk) -> Continue:
    state["body_bytes"] += len(cmd.data_raw)
    return Continue()


async def on_end_of_message(cmd: EndOfMessage) -> Continue:
    return Continue(manipulations=[AppendHeader(headername=HEADER_NAME, headertext="1")])


def main() -> None:
    global HEADER_NAME
    port = int(sys.argv[1])
    if len(sys.argv) > 2:
        HEADER_NAME = sys.argv[2]
    logging.basicConfig(level=logging.WARNING)
    milter = PurePythonMilter(
        name="bench",
        hook_on_connect=on_connect,
        hook_on_helo=on_helo,
        hook_on_mail_from=on_mail_from,
        hook_on_rcpt_to=on_rcpt_to,
        hook_on_header=on_header,
        hook_on_end_of_headers=on_end_of_headers,
        hook_on_body_chunk=on_body_chunk,
        hook_on_end_of_message=on_end_of_message,
        can_add_headers=True,
    )
    milter.run_server(host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
