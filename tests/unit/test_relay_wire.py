"""The two wire forms of a message for the next hop, DATA (dot-stuffed, end marker) and BDAT
(counted, as is): whichever the next hop is sent, it stores the same bytes. And the MAIL
parameters a message needs when its client's are not known (a quarantine release)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.actions.relay import chunk_data, crlf_lines, encode_data, mail_options_for

# Lines made of the bytes that matter here: dots, both line-ending characters, and text.
MESSAGES = st.lists(st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"a", b"Subject: x"]))


@settings(deadline=None)
@given(MESSAGES)
def test_line_endings_become_crlf_exactly_as_a_rewrite_would(parts: list[bytes]) -> None:
    # crlf_lines skips the rewrite when it finds nothing but CRLFs; that shortcut must never
    # leave a bare CR or LF behind, nor change a clean block.
    raw = b"".join(parts)
    assert crlf_lines(raw) == re.sub(rb"\r\n|\r|\n", b"\r\n", raw)


def stored_after_data(wire: bytes) -> bytes:
    """What an RFC 5321 receiver keeps of a DATA wire form: up to the end marker, each line's
    leading dot removed."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[: -len(b".\r\n")]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@settings(deadline=None)
@given(MESSAGES)
def test_data_and_bdat_deliver_the_same_bytes(parts: list[bytes]) -> None:
    raw = b"".join(parts)
    assert chunk_data(raw) == stored_after_data(encode_data(raw))


def test_a_chunk_ends_with_a_line_break_and_has_only_crlf() -> None:
    assert chunk_data(b"a\nb\rc") == b"a\r\nb\r\nc\r\n"
    assert chunk_data(b".x\r\n") == b".x\r\n"  # no dot-stuffing
    assert chunk_data(b"") == b""


@pytest.mark.parametrize(
    ("sender", "raw", "options"),
    [
        ("a@example.org", b"Subject: hi\r\n\r\nplain\r\n", ()),
        ("a@example.org", b"Subject: hi\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n", ("BODY=8BITMIME",)),
        (
            "a@example.org",
            b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n",
            ("BODY=8BITMIME", "SMTPUTF8"),
        ),
        ("j\u00fcrgen@b\u00fccher.example", b"Subject: hi\r\n\r\nplain\r\n", ("SMTPUTF8",)),
    ],
)
def test_a_release_asks_for_what_the_message_needs(
    sender: str, raw: bytes, options: tuple[str, ...]
) -> None:
    assert mail_options_for(sender, ["b@example.net"], raw) == options
