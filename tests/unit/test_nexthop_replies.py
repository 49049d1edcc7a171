"""Reading the next hop's replies: a segment's lines are parsed in one pass, and a single-line
reply seen before is taken from those already parsed. Both must read every stream exactly as
a reader that finds, decodes and parses one line at a time, however the stream is cut into
segments: the same replies, the same failure at the same point, the same bytes left unread."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.actions import nexthop
from filterd.actions.nexthop import NextHopConnection, NextHopReply, _ReplyReader
from filterd.errors import RelayError
from filterd.model import SmtpReply


class LineByLineReader(_ReplyReader):
    """The reference: each line found, sliced, decoded and parsed on its own."""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while self.failure is None:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                break
            self._line(buffer[start:newline].decode("utf-8", "replace").rstrip("\r"))
            start = newline + 1
        del buffer[:start]
        if len(buffer) > nexthop._MAX_REPLY_LINE:
            self._fail(RelayError("protocol", "reply line too long"))
        self._wake()

    def _line(self, text: str) -> None:
        if len(text) < 3 or not (text[:3].isascii() and text[:3].isdigit()):
            self._fail(RelayError("protocol", f"malformed reply line {text[:80]!r}"))
            return
        self.lines.append(text[4:])
        if len(text) == 3 or text[3] != "-":
            self.replies.append(NextHopReply(int(text[:3]), tuple(self.lines)))
            self.lines = []
        elif len(self.lines) > nexthop._MAX_REPLY_LINES:
            self._fail(RelayError("protocol", "reply with too many lines"))


class RecordingTransport:
    def __init__(self) -> None:
        self.aborts = 0

    def abort(self) -> None:
        self.aborts += 1

    def is_closing(self) -> bool:
        return False


# Lines that matter to a reply parser: final and continuation lines, an empty text, replies
# seen again, too short, not digits, digits int() refuses ("²"), digits it takes ("١٢٣"), bytes
# that are not UTF-8, stray CRs, and lines longer than a small length bound.
LINES = st.sampled_from(
    [
        b"250 2.1.0 Ok",
        b"250 2.1.0 Ok\r",
        b"354 End data with <CR><LF>.<CR><LF>\r",
        b"250-PIPELINING\r",
        b"250-8BITMIME",
        b"250 \r",
        b"250 padded  \r",
        b"250\r",
        b"250",
        b"25\r",
        b"",
        b"\r",
        b"abc def\r",
        b"2x0 no\r",
        b"421 4.4.2 closing\r\r",
        "²50 odd\r".encode(),
        "١٢٣ odd\r".encode(),
        b"550 5.1.1 \xe2\x82\r",
        b"\xff\xfe0 x\r",
        b"250 " + b"x" * 50 + b"\r",
    ]
)


@st.composite
def segmented_streams(draw: Any) -> list[bytes]:
    lines = draw(st.lists(LINES, max_size=30))
    stream = b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"25", b"\xe2"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _state(reader: _ReplyReader, conn: NextHopConnection, transport: RecordingTransport) -> Any:
    failure = reader.failure
    return (
        list(reader.replies),
        None if failure is None else (failure.reason, str(failure)),
        list(reader.lines),
        bytes(reader.buffer),
        conn.unasked(),
        transport.aborts,
        reader.waiter is not None and reader.waiter.done(),
    )


def _feed(reader: _ReplyReader, segment: bytes) -> Exception | None:
    try:
        reader.data_received(segment)
    except Exception as exc:  # the same exception is part of the behaviour compared
        return exc
    return None


@settings(deadline=None, max_examples=1500)
@given(segmented_streams(), st.booleans())
def test_every_stream_reads_as_it_does_line_by_line(segments: list[bytes], small: bool) -> None:
    loop = asyncio.new_event_loop()
    limits = {"_MAX_REPLY_LINE": 40 if small else nexthop._MAX_REPLY_LINE}
    limits["_MAX_REPLY_LINES"] = 2 if small else nexthop._MAX_REPLY_LINES
    try:
        with mock.patch.multiple(nexthop, **limits):
            readers = []
            for kind in (LineByLineReader, _ReplyReader):
                transport = RecordingTransport()
                reader = kind(loop)
                reader.connection_made(transport)  # type: ignore[arg-type]
                conn = NextHopConnection(transport, reader, 1.0)  # type: ignore[arg-type]
                readers.append((reader, conn, transport))
            for segment in segments:
                outcomes = []
                for reader, conn, transport in readers:
                    reader.waiter = loop.create_future()
                    error = _feed(reader, segment)
                    outcomes.append(
                        (
                            None if error is None else (type(error), str(error)),
                            _state(reader, conn, transport),
                        )
                    )
                (reference_error, reference), (error, state) = outcomes
                assert error == reference_error
                if error is not None:
                    # The transport is closed on an exception from data_received, so no
                    # more segments come: what counts is what was read up to it.
                    assert state[:3] == reference[:3]
                    assert state[4:] == reference[4:]
                    break
                assert state == reference
    finally:
        loop.close()


def _reader() -> _ReplyReader:
    reader = _ReplyReader(asyncio.new_event_loop())
    reader.connection_made(RecordingTransport())  # type: ignore[arg-type]
    return reader


def test_a_single_line_reply_seen_before_is_not_parsed_again() -> None:
    reader = _reader()
    reader.data_received(b"250 2.1.0 Ok\r\n")
    reader.data_received(b"250 2.1.0 Ok\r\n250 2.1.0 Ok\r\n")
    first, second, third = reader.replies
    assert first == NextHopReply(250, ("2.1.0 Ok",))
    assert second is first
    assert third is first
    reader.loop.close()


def test_a_known_reply_as_the_last_line_of_a_multi_line_reply_is_that_line() -> None:
    reader = _reader()
    reader.data_received(b"250 Ok\r\n250-first\r\n250 Ok\r\n")
    assert list(reader.replies) == [NextHopReply(250, ("Ok",)), NextHopReply(250, ("first", "Ok"))]
    reader.loop.close()


@pytest.mark.parametrize("line", [b"250 " + b"x" * 300, b"250-more"])
def test_long_lines_and_continuation_lines_are_not_kept(line: bytes) -> None:
    reader = _reader()
    reader.data_received(line + b"\r\n250 end\r\n")
    assert line + b"\r" not in reader.known
    reader.loop.close()


def test_replies_that_differ_every_time_do_not_accumulate() -> None:
    reader = _reader()
    for number in range(1000):
        reader.data_received(b"250 2.0.0 Ok: queued as %d\r\n" % number)
    assert len(reader.known) <= nexthop._MAX_KNOWN_REPLIES
    assert len(reader.replies) == 1000
    reader.loop.close()


@pytest.mark.parametrize("line", ["²50 Ok", "١٢٣ Ok", "2\uff150 Ok"])
def test_a_reply_code_of_other_digits_is_a_malformed_reply(line: str) -> None:
    # str.isdigit() takes each; int() refuses the first and reads the others as 123 and 250.
    reader = _ReplyReader(mock.Mock())
    reader.connection_made(RecordingTransport())  # type: ignore[arg-type]
    reader.data_received(line.encode() + b"\r\n250 2.0.0 Ok\r\n")
    assert not reader.replies
    assert isinstance(reader.failure, RelayError)
    assert reader.failure.reason == "protocol"
    assert "malformed reply line" in str(reader.failure)


def test_a_replys_smtp_form_is_parsed_once_and_keeps_code_enhanced_code_and_text() -> None:
    first = NextHopReply(250, ("2.0.0 Ok: queued as 4AbC",)).as_reply()
    assert first == SmtpReply(250, "2.0.0", "Ok: queued as 4AbC")
    assert NextHopReply(250, ("2.0.0 Ok: queued as 4AbC",)).as_reply() is first
    assert NextHopReply(354, ("End data with <CR><LF>.<CR><LF>",)).as_reply() == SmtpReply(
        354, "", "End data with <CR><LF>.<CR><LF>"
    )
    assert NextHopReply(451, ()).as_reply() == SmtpReply(451, "", "")
