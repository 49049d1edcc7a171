"""A finished SMTP session is freed by reference counting, not left to the cyclic collector.

aiosmtpd's protocol refers to itself (bound command methods, its stream writer) and ends each
session by cancelling its own task; unless filterd breaks those cycles, every session leaves
some 50 objects that only the garbage collector frees, and its passes over them cost more than
the rest of the per-message work. This runs the real ingress in-process (its objects are
visible to ``gc`` here) against a real next hop on loopback.
"""

from __future__ import annotations

import asyncio
import gc
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from filterd.app import Daemon
from filterd.smtp_protocol import FilterdSMTP
from tests.support.inprocess import inprocess_config
from tests.support.nexthop import NextHop

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\nMessage-ID: <m@example.org>\r\n\r\nhi\r\n"


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """``gc.garbage`` while DEBUG_SAVEALL keeps what the collector finds there."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def _send(port: int, *, extra_rset: bool) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        if extra_rset:
            smtp.rset()  # one more command in the same session before QUIT


def _send_and_drop(port: int) -> None:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
    smtp.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    assert smtp.sock is not None
    smtp.sock.close()  # no QUIT: the connection is lost under the session


async def _sessions(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    policy = daemon.handler.policy
    server = await loop.create_server(lambda: FilterdSMTP(daemon.handler, policy), "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        for index in range(6):
            await asyncio.to_thread(_send, port, extra_rset=bool(index % 2))
        await asyncio.to_thread(_send_and_drop, port)
        for _ in range(50):  # let connection_lost and the session tasks finish
            if not daemon.handler.active and not daemon.handler.in_flight:
                break
            await asyncio.sleep(0.02)
    finally:
        server.close()
        await server.wait_closed()
        await daemon.relay.close()


def test_finished_sessions_leave_no_cyclic_garbage(
    tmp_path: Path, nexthop: NextHop, saved_garbage: list[object]
) -> None:
    config = inprocess_config(tmp_path, nexthop)

    async def main() -> None:
        daemon = Daemon(config, None, {})
        await _sessions(daemon)

    asyncio.run(main())
    assert len(nexthop.messages) == 7  # the sessions really ran, through to the next hop
    gc.collect()
    leaked = [obj for obj in saved_garbage if isinstance(obj, FilterdSMTP)]
    assert leaked == [], f"{len(leaked)} of 7 sessions were left to the cyclic collector"
