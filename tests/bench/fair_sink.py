"""A next-hop SMTP sink for the benchmarks that serves every connection fairly and discards mail.

Why not Postfix's ``smtp-sink``: it is one process with one event loop that keeps reading a
connection until its socket is empty. While several clients stream large messages at once, a
small transaction on another connection waits behind megabytes of queued DATA before its MAIL,
RCPT or DATA is even read, so the latency the benchmark reports is the sink's, not filterd's. A
real next hop (Postfix smtpd, one process per connection) does not behave like that.

This sink reads at most one 64 KB chunk per connection per event-loop round: after each chunk
it pauses reading on that connection and resumes it on the next round, whatever the loop's own
read strategy is. Message data is scanned for the end marker with ``bytes.find`` and dropped,
so memory stays bounded by the chunk size per connection. Pipelined commands are answered in
order. uvloop is used when it is installed. With ``--chunking`` it also offers CHUNKING and
takes BDAT (RFC 3030), to measure what BDAT saves over DATA.

    python tests/bench/fair_sink.py PORT [--chunking]   # 127.0.0.1:PORT until SIGTERM/SIGINT
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import cast

CHUNK = 64 * 1024
# RFC 5321 allows 512 bytes per command line; extensions add some. Anything longer is garbage.
MAX_LINE = 4096
END = b"\r\n.\r\n"

EHLO_REPLY = (
    b"250-fair-sink\r\n"
    b"250-PIPELINING\r\n"
    b"250-8BITMIME\r\n"
    b"250-SIZE 104857600\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n"
)
CHUNKING_EHLO_REPLY = EHLO_REPLY.replace(b"250 XFORWARD", b"250-CHUNKING\r\n250 XFORWARD")
OK = b"250 2.0.0 Ok\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"
SIMPLE_OK = frozenset({b"MAIL", b"RCPT", b"RSET", b"NOOP", b"XFORWARD"})


class SinkProtocol(asyncio.BufferedProtocol):
    """One SMTP connection: a command/data state machine over a reused 64 KB buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, chunking: bool = False) -> None:
        self.loop = loop
        self.chunking = chunking
        self.chunk_left = 0  # BDAT data still to skip
        self.chunk_last = False
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)
        self.pending = bytearray()  # a command line split across chunks
        self.in_data = False
        # The last (up to 4) bytes of message data seen: an end marker may straddle two chunks.
        self.tail = b""
        self.quitting = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not isinstance.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"220 fair-sink ESMTP\r\n")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        transport = self.transport
        assert transport is not None
        replies: list[bytes] = []
        pos = 0
        while pos < nbytes and not self.quitting:
            if self.chunk_left:
                pos = self._chunk(pos, nbytes, replies)
            elif self.in_data:
                pos = self._data(pos, nbytes, replies)
            else:
                pos = self._commands(pos, nbytes, replies)
        if replies:
            transport.write(b"".join(replies))
        if self.quitting:
            transport.close()
            return
        # Yield this connection's turn: other ready connections are read before this one again.
        transport.pause_reading()
        self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _data(self, pos: int, end: int, replies: list[bytes]) -> int:
        """Skip message data up to the end marker; return where command mode resumes."""
        buf = self.buffer
        if self.tail:
            # A marker that starts in the previous chunk ends within this one's first 4 bytes;
            # neither part alone can hold all 5 bytes, so any match here straddles the boundary.
            joined = self.tail + bytes(buf[pos : min(end, pos + 4)])
            found = joined.find(END)
            if found >= 0:
                return self._end_of_data(pos + found + len(END) - len(self.tail), replies)
        found = buf.find(END, pos, end)
        if found >= 0:
            return self._end_of_data(found + len(END), replies)
        self.tail = (self.tail + bytes(buf[max(pos, end - 4) : end]))[-4:]
        return end

    def _end_of_data(self, resume: int, replies: list[bytes]) -> int:
        self.in_data = False
        self.tail = b""
        replies.append(QUEUED)
        return resume

    def _chunk(self, pos: int, end: int, replies: list[bytes]) -> int:
        """Skip BDAT data; answer once the chunk is complete."""
        taken = min(self.chunk_left, end - pos)
        self.chunk_left -= taken
        if not self.chunk_left:
            replies.append(QUEUED if self.chunk_last else OK)
        return pos + taken

    def _commands(self, pos: int, end: int, replies: list[bytes]) -> int:
        """Answer every complete command line from ``pos``; stop early when DATA starts."""
        buf = self.buffer
        while pos < end:
            newline = buf.find(b"\n", pos, end)
            if newline < 0:
                self.pending += buf[pos:end]
                if len(self.pending) > MAX_LINE:
                    replies.append(b"500 5.5.2 Error: line too long\r\n")
                    self.quitting = True
                return end
            if self.pending:
                self.pending += buf[pos:newline]
                line = bytes(self.pending)
                self.pending.clear()
            else:
                line = bytes(buf[pos:newline])
            pos = newline + 1
            reply = self._command(line.rstrip(b"\r"))
            if reply:
                replies.append(reply)
            if self.in_data or self.chunk_left or self.quitting:
                break
        return pos

    def _command(self, line: bytes) -> bytes:
        verb = line.split(b" ", 1)[0].upper()
        if verb in SIMPLE_OK:
            return OK
        if verb == b"EHLO":
            return CHUNKING_EHLO_REPLY if self.chunking else EHLO_REPLY
        if verb == b"BDAT" and self.chunking:
            size, _, last = line[5:].partition(b" ")
            self.chunk_left, self.chunk_last = int(size), last.upper() == b"LAST"
            if not self.chunk_left:
                return QUEUED if self.chunk_last else OK
            return b""  # answered when the chunk's bytes are in (_chunk)
        if verb == b"HELO":
            return b"250 fair-sink\r\n"
        if verb == b"DATA":
            self.in_data = True
            # The CRLF that ended the DATA line counts: an empty message is just ".\r\n".
            self.tail = b"\r\n"
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"QUIT":
            self.quitting = True
            return b"221 2.0.0 Bye\r\n"
        return b"502 5.5.2 Error: command not recognized\r\n"


async def serve(port: int, chunking: bool = False) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkProtocol(loop, chunking), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()  # open connections die with the loop: nothing is queued, nothing is lost


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--chunking"]):
        sys.exit("usage: fair_sink.py PORT [--chunking]")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(int(sys.argv[1]), chunking=sys.argv[2:] == ["--chunking"]))


if __name__ == "__main__":
    main()
