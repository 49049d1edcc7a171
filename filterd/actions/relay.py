"""The next-hop SMTP client: pooled connections and per-recipient transactions in step.

A connection (connect, EHLO, STARTTLS, reading replies) is ``nexthop.py``; this module owns the
pool, the transactions driven in step with the client, and the message's wire form.

Why our own client rather than aiosmtplib: filterd forwards MAIL and each RCPT to the next hop
*as the client sends them* (a pipelined group of RCPTs together) so that the client sees the
next hop's own per-recipient verdict, and it reuses connections across sessions (RSET between
transactions). aiosmtplib has no pooling and raises only when every recipient is refused; both
would have to be worked around. The protocol subset we need (EHLO, XFORWARD, MAIL, RCPT, DATA,
RSET, QUIT) is small.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from filterd.actions.nexthop import (
    NO_TLS,
    NextHopConnection,
    NextHopReply,
    RelayTls,
    open_connection,
)
from filterd.errors import RelayError
from filterd.mime_headers import CR_BYTE, LF_BYTE, split_section
from filterd.spool import iter_lines_blocks

_ANY_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
# A spooled message is read, stuffed and sent this much at a time, with the event loop free to
# run other sessions in between: one step costs a fraction of a millisecond (1 MB took ~5 ms).
STREAM_BLOCK = 64 * 1024
_XTEXT_SAFE = re.compile(r"[!-*,-<>-~]*")  # printable ASCII except "+" and "="
_is_plain_xtext = _XTEXT_SAFE.fullmatch
# The MAIL parameters passed on, each with the extension the next hop must have announced.
_MAIL_PARAMETER_EXTENSIONS = {"BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8", "SIZE": "SIZE"}


def crlf_lines(block: bytes) -> bytes:
    """``block`` with every line ending (CRLF, bare LF, bare CR) as CRLF."""
    # Without its CRLFs, a block that has no bare CR and no bare LF has no CR or LF at all. The
    # usual message passes with one copy and two memchr scans: a quarter of the time of
    # counting CRs, LFs and CRLFs (CPython counts a single byte one byte at a time).
    rest = block.replace(b"\r\n", b"")
    if CR_BYTE not in rest and LF_BYTE not in rest:
        return block
    return _ANY_LINE_ENDING.sub(b"\r\n", block)


def stuff_block(block: bytes) -> bytes:
    """Wire form of a run of whole lines (it must start at a line start): CRLF line endings and
    dot-stuffing.

    Bare LF and bare CR are normalised to CRLF so that no ``<LF>.<LF>`` or ``<CR>.<CR>``
    sequence can reach the next hop and be read there as the end of the message (SMTP
    smuggling). (The ingress normalises already; this keeps the client safe on its own.)
    """
    lines = crlf_lines(block)
    # (find first: replace's own scan is slower, and most mail has nothing to stuff)
    stuffed = lines.replace(b"\r\n.", b"\r\n..") if lines.find(b"\r\n.") >= 0 else lines
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def end_of_data(last: bytes) -> bytes:
    """The end marker, with the CRLF the last line needs if it has none."""
    return b".\r\n" if not last or last.endswith(b"\r\n") else b"\r\n.\r\n"


def encode_data(raw: bytes) -> bytes:
    """Wire form of a whole message for DATA, end marker included."""
    stuffed = stuff_block(raw)
    return stuffed + end_of_data(stuffed)


def chunk_data(raw: bytes) -> bytes:
    """A whole message as one BDAT chunk (RFC 3030): CRLF line endings, a final CRLF, and no
    dot-stuffing (BDAT counts bytes instead of looking for an end marker)."""
    raw = crlf_lines(raw)
    return raw if not raw or raw.endswith(b"\r\n") else raw + b"\r\n"


def mail_options_for(sender: str, recipients: Sequence[str], raw: bytes) -> tuple[str, ...]:
    """The MAIL parameters a whole message needs when the ones its client gave are not known
    (a quarantine release): BODY=8BITMIME for 8-bit content, SMTPUTF8 (RFC 6531) for a UTF-8
    address or UTF-8 header fields. Each goes out only if the next hop announced it."""
    options: list[str] = []
    utf8_headers = False
    if not raw.isascii():
        options.append("BODY=8BITMIME")
        _, header_end, _ = split_section(raw, 0, len(raw))
        utf8_headers = not raw[:header_end].isascii()
    if utf8_headers or not all(address.isascii() for address in (sender, *recipients)):
        options.append("SMTPUTF8")
    return tuple(options)


def first_refused(
    recipients: Sequence[str], replies: Sequence[NextHopReply]
) -> tuple[str, NextHopReply] | None:
    """The first recipient the next hop did not accept, with its reply; None if it took them
    all. ``replies`` may hold only MAIL's reply when it refused MAIL (RelayTransaction.restart):
    that refuses the first recipient."""
    for recipient, reply in zip(recipients, replies, strict=False):
        if reply.code not in (250, 251):
            return recipient, reply
    return None


def xtext(value: str) -> str:
    """RFC 1891 xtext encoding, as XFORWARD attribute values use it."""
    if _is_plain_xtext(value):
        return value  # the usual case: an address, a host name, a queue id
    out: list[str] = []
    for char in value:
        code = ord(char)
        if char in "+=" or code < 33 or code > 126:
            # surrogateescape: a byte that was not UTF-8 where the client sent it (a HELO
            # name, say) goes on as that same byte, never an error.
            out.extend(f"+{byte:02X}" for byte in char.encode("utf-8", "surrogateescape"))
        else:
            out.append(char)
    return "".join(out)


@dataclass
class Xforward:
    """XFORWARD attributes to pass on (decoded values; None or '' means unknown)."""

    attrs: dict[str, str] = field(default_factory=dict)

    def commands(self, supported: Iterable[str]) -> list[str]:
        allowed = set(map(str.upper, supported))
        parts = [
            f"{name}={xtext(value)}"
            for name, value in self.attrs.items()
            if name in allowed and value
        ]
        # Postfix accepts several XFORWARD commands; keep each under the 512-byte command limit.
        line = " ".join(["XFORWARD", *parts])
        if len(line) <= 500:  # the usual case: all in one, as the loop below would put them
            return [line] if parts else []
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


def _stop_expiry(conn: NextHopConnection) -> None:
    if conn.expiry is not None:
        conn.expiry.cancel()
        conn.expiry = None


class RelayClient:
    """A bounded pool of next-hop connections; each transaction borrows one and returns it.

    The pool is a stack: the connection returned last is lent first, so at a quiet time the
    ones left over from a busy one stay unused and are closed ``idle_timeout`` after their
    last use (a connection that waits at the next hop holds one of its process slots).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        helo: str,
        pool_size: int = 32,
        idle_timeout: float = 2.0,
        tls: RelayTls = NO_TLS,
    ) -> None:
        self.tls = tls
        self.host = host
        self.port = port
        self.timeout = timeout
        self.helo = helo
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self._idle: list[NextHopConnection] = []
        self._closing: set[asyncio.Task[None]] = set()  # idle connections saying QUIT

    async def acquire(self) -> tuple[NextHopConnection, bool]:
        """A connection and whether it came from the pool (a pooled one may have gone stale)."""
        while self._idle:
            conn = self._idle.pop()
            _stop_expiry(conn)
            if not conn.stale:
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
            self._park(conn)
            return
        try:
            reply = await conn.command("RSET")
        except RelayError:
            await conn.close()
            return
        except BaseException:
            # Cancelled (the client's session ended) while the RSET was out: nobody holds this
            # connection any more, so it goes now rather than stay open until the next hop's
            # idle timeout.
            conn.abort()
            raise
        if reply.code != 250:
            conn.broken = True
            await conn.close()
            return
        self._park(conn)

    def _park(self, conn: NextHopConnection) -> None:
        self._idle.append(conn)
        conn.expiry = conn.protocol.loop.call_later(self.idle_timeout, self._expire, conn)

    def _expire(self, conn: NextHopConnection) -> None:
        """Close a connection that stayed unused in the pool for ``idle_timeout``."""
        conn.expiry = None
        if conn not in self._idle:
            return  # lent out meanwhile (its timer was stopped) or already closed
        self._idle.remove(conn)
        task = conn.protocol.loop.create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            _stop_expiry(conn)
        closing = [conn.close() for conn in idle]
        await asyncio.gather(*closing, *self._closing, return_exceptions=True)

    def transaction(self) -> RelayTransaction:
        return RelayTransaction(self)

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> NextHopReply:
        """Deliver a whole message (quarantine release, tests); raise RelayError unless every
        recipient and the data were accepted."""
        txn = self.transaction()
        try:
            txn.begin(sender, mail_options_for(sender, recipients, raw))
            refused = first_refused(recipients, await txn.add_recipients(recipients))
            if refused is not None:
                rcpt, reply = refused
                raise RelayError(refusal_reason(reply.code), f"RCPT {rcpt} refused: {reply}")
            reply = await txn.send_data(raw)
            if reply.code != 250:
                raise RelayError(refusal_reason(reply.code), f"DATA refused: {reply}")
            return reply
        finally:
            await txn.finish()


