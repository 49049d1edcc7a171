"""One SMTP connection to the next hop: connect, greeting, EHLO, STARTTLS, and replies.

Replies are parsed as bytes arrive (``_ReplyReader``, an asyncio Protocol) and handed to the one
command waiting for them; every wait is bounded by the relay timeout. Transactions and the pool
of these connections are ``relay.py``.

No wait here uses ``asyncio.timeout()`` or (since Python 3.12 built on it) ``asyncio.wait_for``:
both need a current task, and an SMTP session runs its first steps outside any task
(``FilterdSMTP._advance``). Bounds are timer handles or ``asyncio.wait`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from filterd.errors import RelayError
from filterd.model import SmtpReply

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+(.*)$", re.DOTALL)
_T = TypeVar("_T")


async def _finished_within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Whether ``future`` is done within ``seconds``; it is not cancelled either way."""
    done, _ = await asyncio.wait((future,), timeout=seconds)
    return bool(done)


async def _bounded(awaitable: Awaitable[_T], seconds: float) -> _T:
    """``asyncio.wait_for`` that also works outside a task (see the module docstring):
    the result of ``awaitable``, or TimeoutError after ``seconds`` (and it is cancelled)."""
    future = asyncio.ensure_future(awaitable)
    try:
        finished = await _finished_within(future, seconds)
    except BaseException:
        future.cancel()
        raise
    if not finished:
        future.cancel()
        # Its outcome no longer matters, but must be read, or asyncio logs it when freed.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise TimeoutError
    return future.result()


@dataclass(frozen=True)
class NextHopReply:
    """A reply as the next hop sent it; ``as_reply`` keeps its code, enhanced code and text."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def as_reply(self) -> SmtpReply:
        return _reply_of(self.code, self.lines[-1] if self.lines else "")

    def __str__(self) -> str:
        return f"{self.code} {self.lines[-1] if self.lines else ''}".strip()


@functools.lru_cache(maxsize=256)
def _reply_of(code: int, last: str) -> SmtpReply:
    """The SmtpReply of a next hop's reply with this code and last line. A next hop says the
    same few things on every transaction, so each is parsed once; SmtpReply is immutable."""
    match = _ENHANCED.match(last)
    if match:
        enhanced, text = match.groups()
        return SmtpReply(code, enhanced, text)
    return SmtpReply(code, "", last)


_MAX_REPLY_LINE = 65536  # bytes without a line end before a reply counts as malformed
_MAX_REPLY_LINES = 100
# Bounds of _ReplyReader.known: replies that differ every time (with a queue id, say) empty it
# now and then, and a long line is not worth keeping.
_MAX_KNOWN_REPLIES = 32
_MAX_KNOWN_LINE = 200


class _ReplyReader(asyncio.Protocol):
    """Splits what the next hop sends into replies as the bytes arrive.

    A Protocol rather than a StreamReader: most replies arrive whole in one segment, so parsing
    them in ``data_received`` and handing a finished reply to the one waiting command costs one
    future per reply instead of a coroutine per line.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lines: list[str] = []  # the lines of the reply being received
        # Single-line replies by their bytes: a next hop says the same few things ("250 2.1.0
        # Ok", "354 End data...") on every transaction, and each is parsed once.
        self.known: dict[bytes, NextHopReply] = {}
        self.replies: deque[NextHopReply] = deque()
        self.failure: RelayError | None = None  # set once; the connection is unusable after it
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None  # set while the transport is paused
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance() check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        if self.failure is None:
            if buffer:  # the start of a line came in an earlier segment
                data = bytes(buffer) + data
                buffer.clear()
            # All the segment's lines in one pass: usually one whole reply, or a pipelined
            # group's replies, with nothing left over.
            lines = data.split(b"\n")
            buffer += lines.pop()  # the part of a line still to come
            replies = self.replies
            known = self.known
            pending = iter(lines)
            for line in pending:
                reply = known.get(line)
                if reply is not None and not self.lines:
                    replies.append(reply)
                    continue
                text = line.decode("utf-8", "replace").rstrip("\r")
                code = text[:3]
                # ASCII digits only: str.isdigit() takes "²", which int() refuses, and "١٢٣".
                if len(code) < 3 or not (code.isascii() and code.isdigit()):
                    self._fail(RelayError("protocol", f"malformed reply line {text[:80]!r}"))
                    # Nothing after it is read: it stays in the buffer, as unasked() sees it.
                    buffer[:0] = b"\n".join([*pending, b""])
                    break
                reply_lines = self.lines
                reply_lines.append(text[4:])
                if text[3:4] != "-":
                    reply = NextHopReply(int(code), tuple(reply_lines))
                    replies.append(reply)
                    self.lines = []
                    if len(reply_lines) == 1 and len(line) <= _MAX_KNOWN_LINE:
                        if len(known) >= _MAX_KNOWN_REPLIES:
                            known.clear()
                        known[line] = reply
                elif len(reply_lines) > _MAX_REPLY_LINES:
                    self._fail(RelayError("protocol", "reply with too many lines"))
                    buffer[:0] = b"\n".join([*pending, b""])
                    break
        else:
            buffer += data  # unread: the connection is failing
        if len(buffer) > _MAX_REPLY_LINE:
            self._fail(RelayError("protocol", "reply line too long"))
        waiter = self.waiter
        if waiter is not None and (self.replies or self.failure) and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: RelayError) -> None:
        if self.failure is None:
            self.failure = error
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done() and (self.replies or self.failure):
            waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close our side too: a next hop that stops sending is gone

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f"connection lost: {exc}" if exc else "next hop closed the connection"
        if self.failure is None:
            self.failure = RelayError("closed", detail)
        self._wake()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)


