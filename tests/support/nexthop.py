"""A real, scriptable next-hop SMTP server on loopback, run in its own thread.

It records every message it accepts and can be told to misbehave at each stage (refuse a
recipient, answer 4xx/5xx, close the connection, stall), so the tests exercise filterd against
real sockets rather than mocks.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    xforward: dict[str, str]
    mail_params: list[str]


@dataclass
class Behaviour:
    """What the server does; change fields between messages (they are read per command)."""

    refuse_rcpt: dict[str, str] = field(default_factory=dict)  # address -> full reply line
    mail_reply: str = "250 2.1.0 Ok"
    data_reply: str = "354 End data with <CR><LF>.<CR><LF>"
    final_reply: str | None = None  # None: "250 2.0.0 Ok: queued as N"
    close_at: str | None = None  # "greeting", "mail", "rcpt", "data", "mid-data", "dot"
    stall_at: str | None = None  # same stages: stop answering
    announce: tuple[str, ...] = ("PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8",
                                 "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")
    trickle: float = 0.0  # seconds between bytes of each reply
    delay: dict[str, float] = field(default_factory=dict)  # stage -> seconds before answering


class NextHop:
    """Start with ``with NextHop() as hop:``; ``hop.port``, ``hop.messages``, ``hop.behaviour``."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.messages: list[Received] = []
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> NextHop:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        # End stalled sessions too, so the loop can stop cleanly.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least ``count`` messages arrived; return them."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        with self._lock:
            return list(self.messages)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        b = self.behaviour
        try:
            if await self._misbehave("greeting", writer):
                return
            await self._reply(writer, "220 nexthop.test ESMTP")
            sender: str | None = None
            rcpts: list[str] = []
            xforward: dict[str, str] = {}
            params: list[str] = []
            while True:
                line = await reader.readline()
                if not line:
                    return
                text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
                verb = text.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    lines = ["nexthop.test", *self.behaviour.announce]
                    await self._reply(writer, "\r\n".join(
                        f"250{'-' if i < len(lines) - 1 else ' '}{item}" for i, item in enumerate(lines)))
                elif verb == "HELO":
                    await self._reply(writer, "250 nexthop.test")
                elif verb == "XFORWARD":
                    for item in text.split()[1:]:
                        name, _, value = item.partition("=")
                        xforward[name.upper()] = value
                    await self._reply(writer, "250 2.0.0 Ok")
                elif verb == "MAIL":
                    if await self._misbehave("mail", writer):
                        return
                    reply = self.behaviour.mail_reply
                    if reply.startswith("250"):
                        sender = text[text.index("<") + 1 : text.index(">")]
                        params = text[text.index(">") + 1 :].split()
                        rcpts = []
                    await self._reply(writer, reply)
                elif verb == "RCPT":
                    if await self._misbehave("rcpt", writer):
                        return
                    rcpt = text[text.index("<") + 1 : text.index(">")]
                    refusal = self.behaviour.refuse_rcpt.get(rcpt)
                    if refusal:
                        await self._reply(writer, refusal)
                    else:
                        rcpts.append(rcpt)
                        await self._reply(writer, "250 2.1.5 Ok")
                elif verb == "DATA":
                    if await self._misbehave("data", writer):
                        return
                    if not rcpts:
                        await self._reply(writer, "554 5.5.1 Error: no valid recipients")
                        continue
                    await self._reply(writer, self.behaviour.data_reply)
                    if not self.behaviour.data_reply.startswith("354"):
                        continue
                    data = bytearray()
                    while True:
                        chunk = await reader.readline()
                        if not chunk:
                            return
                        if chunk == b".\r\n":
                            break
                        if self.behaviour.close_at == "mid-data" and len(data) > 0:
                            writer.close()
                            return
                        data += chunk[1:] if chunk.startswith(b".") else chunk
                    if await self._misbehave("dot", writer):
                        return
                    final = self.behaviour.final_reply
                    if final is None or final.startswith("250"):
                        with self._lock:
                            self.messages.append(Received(sender or "", rcpts, bytes(data), dict(xforward), params))
                            number = len(self.messages)
                        final = final or f"250 2.0.0 Ok: queued as Q{number}"
                    await self._reply(writer, final)
                    sender, rcpts, xforward = None, [], {}
                elif verb == "RSET":
                    sender, rcpts, xforward = None, [], {}
                    await self._reply(writer, "250 2.0.0 Ok")
                elif verb == "NOOP":
                    await self._reply(writer, "250 2.0.0 Ok")
                elif verb == "QUIT":
                    await self._reply(writer, "221 2.0.0 Bye")
                    return
                else:
                    await self._reply(writer, "502 5.5.2 Error: command not recognized")
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def _misbehave(self, stage: str, writer: asyncio.StreamWriter) -> bool:
        if stage in self.behaviour.delay:
            await asyncio.sleep(self.behaviour.delay[stage])
        if self.behaviour.close_at == stage:
            writer.close()
            return True
        if self.behaviour.stall_at == stage:
            await asyncio.sleep(3600)
            return True
        return False

    async def _reply(self, writer: asyncio.StreamWriter, text: str) -> None:
        payload = (text + "\r\n").encode()
        if self.behaviour.trickle:
            for byte in payload:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(self.behaviour.trickle)
        else:
            writer.write(payload)
            await writer.drain()
