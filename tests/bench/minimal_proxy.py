"""The reference point for the latency benchmark: the least a Python SMTP proxy can do.

It has filterd's dialogue with the next hop (one pooled connection, MAIL and RCPT in one
write, DATA, then the message) and nothing else: no rules, no checks, no spooling, no
metrics, no logs, one recipient per message, commands answered within ``data_received``.
It is not a relay anyone should run; it shows how much of filterd's added latency is the
unavoidable part of proxying in Python on this machine (system calls, wake-ups, uvloop).
``python minimal_proxy.py LISTEN_PORT NEXT_HOP_PORT``; uvloop is used when it is installed.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.fair_sink import loop_factory


class NextHop(asyncio.Protocol):
    """A next-hop connection: write a command, wait for a number of final reply lines."""

    def __init__(self) -> None:
        self.buffer = b""
        # Final reply lines not yet taken by a command. A reply may arrive before the command
        # that waits for it is called (the greeting can come in right after the connection is
        # made), so nothing here is dropped when a command starts.
        self.lines: list[bytes] = []
        self.wanted = 0
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if line[3:4] != b"-":  # the last line of a (multi-line) reply
                self.lines.append(line)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True  # a waiting command fails instead of waiting for ever
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if (
            waiter is not None
            and not waiter.done()
            and (len(self.lines) >= self.wanted or self.lost)
        ):
            waiter.set_result(None)

    async def command(self, data: bytes, replies: int) -> list[bytes]:
        if data:
            self.transport.write(data)
        while len(self.lines) < replies:
            if self.lost:
                raise ConnectionError("the next hop closed the connection")
            self.wanted = replies
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        taken, self.lines = self.lines[:replies], self.lines[replies:]
        return taken


class Proxy(asyncio.Protocol):
    """One client session: lock-step replies, the message relayed once the dot arrives."""

    idle: ClassVar[list[NextHop]] = []  # pooled next-hop connections
    next_hop_port: ClassVar[int] = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.in_data = False
        self.busy = False
        self.mail = b""
        self.hop: NextHop | None = None
        self.step: asyncio.Task[None] | None = None
        self.out: list[bytes] = []  # replies not written yet (see serve)
        self.transport.write(b"220 minimal ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.serve()

    def serve(self) -> None:
        """Answer what is buffered. The replies to a pipelined group go out in one write, as
        filterd writes them (RFC 2920, 3.2): while a command waits for the next hop, the
        replies before it wait for its own."""
        self._serve()
        if not self.busy:
            self._write_out()

    def _write_out(self) -> None:
        if self.out and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _serve(self) -> None:
        while not self.busy:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                body, self.buffer = self.buffer[: end + 5], self.buffer[end + 5 :]
                self.in_data = False
                self.run(self.deliver(body))
                return
            line, newline, rest = self.buffer.partition(b"\n")
            if not newline:
                return
            self.buffer = rest
            verb = line[:4].upper()
            if verb == b"MAIL":
                self.mail = line + b"\n"
                self.out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                self.run(self.recipient(line + b"\n"))
                return
            elif verb == b"DATA":
                self.in_data = True
                self.buffer = b"\r\n" + self.buffer  # so the end marker is found at once too
                self.out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.out.append(b"221 2.0.0 Bye\r\n")
                self._write_out()
                self.transport.close()
                return
            else:  # HELO, EHLO, NOOP, RSET: nothing to check
                self.out.append(b"250 minimal\r\n")

    def run(self, step: Coroutine[Any, Any, None]) -> None:
        self.busy = True  # the commands after this one wait until it has its reply
        self.step = asyncio.ensure_future(step)

    def resume(self, reply: bytes) -> None:
        self.out.append(reply + b"\n")
        self.busy = False
        self.serve()

    async def recipient(self, rcpt: bytes) -> None:
        try:
            if self.hop is None:
                while Proxy.idle and Proxy.idle[-1].lost:  # closed by the next hop while idle
                    Proxy.idle.pop()
                self.hop = Proxy.idle.pop() if Proxy.idle else await self.connect()
            replies = await self.hop.command(self.mail + rcpt, 2)
        except ConnectionError:
            self.hop = None
            self.resume(b"451 4.4.2 next hop lost\r")
            return
        self.resume(replies[-1])

    async def deliver(self, body: bytes) -> None:
        assert self.hop is not None
        try:
            await self.hop.command(b"DATA\r\n", 1)
            replies = await self.hop.command(body[2:], 1)  # body[:2] is the CRLF added at DATA
        except ConnectionError:
            self.hop = None
            self.resume(b"451 4.4.2 next hop lost\r")
            return
        Proxy.idle.append(self.hop)
        self.hop = None
        self.resume(replies[-1])

    async def connect(self) -> NextHop:
        loop = asyncio.get_running_loop()
        _, hop = await loop.create_connection(NextHop, "127.0.0.1", Proxy.next_hop_port)
        await hop.command(b"", 1)  # the greeting
        await hop.command(b"EHLO minimal\r\n", 1)
        return hop


async def serve(listen: int, next_hop: int) -> None:
    Proxy.next_hop_port = next_hop
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Proxy, "127.0.0.1", listen, reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: minimal_proxy.py LISTEN_PORT NEXT_HOP_PORT")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
