"""A real, scriptable next-hop SMTP server on loopback, run in its own thread.

It records every message it accepts and can be told to misbehave at each stage (refuse a
recipient, answer 4xx/5xx, close the connection, stall), so the tests exercise filterd against
real sockets rather than mocks.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

STAGES = ("greeting", "mail", "rcpt", "data", "mid-data", "dot")
LINE_LIMIT = 64 * 1024 * 1024
SHUTDOWN_REPLY = "421 4.3.2 nexthop.test Service shutting down, closing transmission channel"


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour for one connection or transaction: at ``stage``, do ``kind``.

    kinds: ``close`` (drop the connection), ``stall`` (stop answering for ``seconds``, then drop),
    ``reply`` (answer ``reply`` instead, one byte every ``seconds`` if set: at ``rcpt`` for every
    recipient, at ``dot`` as the final reply, which records nothing unless it is a 250),
    ``shutdown`` (answer 421 and drop), ``late`` (at ``dot`` only: wait ``seconds``, then record
    the message and answer 250, as a next hop does whose reply comes after the client gave up),
    ``trickle`` (send every reply of the transaction one byte every ``seconds``).
    """

    stage: str
    kind: str
    reply: str = ""
    seconds: float = 0.0
    nth: int = 1  # at "rcpt": from the nth recipient of the transaction on


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    xforward: dict[str, str]
    mail_params: list[str]
    fault: Fault | None = None  # the fault injected into the transaction that delivered it


@dataclass
class Behaviour:
    """What the server does; change fields between messages (they are read per command)."""

    refuse_rcpt: dict[str, str] = field(default_factory=dict)  # address -> full reply line
    mail_reply: str = "250 2.1.0 Ok"
    data_reply: str = "354 End data with <CR><LF>.<CR><LF>"
    final_reply: str | None = None  # None: "250 2.0.0 Ok: queued as N"
    close_at: str | None = None  # "greeting", "mail", "rcpt", "data", "mid-data", "dot"
    stall_at: str | None = None  # same stages: stop answering
    announce: tuple[str, ...] = (
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE",
    )
    trickle: float = 0.0  # seconds between bytes of each reply
    delay: dict[str, float] = field(default_factory=dict)  # stage -> seconds before answering
    tls_context: ssl.SSLContext | None = None  # set: announce and serve STARTTLS
    shutdown_at: str | None = None  # same stages: answer 421 and close the connection
    # Random faults: called with "connect" for each new connection and with "transaction" at
    # each MAIL; a returned Fault applies to that connection / transaction (see Fault).
    faults: Callable[[str], Fault | None] | None = None