def refusal_reason(code: int) -> str:
    """The relay error reason (filterd_relay_errors_total) of a next hop's 4xx/5xx reply."""
    return "refused_5xx" if code >= 500 else "refused_4xx"


class RelayTransaction:
    """One mail transaction at the next hop, driven in step with the client's commands."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self.conn: NextHopConnection | None = None
        self.sender = ""
        self.mail_options: tuple[str, ...] = ()
        self.xforward: Xforward | None = None
        self.accepted: list[str] = []
        self.mail_accepted = False  # MAIL answered 250 by the next hop in this transaction
        self.data_sent = False
        self.completed = False

    @property
    def active(self) -> bool:
        return self.conn is not None

    def _mail_command(self, sender: str, options: Sequence[str]) -> str:
        assert self.conn is not None
        if not options:
            return f"MAIL FROM:<{sender}>"
        extensions = self.conn.extensions
        # Pass on only what the next hop announced; SIZE is recomputed by the caller.
        params = [
            option
            for option in options
            if _MAIL_PARAMETER_EXTENSIONS.get(option.partition("=")[0].upper()) in extensions
        ]
        suffix = (" " + " ".join(params)) if params else ""
        return f"MAIL FROM:<{sender}>{suffix}"

    def begin(self, sender: str, options: Sequence[str], xforward: Xforward | None = None) -> None:
        """Remember the sender. MAIL goes to the next hop together with the first RCPT: one
        write and one round trip for both instead of two. As with Postfix's default
        ``smtpd_delay_reject``, a sender the next hop refuses is refused at RCPT."""
        self.sender, self.mail_options, self.xforward = sender, tuple(options), xforward
        self.mail_accepted = False

    async def add_recipients(self, recipients: Sequence[str]) -> list[NextHopReply]:
        """RCPT at the next hop for each recipient, with XFORWARD and MAIL first if the
        transaction has not started there yet: all in one write when the next hop offers
        PIPELINING (RFC 2920), one by one otherwise. Returns the replies in order. A refused
        MAIL is the reply of every recipient, and the next RCPT tries MAIL again."""
        rcpts = [f"RCPT TO:<{recipient}>" for recipient in recipients]
        if self.mail_accepted:
            assert self.conn is not None
            replies = await self._commands(self.conn, rcpts)
        else:
            mail, replies = await self._start_with(rcpts)
            if mail.code != 250:
                return [mail] * len(rcpts)
            self.mail_accepted = True
        accepted = self.accepted
        for recipient, reply in zip(recipients, replies, strict=True):
            if reply.code in (250, 251):
                accepted.append(recipient)
        return replies

    @staticmethod
    async def _commands(conn: NextHopConnection, lines: Sequence[str]) -> list[NextHopReply]:
        """Each line's reply: the lines in one write if the next hop pipelines."""
        if "PIPELINING" in conn.extensions:
            # Each line with its CRLF (and nothing at all for no lines).
            await conn.send("\r\n".join([*lines, ""]).encode("utf-8", "surrogateescape"))
            replies = []
            for _ in lines:  # a loop: a comprehension with await is one more coroutine
                replies.append(await conn.read_reply())
            return replies
        return [await conn.command(line) for line in lines]

    async def _start_with(self, rcpts: Sequence[str]) -> tuple[NextHopReply, list[NextHopReply]]:
        """XFORWARD (if announced), MAIL and ``rcpts``: pipelined in one write when the next
        hop offers PIPELINING (RFC 2920), one by one otherwise. Returns the MAIL reply and the
        RCPT replies."""
        for attempt in range(2):
            pooled = False
            if self.conn is None:
                self.conn, pooled = await self.client.acquire()
            conn = self.conn
            extensions = conn.extensions
            try:
                lines = []
                if self.xforward is not None and "XFORWARD" in extensions:
                    lines = self.xforward.commands(extensions["XFORWARD"].split())
                lines.append(self._mail_command(self.sender, self.mail_options))
                if "PIPELINING" in extensions:
                    # A refused XFORWARD only loses the client information; MAIL decides. After
                    # a refused MAIL the next hop refuses the RCPTs too (no transaction).
                    replies = await self._commands(conn, [*lines, *rcpts])
                    return replies[len(lines) - 1], replies[len(lines) :]
                for line in lines[:-1]:
                    if (await conn.command(line)).code != 250:
                        break
                mail = await conn.command(lines[-1])
                if mail.code == 421:
                    # The next hop is closing (an idle timeout crossing our MAIL on a pooled
                    # connection): a failed connection, retried below, not a refusal.
                    raise RelayError("closed", f"next hop is closing: {mail}")  # noqa: TRY301
                if mail.code != 250:
                    return mail, [mail] * len(rcpts)
                return mail, await self._commands(conn, rcpts)
            except RelayError as exc:
                self.conn = None
                await conn.close()
                # A pooled connection may have been closed by the next hop while idle: retry
                # once on a fresh one. A fresh connection that fails, or a next hop that is
                # merely slow (a timeout), is a real failure.
                if not pooled or attempt == 1 or exc.reason == "timeout":
                    raise
        raise AssertionError("unreachable")

    async def restart(self, recipients: Sequence[str]) -> list[NextHopReply]:
        """Start the transaction over (RSET, MAIL, RCPT...) for a changed recipient list."""
        assert self.conn is not None
        reply = await self.conn.command("RSET")
        if reply.code != 250:
            raise RelayError("protocol", f"RSET refused: {reply}")
        self.accepted = []
        self.mail_accepted = False
        mail = await self.conn.command(self._mail_command(self.sender, self.mail_options))
        if mail.code != 250:
            return [mail]
        self.mail_accepted = True
        return await self.add_recipients(recipients)

    async def send_data(self, raw: bytes) -> NextHopReply:
        """The message from memory: BDAT when the next hop offers CHUNKING, else DATA."""
        assert self.conn is not None
        if "CHUNKING" in self.conn.extensions:
            return await self._send_chunk(raw)
        await self.conn.send(b"DATA\r\n")
        # The wire form (dot-stuffed, end marker) is made while DATA travels to the next hop
        # and back, not after its 354 arrives: that keeps it off the message's latency.
        wire = encode_data(raw)
        reply = await self.conn.read_reply()
        if reply.code != 354:
            return self._refusal(reply, "DATA")
        await self.conn.send(wire)
        self.data_sent = True
        reply = self._final(await self.conn.read_reply())
        self.completed = True  # after the reply to the data the next hop is between transactions
        return reply

    def _refusal(self, reply: NextHopReply, command: str) -> NextHopReply:
        """A reply other than the go-ahead to DATA: a 4xx/5xx refusal is the message's reply;
        anything else (a 250 where 354 belongs, say) means replies and commands are out of
        step, and taken as the message's reply it would say 250 for mail never sent."""
        if reply.code >= 400:
            return reply
        assert self.conn is not None
        self.conn.broken = True
        raise RelayError("protocol", f"unexpected reply to {command}: {reply}")

    def _final(self, reply: NextHopReply) -> NextHopReply:
        """The reply to the message itself, which only a 2xx, 4xx or 5xx can be."""
        if 200 <= reply.code < 300 or reply.code >= 400:
            return reply
        assert self.conn is not None
        self.conn.broken = True
        raise RelayError("protocol", f"unexpected reply to the message: {reply}")

    async def _send_chunk(self, raw: bytes) -> NextHopReply:
        """The whole message as one ``BDAT n LAST``, command and data in one write: one round
        trip where DATA takes two (DATA, 354, then the message), and no dot-stuffing."""
        assert self.conn is not None
        chunk = chunk_data(raw)
        await self.conn.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        self.data_sent = True
        reply = self._final(await self.conn.read_reply())
        # After a refused BDAT the next hop may still hold the transaction (RFC 3030 leaves
        # it to the client to reset): only a delivered message leaves it between transactions
        # without an RSET.
        self.completed = reply.code == 250
        return reply

    async def send_data_stream(self, head: bytes, path: str, offset: int) -> NextHopReply:
        """DATA from a spooled message: ``head`` (the possibly rewritten start), then the spool
        file from ``offset`` on, read and sent block by block."""
        assert self.conn is not None
        reply = await self.conn.command("DATA")
        if reply.code != 354:
            return self._refusal(reply, "DATA")
        try:
            last = stuff_block(head)
            await self.conn.send(last)
            for block in iter_lines_blocks(path, offset, STREAM_BLOCK):
                last = stuff_block(block)
                await self.conn.send(last)
                # send() returns without suspending while the next hop keeps up (the socket
                # takes every block at once), so without this the whole message would go out
                # in one step of the event loop, stalling every other session of this worker.
                await asyncio.sleep(0)
        except BaseException:
            # Stopped in the middle of the message (the spool file failed, say): the next hop
            # reads whatever comes next as message data, so the connection cannot be used
            # again, not even for the RSET that would otherwise end the transaction.
            self.conn.broken = True
            raise
        await self.conn.send(end_of_data(last))
        self.data_sent = True
        reply = self._final(await self.conn.read_reply())
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