class NextHopConnection:
    """One SMTP connection to the next hop, after the greeting and EHLO."""

    def __init__(
        self, transport: asyncio.Transport, protocol: _ReplyReader, timeout: float
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.timeout = timeout
        # EHLO keywords, upper case (ask ``"PIPELINING" in extensions``), and their parameters
        self.extensions: dict[str, str] = {}
        self.broken = False
        # While the connection waits in the pool: the timer that closes it (RelayClient).
        self.expiry: asyncio.TimerHandle | None = None

    @property
    def stale(self) -> bool:
        """Closed, failed, or holding a reply nobody asked for (e.g. an idle-timeout 421)."""
        protocol = self.protocol
        return self.broken or protocol.failure is not None or bool(protocol.replies)

    async def read_reply(self) -> NextHopReply:
        protocol = self.protocol
        replies = protocol.replies
        if replies:
            return replies.popleft()
        if protocol.failure is None:
            # One bound for the whole reply: a next hop trickling a long multi-line reply must
            # not hold the client longer than relay_timeout. A timer handle, not
            # asyncio.timeout(): this runs several times per message.
            waiter = protocol.waiter = protocol.loop.create_future()
            timer = protocol.loop.call_later(self.timeout, self._expire, waiter)
            try:
                await waiter
            except BaseException:
                self.broken = True  # cancelled mid-reply: the conversation state is unknown
                raise
            finally:
                timer.cancel()
                protocol.waiter = None
            if replies:
                return replies.popleft()
        self.broken = True
        assert protocol.failure is not None
        raise protocol.failure

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self.protocol._fail(RelayError("timeout", "next hop did not answer in time"))
            self.protocol._wake()

    def unasked(self) -> str | None:
        """What the next hop said that no command asked for, if anything is waiting."""
        protocol = self.protocol
        if protocol.replies:
            return str(protocol.replies[0])
        if protocol.lines or protocol.buffer:
            return "part of a reply"
        return None

    async def send(self, payload: bytes) -> None:
        protocol = self.protocol
        if protocol.failure is not None or self.transport.is_closing():
            self.broken = True
            raise protocol.failure or RelayError("closed", "next hop closed the connection")
        unasked = self.unasked()
        if unasked is not None:
            # A reply nobody asked for: read on, every reply would answer the command before
            # it (a refused RCPT read as accepted, a 250 for RCPT taken as the message's).
            self.broken = True
            raise RelayError("protocol", f"next hop said what no command asked for: {unasked}")
        self.transport.write(payload)
        drained = protocol.drained
        if drained is None:
            return  # below the high-water mark: nothing to wait for
        if not await _finished_within(drained, self.timeout):
            self.broken = True
            protocol._fail(RelayError("timeout", "next hop did not read in time"))
            raise RelayError("timeout", "next hop did not read in time")
        if protocol.failure is not None:
            self.broken = True
            raise protocol.failure

    async def command(self, line: str) -> NextHopReply:
        await self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.read_reply()

    def abort(self) -> None:
        """Drop the connection at once (no QUIT): for when nothing may be awaited any more."""
        self.broken = True
        self.transport.abort()

    async def close(self) -> None:
        if not self.broken and self.protocol.failure is None:
            with contextlib.suppress(RelayError, TimeoutError):
                await _bounded(self.command("QUIT"), 2)
        self.transport.close()
        if not await _finished_within(self.protocol.lost, 2):
            self.transport.abort()


@dataclass(frozen=True)
class RelayTls:
    """STARTTLS to the next hop: ``opportunistic`` when offered, or ``required``."""

    mode: str  # "none" | "opportunistic" | "required"
    context: ssl.SSLContext | None = None
    server_name: str | None = None


NO_TLS = RelayTls("none")


async def _ehlo(conn: NextHopConnection, helo: str) -> None:
    ehlo = await conn.command(f"EHLO {helo}")
    conn.extensions = {}
    if ehlo.code == 250:
        for entry in ehlo.lines[1:]:
            name, _, params = entry.partition(" ")
            conn.extensions[name.upper()] = params
        return
    helo_reply = await conn.command(f"HELO {helo}")
    if helo_reply.code != 250:
        raise RelayError("protocol", f"HELO refused: {helo_reply}")


async def _starttls(conn: NextHopConnection, host: str, helo: str, tls: RelayTls) -> None:
    if "STARTTLS" not in conn.extensions:
        if tls.mode == "required":
            raise RelayError(
                "protocol", "next hop does not offer STARTTLS (relay_tls.mode: required)"
            )
        return
    reply = await conn.command("STARTTLS")
    if reply.code != 220:
        if tls.mode == "required":
            raise RelayError("protocol", f"STARTTLS refused: {reply}")
        return
    unasked = conn.unasked()
    if unasked is not None:
        # Bytes that came in the clear with the 220 would be read as if they had come over
        # TLS (the injection of CVE-2011-0411): someone on the path is talking.
        conn.broken = True
        raise RelayError("protocol", f"next hop sent more after its STARTTLS reply: {unasked}")
    context = tls.context or ssl.create_default_context()
    loop = conn.protocol.loop
    try:
        transport = await _bounded(
            loop.start_tls(
                conn.transport, conn.protocol, context, server_hostname=tls.server_name or host
            ),
            conn.timeout,
        )
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        conn.broken = True
        raise RelayError("protocol", f"TLS handshake with the next hop failed: {exc}") from exc
    if transport is None:
        conn.broken = True
        raise RelayError("closed", "next hop closed the connection during the TLS handshake")
    conn.transport = conn.protocol.transport = transport
    await _ehlo(conn, helo)


# The bound applies to each step and stays with the connection, so it is a parameter.
async def open_connection(
    host: str,
    port: int,
    *,
    timeout: float,  # noqa: ASYNC109
    helo: str,
    tls: RelayTls = NO_TLS,
) -> NextHopConnection:
    """Connect, read the greeting, say EHLO (HELO as a fallback), STARTTLS if configured."""
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await _bounded(
            loop.create_connection(lambda: _ReplyReader(loop), host, port), timeout
        )
    except TimeoutError as exc:
        raise RelayError("connect", f"connecting to {host}:{port} timed out") from exc
    except OSError as exc:
        raise RelayError(
            "connect", f"cannot connect to {host}:{port}: {exc.strerror or exc}"
        ) from exc
    conn = NextHopConnection(transport, protocol, timeout)
    try:
        greeting = await conn.read_reply()
        if greeting.code != 220:
            raise RelayError(  # noqa: TRY301 - the handler below closes the connection for every failure
                "refused_4xx" if greeting.code < 500 else "refused_5xx", f"greeting: {greeting}"
            )
        await _ehlo(conn, helo)
        if tls.mode != "none":
            await _starttls(conn, host, helo, tls)
    except BaseException:
        conn.broken = True
        await conn.close()
        raise
    return conn