class NextHop:
    """Start with ``with NextHop() as hop:``; ``hop.port``, ``hop.messages``, ``hop.behaviour``."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.messages: list[Received] = []
        self.connections = 0
        self.tls_sessions = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()
        self.data_ends = 0  # end-of-data markers read (before the final reply is decided)
        self.injected: list[Fault] = []  # every Fault that ``behaviour.faults`` handed out
        self.commands: deque[bytes] = deque(maxlen=20000)  # raw command lines, newest last
        # Per command line: whether more of what the client sent was already waiting behind it
        # (it came in the same write, as RFC 2920 pipelining sends a group).
        self.followed: deque[bool] = deque(maxlen=20000)
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> NextHop:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        # A real MTA takes lines of any length; the default 64 KiB line limit would make this
        # server, not filterd, fail on a 1 MB header line.
        self._server = await asyncio.start_server(
            self._session, "127.0.0.1", self.port, reuse_address=True, limit=LINE_LIMIT
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def refuse_connections(self) -> None:
        """Stop listening (connects get ECONNREFUSED); open sessions are left alone."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def accept_connections(self) -> None:
        """Listen again on the same port after ``refuse_connections``."""
        if self._server is None:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def drop_connections(self) -> int:
        """Close every open session (as a restarting next hop would); returns how many."""

        async def drop() -> int:
            writers = list(self._writers)
            for writer in writers:
                writer.close()
            return len(writers)

        return asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # End stalled sessions too, so the loop can stop cleanly.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least ``count`` messages arrived; return them."""
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
        self._writers.add(writer)
        fault = self._draw("connect")
        try:
            if await self._misbehave("greeting", writer, fault):
                return
            greeting = self._replacement("greeting", fault) or "220 nexthop.test ESMTP"
            await self._reply(writer, greeting, fault)
            sender: str | None = None
            rcpts: list[str] = []
            xforward: dict[str, str] = {}
            params: list[str] = []
            chunked = bytearray()  # BDAT chunks of the transaction so far
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.commands.append(line)
                self.followed.append(bool(reader._buffer))  # StreamReader keeps what is unread
                text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
                verb = text.split(" ", 1)[0].upper()
                if verb == "STARTTLS" and self.behaviour.tls_context is not None:
                    await self._reply(writer, "220 2.0.0 Ready to start TLS")
                    await writer.start_tls(self.behaviour.tls_context)
                    self.tls_sessions += 1
                    sender, rcpts, xforward = None, [], {}
                elif verb == "EHLO":
                    tls = ("STARTTLS",) if self.behaviour.tls_context is not None else ()
                    lines = ["nexthop.test", *self.behaviour.announce, *tls]
                    await self._reply(
                        writer,
                        "\r\n".join(
                            f"250{'-' if i < len(lines) - 1 else ' '}{item}"
                            for i, item in enumerate(lines)
                        ),
                        fault,
                    )
                elif verb == "HELO":
                    await self._reply(writer, "250 nexthop.test", fault)
                elif verb == "XFORWARD":
                    for item in text.split()[1:]:
                        name, _, value = item.partition("=")
                        xforward[name.upper()] = value
                    await self._reply(writer, "250 2.0.0 Ok", fault)
                elif verb == "MAIL":
                    fault = self._draw("transaction")
                    if await self._misbehave("mail", writer, fault):
                        return
                    reply = self._replacement("mail", fault) or self.behaviour.mail_reply
                    if reply.startswith("250"):
                        sender = text[text.index("<") + 1 : text.index(">")]
                        params = text[text.index(">") + 1 :].split()
                        rcpts = []
                    await self._reply(writer, reply, fault)
                elif verb == "RCPT":
                    rcpt_fault = fault if fault is None or len(rcpts) + 1 >= fault.nth else None
                    if await self._misbehave("rcpt", writer, rcpt_fault):
                        return
                    rcpt = text[text.index("<") + 1 : text.index(">")]
                    refusal = self._replacement(
                        "rcpt", rcpt_fault
                    ) or self.behaviour.refuse_rcpt.get(rcpt)
                    if refusal:
                        await self._reply(writer, refusal, fault)
                    else:
                        rcpts.append(rcpt)
                        await self._reply(writer, "250 2.1.5 Ok", fault)
                elif verb == "DATA":
                    if await self._misbehave("data", writer, fault):
                        return
                    if not rcpts:
                        await self._reply(writer, "554 5.5.1 Error: no valid recipients", fault)
                        continue
                    data_reply = self._replacement("data", fault) or self.behaviour.data_reply
                    await self._reply(writer, data_reply, fault)
                    if not data_reply.startswith("354"):
                        continue
                    data = bytearray()
                    while True:
                        chunk = await reader.readline()
                        if not chunk:
                            return
                        if chunk == b".\r\n":
                            self.data_ends += 1
                            break
                        if len(data) > 0 and (
                            self.behaviour.close_at == "mid-data"
                            or (fault is not None and fault.stage == "mid-data")
                        ):
                            writer.close()
                            return
                        data += chunk[1:] if chunk.startswith(b".") else chunk
                    received = Received(sender or "", rcpts, bytes(data), dict(xforward), params)
                    if not await self._end_of_message(writer, received, fault):
                        return
                    sender, rcpts, xforward = None, [], {}
                    fault = None
                elif verb == "BDAT" and "CHUNKING" in self.behaviour.announce:
                    # RFC 3030: "BDAT size [LAST]", then exactly size bytes. The stages map as
                    # for DATA: "data" at the command, "mid-data" after half the chunk, "dot"
                    # at the end of the LAST chunk.
                    size_text, _, last = text[5:].partition(" ")
                    size = int(size_text)
                    if await self._misbehave("data", writer, fault):
                        return
                    if (
                        len(chunked) == 0
                        and size > 1
                        and (
                            self.behaviour.close_at == "mid-data"
                            or (fault is not None and fault.stage == "mid-data")
                        )
                    ):
                        await reader.readexactly(size // 2)
                        writer.close()
                        return
                    chunked += await reader.readexactly(size)
                    if last.upper() != "LAST":
                        await self._reply(writer, f"250 2.0.0 Ok: {size} bytes", fault)
                        continue
                    self.data_ends += 1
                    if not rcpts:
                        await self._reply(writer, "554 5.5.1 Error: no valid recipients", fault)
                    else:
                        received = Received(
                            sender or "", rcpts, bytes(chunked), dict(xforward), params
                        )
                        if not await self._end_of_message(writer, received, fault):
                            return
                    chunked = bytearray()
                    sender, rcpts, xforward = None, [], {}
                    fault = None
                elif verb == "RSET":
                    sender, rcpts, xforward = None, [], {}
                    chunked = bytearray()
                    fault = None
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
            self._writers.discard(writer)
            writer.close()

    async def _end_of_message(
        self, writer: asyncio.StreamWriter, received: Received, fault: Fault | None
    ) -> bool:
        """The end of a message's data (DATA's dot, BDAT's LAST chunk): the final reply, and the
        message recorded if it is a 250. False: the connection was dropped instead."""
        if await self._misbehave("dot", writer, fault):
            return False
        final = self._replacement("dot", fault) or self.behaviour.final_reply
        if final is None or final.startswith("250"):
            received.fault = fault
            with self._lock:
                self.messages.append(received)
                number = len(self.messages)
            final = final or f"250 2.0.0 Ok: queued as Q{number}"
        await self._reply(writer, final, fault)
        return True

    def _draw(self, point: str) -> Fault | None:
        """Ask ``behaviour.faults`` for this connection's / transaction's fault, and log it."""
        if self.behaviour.faults is None:
            return None
        fault = self.behaviour.faults(point)
        if fault is not None:
            with self._lock:
                self.injected.append(fault)
        return fault

    @staticmethod
    def _replacement(stage: str, fault: Fault | None) -> str | None:
        if fault is not None and fault.stage == stage and fault.kind == "reply":
            return fault.reply
        return None

    async def _misbehave(
        self, stage: str, writer: asyncio.StreamWriter, fault: Fault | None = None
    ) -> bool:
        if stage in self.behaviour.delay:
            await asyncio.sleep(self.behaviour.delay[stage])
        if fault is not None and fault.stage == stage:
            if fault.kind == "late":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "stall":
                await asyncio.sleep(fault.seconds)
                writer.close()
                return True
            elif fault.kind == "close":
                writer.close()
                return True
            elif fault.kind == "shutdown":
                await self._reply(writer, SHUTDOWN_REPLY)
                writer.close()
                return True
        if self.behaviour.close_at == stage:
            writer.close()
            return True
        if self.behaviour.shutdown_at == stage:
            await self._reply(writer, SHUTDOWN_REPLY)
            writer.close()
            return True
        if self.behaviour.stall_at == stage:
            await asyncio.sleep(3600)
            return True
        return False

    async def _reply(
        self, writer: asyncio.StreamWriter, text: str, fault: Fault | None = None
    ) -> None:
        payload = (text + "\r\n").encode()
        trickle = self.behaviour.trickle
        if (
            fault is not None
            and fault.seconds
            and (fault.kind == "trickle" or (fault.kind == "reply" and text == fault.reply))
        ):
            trickle = fault.seconds
        if trickle:
            for byte in payload:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(trickle)
        else:
            writer.write(payload)
            await writer.drain()
