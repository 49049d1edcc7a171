"""The next-hop client against next hops that break the conversation: replies out of step
with the commands, bytes slipped in before TLS, a transaction cut off halfway, and the next
hop closing a pooled connection as our MAIL arrives.

What must hold in each: no reply is taken for the wrong command (a 250 read for the message
that the next hop gave to something else would report mail as delivered that never was), and
no connection is left open with nobody holding it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from filterd.actions.nexthop import RelayTls, open_connection
from filterd.actions.relay import RelayClient
from filterd.errors import RelayError
from tests.support.certs import self_signed
from tests.support.nexthop import Fault, NextHop

MESSAGE = b"Subject: t\r\n\r\nbody\r\n"
Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def test_a_second_greeting_line_fails_the_connection_before_any_reply_is_misread(
    nexthop: NextHop,
) -> None:
    # One reply too many: read on, EHLO would take the second 220, MAIL the EHLO's reply...
    # and DATA the 250 its RCPT got, as if the message had been delivered.
    greeting = "220 nexthop.test ESMTP\r\n220 nexthop.test ready"
    nexthop.behaviour.faults = lambda point: (
        Fault("greeting", "reply", reply=greeting) if point == "connect" else None
    )

    async def run() -> None:
        client = RelayClient("127.0.0.1", nexthop.port, timeout=3, helo="filterd.test")
        try:
            with pytest.raises(RelayError) as error:
                await client.send("a@example.org", ["b@example.net"], MESSAGE)
            assert error.value.reason == "protocol"
        finally:
            await client.close()

    asyncio.run(run())
    assert nexthop.messages == []


@pytest.mark.parametrize("streamed", [False, True], ids=["from-memory", "from-spool"])
def test_a_250_to_data_is_not_taken_for_the_messages_reply(
    nexthop: NextHop, tmp_path: Path, streamed: bool
) -> None:
    nexthop.behaviour.data_reply = "250 2.0.0 Ok"  # where the 354 belongs
    spool = tmp_path / "msg.eml"
    spool.write_bytes(MESSAGE + b"more\r\n" * 10)

    async def run() -> None:
        client = RelayClient("127.0.0.1", nexthop.port, timeout=3, helo="filterd.test")
        txn = client.transaction()
        txn.begin("a@example.org", ())
        await txn.add_recipients(["b@example.net"])
        sending = (
            txn.send_data_stream(MESSAGE, str(spool), len(MESSAGE))
            if streamed
            else txn.send_data(MESSAGE)
        )
        with pytest.raises(RelayError) as error:
            await sending
        assert error.value.reason == "protocol"
        await txn.finish()
        await client.close()

    asyncio.run(run())
    assert nexthop.messages == []


async def _serve(session: Session) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(session, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_bytes_sent_in_the_clear_with_the_starttls_reply_fail_the_connection(
    tmp_path: Path,
) -> None:
    # Read after the handshake, they would pass for replies that came over TLS (the class of
    # CVE-2011-0411): here a 250 that would answer the EHLO filterd sends next.
    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hop ESMTP\r\n")
        while line := await reader.readline():
            verb = line.split()[0].upper()
            if verb == b"EHLO":
                writer.write(b"250-hop\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS":
                writer.write(b"220 2.0.0 Ready\r\n250 injected in the clear\r\n")
                await writer.drain()
                await writer.start_tls(server_tls)
            else:
                writer.write(b"250 ok\r\n")
        writer.close()

    async def run() -> None:
        server, port = await _serve(session)
        client_tls = ssl.create_default_context(cafile=str(cert))
        tls = RelayTls("required", client_tls, "localhost")
        try:
            with pytest.raises(RelayError) as error:
                await open_connection("127.0.0.1", port, timeout=3, helo="f.test", tls=tls)
            assert error.value.reason == "protocol"
            assert "after its STARTTLS reply" in error.value.detail
        finally:
            server.close()

    asyncio.run(run())


def test_a_transaction_cancelled_during_its_rset_closes_the_connection() -> None:
    # The client's session ends (a hang-up after RSET or QUIT) while the RSET that returns the
    # connection to the pool is out: nobody holds the connection any more.
    open_sessions = 0

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_sessions
        open_sessions += 1
        try:
            writer.write(b"220 hop\r\n")
            while line := await reader.readline():
                verb = line.split()[0].upper()
                if verb == b"RSET":
                    await asyncio.sleep(0.5)
                writer.write(b"250-hop\r\n250 PIPELINING\r\n" if verb == b"EHLO" else b"250 ok\r\n")
        finally:
            open_sessions -= 1
            writer.close()

    async def run() -> int:
        server, port = await _serve(session)
        client = RelayClient("127.0.0.1", port, timeout=30, helo="f.test")
        txn = client.transaction()
        txn.begin("a@example.org", ())
        await txn.add_recipients(["b@example.net"])
        finishing = asyncio.ensure_future(txn.finish())
        await asyncio.sleep(0.1)
        finishing.cancel()
        await asyncio.gather(finishing, return_exceptions=True)
        for _ in range(300):  # until the next hop sees the connection go (after its 0.5 s)
            if open_sessions == 0:
                break
            await asyncio.sleep(0.01)
        still_open = open_sessions
        await client.close()
        server.close()
        return still_open

    assert asyncio.run(run()) == 0


def test_a_spool_that_fails_midway_ends_the_connection_not_the_message_with_an_rset(
    nexthop: NextHop,
) -> None:
    # After the 354 every byte is message data: an RSET would become part of the message and
    # the next hop would answer nothing until the relay timeout.
    async def run() -> None:
        client = RelayClient("127.0.0.1", nexthop.port, timeout=3, helo="filterd.test")
        txn = client.transaction()
        txn.begin("a@example.org", ())
        await txn.add_recipients(["b@example.net"])
        with pytest.raises(FileNotFoundError):
            await txn.send_data_stream(MESSAGE, "/nonexistent/spool.eml", len(MESSAGE))
        await asyncio.wait_for(txn.finish(), 1.0)
        await client.close()

    asyncio.run(run())
    assert not any(line.startswith(b"RSET") for line in nexthop.commands)
    assert nexthop.messages == []


@pytest.mark.parametrize("announce", [("PIPELINING",), ()], ids=["pipelining", "lock-step"])
def test_a_421_to_mail_on_a_pooled_connection_is_retried_on_a_fresh_one(
    nexthop: NextHop, announce: tuple[str, ...]
) -> None:
    # The next hop's idle timeout crossing our MAIL: the second message's MAIL gets 421.
    nexthop.behaviour.announce = announce
    transactions = iter(range(100))
    nexthop.behaviour.faults = lambda point: (
        Fault("mail", "shutdown") if point == "transaction" and next(transactions) == 1 else None
    )

    async def run() -> None:
        client = RelayClient("127.0.0.1", nexthop.port, timeout=3, helo="filterd.test")
        await client.send("a@example.org", ["b@example.net"], MESSAGE)
        reply = await client.send("a@example.org", ["b@example.net"], MESSAGE)
        assert reply.code == 250
        await client.close()

    asyncio.run(run())
    assert len(nexthop.messages) == 2
    assert nexthop.connections == 2


def test_a_pooled_connection_left_unused_is_closed_with_quit_after_the_idle_timeout(
    nexthop: NextHop,
) -> None:
    # An idle pooled connection holds one of the next hop's process slots (Postfix's maxproc):
    # kept until the next hop's own timeout (300s), the slots a new connection needs can all
    # be held by connections nobody uses.
    async def run() -> None:
        client = RelayClient(
            "127.0.0.1", nexthop.port, timeout=3, helo="filterd.test", idle_timeout=0.2
        )
        await client.send("a@example.org", ["b@example.net"], MESSAGE)
        await client.send("a@example.org", ["b@example.net"], MESSAGE)  # reused: one connection
        assert len(client._idle) == 1
        await asyncio.sleep(0.5)  # past the idle timeout (its timer comes first in the loop)
        assert client._idle == []
        await client.close()  # waits for the QUIT of the expired connection

    asyncio.run(run())
    assert nexthop.connections == 1
    assert list(nexthop.commands)[-1].strip().upper() == b"QUIT"


def test_a_connection_used_again_within_the_idle_timeout_stays_open(nexthop: NextHop) -> None:
    async def run() -> None:
        client = RelayClient(
            "127.0.0.1", nexthop.port, timeout=3, helo="filterd.test", idle_timeout=60
        )
        for _ in range(3):
            await client.send("a@example.org", ["b@example.net"], MESSAGE)
            await asyncio.sleep(0.1)
        assert len(client._idle) == 1
        await client.close()

    asyncio.run(run())
    assert nexthop.connections == 1
    assert len(nexthop.messages) == 3
