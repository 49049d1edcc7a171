"""The floor for the throughput benchmark: the simplest aiosmtpd -> aiosmtplib relay.

No rules, no pooling, no lock-step: receive the whole message, then open a connection to the
next hop and send it. ``python naive_relay.py LISTEN_PORT NEXT_HOP_PORT``.
"""

from __future__ import annotations

import asyncio
import sys

import aiosmtplib
from aiosmtpd.smtp import SMTP


class Relay:
    def __init__(self, port: int) -> None:
        self.port = port

    async def handle_DATA(self, server, session, envelope):
        await aiosmtplib.send(
            envelope.original_content,
            sender=envelope.mail_from,
            recipients=envelope.rcpt_tos,
            hostname="127.0.0.1",
            port=self.port,
            start_tls=False,
            use_tls=False,
        )
        return "250 OK"


async def main(listen: int, nexthop: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Relay(nexthop), hostname="naive"), "127.0.0.1", listen
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
