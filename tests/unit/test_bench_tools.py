"""The benchmark's reference proxy (tests/bench/minimal_proxy.py) must not hang the benchmark:
a reply that arrives before the command waiting for it is kept, and a next hop that goes away
fails the waiting command instead of leaving it waiting for ever."""

from __future__ import annotations

import asyncio

import pytest

from tests.bench.minimal_proxy import NextHop


def test_a_reply_that_comes_before_its_command_is_kept() -> None:
    async def run() -> list[bytes]:
        hop = NextHop()
        # The greeting can be read in the same pass of the event loop that made the
        # connection, before connect() asks for it.
        hop.data_received(b"220 sink ESMTP\r\n")
        return await asyncio.wait_for(hop.command(b"", 1), 5)

    assert asyncio.run(run()) == [b"220 sink ESMTP\r"]


def test_replies_are_taken_in_order_across_commands() -> None:
    async def run() -> tuple[list[bytes], list[bytes]]:
        hop = NextHop()
        hop.data_received(b"250-first\r\n250 last\r\n250 2.1.0 Ok\r\n")
        first = await asyncio.wait_for(hop.command(b"", 1), 5)
        second = await asyncio.wait_for(hop.command(b"", 1), 5)
        return first, second

    assert asyncio.run(run()) == ([b"250 last\r"], [b"250 2.1.0 Ok\r"])


def test_a_lost_next_hop_fails_the_waiting_command() -> None:
    async def run() -> None:
        hop = NextHop()
        waiting = asyncio.ensure_future(hop.command(b"", 1))
        await asyncio.sleep(0)
        hop.connection_lost(None)
        await asyncio.wait_for(waiting, 5)

    with pytest.raises(ConnectionError):
        asyncio.run(run())
