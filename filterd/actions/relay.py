"""The next-hop SMTP client: pooled connections and lock-step, per-recipient transactions.

Why our own client rather than aiosmtplib: filterd forwards MAIL and each RCPT to the next hop
*as the client sends them* so that the client sees the next hop's own per-recipient verdict, and
it reuses connections across sessions (RSET between transactions). aiosmtplib has no pooling and
raises only when every recipient is refused; both would have to be worked around. The protocol
subset we need (EHLO, XFORWARD, MAIL, RCPT, DATA, RSET, QUIT) is small.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from filterd.errors import RelayError
from filterd.model import SmtpReply
from filterd.spool import iter_lines_blocks

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+(.*)$", re.DOTALL)
_ANY_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class NextHopReply:
    """A reply as the next hop sent it; ``as_reply`` keeps its code, enhanced code and text."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def as_reply(self) -> SmtpReply:
        last = self.lines[-1] if self.lines else ""
        match = _ENHANCED.match(last)
        if match:
            return SmtpReply(self.code, match.group(1), match.group(2))
        return SmtpReply(self.code, "", last)

    def __str__(self) -> str:
        return f"{self.code} {self.lines[-1] if self.lines else ''}".strip()


def stuff_block(block: bytes) -> bytes:
    """Wire form of a run of whole lines (it must start at a line start): CRLF line endings and
    dot-stuffing.

    Bare LF and bare CR are normalised to CRLF so that no ``<LF>.<LF>`` or ``<CR>.<CR>``
    sequence can reach the next hop and be read there as the end of the message (SMTP
    smuggling). (The ingress normalises already; this keeps the client safe on its own.)
    """
    if block.count(b"\r") != block.count(b"\n") or block.count(b"\r\n") != block.count(b"\n"):
        block = _ANY_LINE_ENDING.sub(b"\r\n", block)
    stuffed = block.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def end_of_data(last: bytes) -> bytes:
    """The end marker, with the CRLF the last line needs if it has none."""
    return b".\r\n" if not last or last.endswith(b"\r\n") else b"\r\n.\r\n"


def encode_data(raw: bytes) -> bytes:
    """Wire form of a whole message for DATA, end marker included."""
    stuffed = stuff_block(raw)
    return stuffed + end_of_data(stuffed)


def xtext(value: str) -> str:
    """RFC 1891 xtext encoding, as XFORWARD attribute values use it."""
    out: list[str] = []
    for char in value:
        code = ord(char)
        if char in "+=" or code < 33 or code > 126:
            out.extend(f"+{byte:02X}" for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


class NextHopConnection:
    """One SMTP connection to the next hop, after the greeting and EHLO."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.broken = False

    async def read_reply(self) -> NextHopReply:
        lines: list[str] = []
        try:
            # One bound for the whole reply: a next hop trickling a long multi-line reply must
            # not hold the client longer than relay_timeout.
            async with asyncio.timeout(self.timeout):
                return await self._read_lines(lines)
        except TimeoutError as exc:
            self.broken = True
            raise RelayError("timeout", "next hop did not answer in time") from exc
        except (ConnectionError, OSError, ValueError) as exc:
            self.broken = True
            raise RelayError("closed", f"connection lost: {exc}") from exc
        except RelayError:
            self.broken = True
            raise

    async def _read_lines(self, lines: list[str]) -> NextHopReply:
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise RelayError("closed", "next hop closed the connection")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit():
                raise RelayError("protocol", f"malformed reply line {text[:80]!r}")
            lines.append(text[4:])
            if len(text) == 3 or text[3] != "-":
                return NextHopReply(int(text[:3]), tuple(lines))
            if len(lines) > 100:
                raise RelayError("protocol", "reply with too many lines")

    async def send(self, payload: bytes) -> None:
        try:
            self.writer.write(payload)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except TimeoutError as exc:
            self.broken = True
            raise RelayError("timeout", "next hop did not read in time") from exc
        except (ConnectionError, OSError) as exc:
            self.broken = True
            raise RelayError("closed", f"connection lost: {exc}") from exc

    async def command(self, line: str) -> NextHopReply:
        await self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.read_reply()

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    async def close(self) -> None:
        if not self.broken:
            with contextlib.suppress(RelayError):
                await asyncio.wait_for(self.command("QUIT"), 2)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


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
    if not conn.supports("STARTTLS"):
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
    context = tls.context or ssl.create_default_context()
    try:
        async with asyncio.timeout(conn.timeout):
            await conn.writer.start_tls(context, server_hostname=tls.server_name or host)
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        conn.broken = True
        raise RelayError("protocol", f"TLS handshake with the next hop failed: {exc}") from exc
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
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError as exc:
        raise RelayError("connect", f"connecting to {host}:{port} timed out") from exc
    except OSError as exc:
        raise RelayError(
            "connect", f"cannot connect to {host}:{port}: {exc.strerror or exc}"
        ) from exc
    conn = NextHopConnection(reader, writer, timeout)
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


@dataclass
class Xforward:
    """XFORWARD attributes to pass on (decoded values; None or '' means unknown)."""

    attrs: dict[str, str] = field(default_factory=dict)

    def commands(self, supported: Iterable[str]) -> list[str]:
        allowed = {name.upper() for name in supported}
        parts = [
            f"{name}={xtext(value)}"
            for name, value in self.attrs.items()
            if name in allowed and value
        ]
        # Postfix accepts several XFORWARD commands; keep each under the 512-byte command limit.
        lines: list[str] = []
        current = "XFORWARD"
        for part in parts:
            if len(current) + 1 + len(part) > 500 and current != "XFORWARD":
                lines.append(current)
                current = "XFORWARD"
            current += " " + part
        if current != "XFORWARD":
            lines.append(current)
        return lines


class RelayClient:
    """A bounded pool of next-hop connections; each transaction borrows one and returns it."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        helo: str,
        pool_size: int = 32,
        tls: RelayTls = NO_TLS,
    ) -> None:
        self.tls = tls
        self.host = host
        self.port = port
        self.timeout = timeout
        self.helo = helo
        self.pool_size = pool_size
        self._idle: list[NextHopConnection] = []

    async def acquire(self) -> tuple[NextHopConnection, bool]:
        """A connection and whether it came from the pool (a pooled one may have gone stale)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.broken and not conn.reader.at_eof():
                return conn, True
            await conn.close()
        conn = await open_connection(
            self.host, self.port, timeout=self.timeout, helo=self.helo, tls=self.tls
        )
        return conn, False

    async def release(self, conn: NextHopConnection, *, clean: bool = False) -> None:
        """Return a connection to the pool; ``clean`` means the last transaction ended (DATA
        answered), otherwise RSET first. Anything odd closes it instead."""
        if conn.broken or len(self._idle) >= self.pool_size:
            await conn.close()
            return
        if clean:
            self._idle.append(conn)
            return
        try:
            reply = await conn.command("RSET")
        except RelayError:
            await conn.close()
            return
        if reply.code != 250:
            conn.broken = True
            await conn.close()
            return
        self._idle.append(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(conn.close() for conn in idle), return_exceptions=True)

    def transaction(self) -> RelayTransaction:
        return RelayTransaction(self)

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> NextHopReply:
        """Deliver a whole message (quarantine release, tests); raise RelayError unless every
        recipient and the data were accepted."""
        txn = self.transaction()
        try:
            reply = await txn.begin(sender, ())
            if reply.code != 250:
                raise RelayError(_refusal(reply.code), f"MAIL refused: {reply}")
            for rcpt in recipients:
                reply = await txn.add_recipient(rcpt)
                if reply.code not in (250, 251):
                    raise RelayError(_refusal(reply.code), f"RCPT {rcpt} refused: {reply}")
            reply = await txn.send_data(raw)
            if reply.code != 250:
                raise RelayError(_refusal(reply.code), f"DATA refused: {reply}")
            return reply
        finally:
            await txn.finish()


def _refusal(code: int) -> str:
    return "refused_5xx" if code >= 500 else "refused_4xx"


class RelayTransaction:
    """One mail transaction at the next hop, driven in lock-step with the client's commands."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self.conn: NextHopConnection | None = None
        self.sender = ""
        self.mail_options: tuple[str, ...] = ()
        self.xforward: Xforward | None = None
        self.accepted: list[str] = []
        self.data_sent = False
        self.completed = False

    @property
    def active(self) -> bool:
        return self.conn is not None

    def _mail_command(self, sender: str, options: Sequence[str]) -> str:
        assert self.conn is not None
        params = []
        for option in options:
            name = option.split("=", 1)[0].upper()
            # Pass on only what the next hop announced; SIZE is recomputed by the caller.
            if (
                (name == "BODY" and self.conn.supports("8BITMIME"))
                or (name == "SMTPUTF8" and self.conn.supports("SMTPUTF8"))
                or (name == "SIZE" and self.conn.supports("SIZE"))
            ):
                params.append(option)
        suffix = (" " + " ".join(params)) if params else ""
        return f"MAIL FROM:<{sender}>{suffix}"

    async def begin(
        self, sender: str, options: Sequence[str], xforward: Xforward | None = None
    ) -> NextHopReply:
        """Open (or reuse) a connection, send XFORWARD if announced, then MAIL FROM."""
        self.sender, self.mail_options, self.xforward = sender, tuple(options), xforward
        for attempt in range(2):
            conn, pooled = await self.client.acquire()
            self.conn = conn
            try:
                lines = []
                if xforward is not None and conn.supports("XFORWARD"):
                    lines = xforward.commands(conn.extensions["XFORWARD"].split())
                lines.append(self._mail_command(sender, options))
                if conn.supports("PIPELINING") and len(lines) > 1:
                    # XFORWARD and MAIL in one write (RFC 2920): one round trip instead of two.
                    # A refused XFORWARD only loses the client information; MAIL decides.
                    payload = "".join(line + "\r\n" for line in lines)
                    await conn.send(payload.encode("utf-8", "surrogateescape"))
                    replies = [await conn.read_reply() for _ in lines]
                    return replies[-1]
                for line in lines[:-1]:
                    if (await conn.command(line)).code != 250:
                        break
                return await conn.command(lines[-1])
            except RelayError as exc:
                self.conn = None
                await conn.close()
                # A pooled connection may have been closed by the next hop while idle: retry
                # once on a fresh one. A fresh connection that fails, or a next hop that is
                # merely slow (a timeout), is a real failure.
                if not pooled or attempt == 1 or exc.reason == "timeout":
                    raise
        raise AssertionError("unreachable")

    async def add_recipient(self, recipient: str) -> NextHopReply:
        assert self.conn is not None, "RCPT before MAIL"
        reply = await self.conn.command(f"RCPT TO:<{recipient}>")
        if reply.code in (250, 251):
            self.accepted.append(recipient)
        return reply

    async def restart(self, recipients: Sequence[str]) -> list[NextHopReply]:
        """Start the transaction over (RSET, MAIL, RCPT...) for a changed recipient list."""
        assert self.conn is not None
        reply = await self.conn.command("RSET")
        if reply.code != 250:
            raise RelayError("protocol", f"RSET refused: {reply}")
        self.accepted = []
        mail = await self.conn.command(self._mail_command(self.sender, self.mail_options))
        if mail.code != 250:
            return [mail]
        return [await self.add_recipient(rcpt) for rcpt in recipients]

    async def send_data(self, raw: bytes) -> NextHopReply:
        assert self.conn is not None
        reply = await self.conn.command("DATA")
        if reply.code != 354:
            return reply
        await self.conn.send(encode_data(raw))
        self.data_sent = True
        reply = await self.conn.read_reply()
        self.completed = True  # after the reply to the data the next hop is between transactions
        return reply

    async def send_data_stream(self, head: bytes, path: str, offset: int) -> NextHopReply:
        """DATA from a spooled message: ``head`` (the possibly rewritten start), then the spool
        file from ``offset`` on, read and sent block by block."""
        assert self.conn is not None
        reply = await self.conn.command("DATA")
        if reply.code != 354:
            return reply
        last = stuff_block(head)
        await self.conn.send(last)
        for block in iter_lines_blocks(path, offset):
            last = stuff_block(block)
            await self.conn.send(last)
        await self.conn.send(end_of_data(last))
        self.data_sent = True
        reply = await self.conn.read_reply()
        self.completed = True
        return reply

    async def finish(self) -> None:
        """End the transaction: the connection goes back to the pool (RSET) or is closed."""
        conn, self.conn = self.conn, None
        self.accepted = []
        if conn is not None:
            await self.client.release(conn, clean=self.completed)

    async def abandon(self) -> None:
        """Close the connection without reuse (client vanished, unknown state)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.broken = True
            await conn.close()
