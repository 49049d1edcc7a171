"""The fast paths of message parsing give what the general code gives, for any bytes, and are
taken for the usual shapes of mail."""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterd import mime, mime_headers, mime_html, mime_parts
from filterd.mime import ParsedMessage
from filterd.mime_parts import Leaf

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CORPUS = Path(__file__).resolve().parents[1] / "corpus"

PLAIN = (
    b"From: <bench@example.org>\r\nTo: <sink@example.net>\r\n"
    b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-Id: <bench@example.org>\r\n\r\n"
    + b"".join(b"%dXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\r\n" % n for n in range(40))
)
ALTERNATIVE = (
    b"From: Ann <ann@example.org>\r\nTo: bob@example.net\r\nSubject: Hello\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative;\r\n boundary="b1"\r\n\r\n'
    b"preamble\r\n--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b"See www.example.com/a today.\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b'<p>See <a href=3D"http://example.com/a">this</a></p>\r\n--b1--\r\n'
)


def _decode_text_lf_general(data: bytes, charset: str | None) -> str:
    text = mime_headers.decode_text(data, charset)
    return text.replace("\r\n", "\n") if "\r" in text else text


def _walk_general(
    buf: bytes, fields: list[Any], body_start: int, *, max_parts: int, max_depth: int
) -> mime_parts.Structure:
    top = mime_parts._declared(fields, "text/plain")
    return mime_parts._walk_tree(
        buf, fields, body_start, top, max_parts=max_parts, max_depth=max_depth
    )


@contextlib.contextmanager
def general_paths() -> Iterator[None]:
    """Every fast path of the parse turned off: only the general code runs."""
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context
        patch(mock.patch.object(mime_headers, "_split_plain_section", return_value=None))
        patch(mock.patch.object(mime, "walk", _walk_general))
        patch(mock.patch.object(mime_parts, "_declared_memo", mime_parts._declared_values))
        patch(mock.patch.object(mime, "decode_text_lf", _decode_text_lf_general))
        patch(mock.patch.object(mime_html, "_may_hold_url", return_value=True))
        yield


def views(raw: bytes, **limits: int) -> tuple[object, ...]:
    msg = ParsedMessage(raw, **limits)
    return (
        msg.header_block,
        msg.body_bytes,
        msg.headers,
        msg.header_names_lower(),
        [msg.addresses(name) for name in ("from", "to", "cc", "reply-to", "sender")],
        msg.subject,
        msg.message_id,
        msg._structure,
        msg.body_text,
        msg.urls,
        msg.attachments,
        msg.truncated_by,
    )


def assert_same_views(raw: bytes, **limits: int) -> None:
    fast = views(raw, **limits)
    with general_paths():
        general = views(raw, **limits)
    assert fast == general


# -- strategies ------------------------------------------------------------------------------

_HEADER_PIECES = st.sampled_from(
    [
        b"From: a@example.org",
        b"To: <b@example.net>, c@example.com",
        b"Subject: plain",
        b"Subject: =?utf-8?q?caf=C3=A9?=",
        b"Subject: =?iso-8859-1?b?Y2Fm6Q==?= x",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Type: text/plain; charset=iso-2022-jp",
        b"Content-Type: text/plain; charset=utf-7",
        b"Content-Type: text/html",
        b'Content-Type: multipart/mixed; boundary="b1"',
        b"Content-Type: multipart/alternative; boundary=b2",
        b"Content-Type: message/rfc822",
        b"Content-Type: bogus",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b'Content-Disposition: attachment; filename="a.exe "',
        b"X-Empty:",
        b"X-Tab:\tvalue\t",
        b"Name : spaced",
        b": no name",
        b"From sender@example.org Mon Nov 30",
        b"no colon here",
        b" folded continuation",
        b"\tfolded tab",
        b" ",
        b"Subject: caf\xc3\xa9",
        b"Subject: caf\xe9",
        b"X-Ctl: a\x0bb\x0c\x1c",
        b"X-Uni: \xc2\x85\xe2\x80\xa8",
        b"X-Colon: a: b",
        b"X-CR: a\rb",
        b"",
    ]
)
_EOLS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"])
_BODY_PIECES = st.sampled_from(
    [
        b"text",
        b" ",
        b"see http://example.com/x.",
        b"WWW.Example.org",
        b"w.x",
        b"a:b",
        b"caf\xc3\xa9",
        b"caf\xe9",
        b"+2AA-",
        b"\x1b$B",
        b"--b1",
        b"--b1--",
        b"--b2",
        b"--b2--",
        b"Content-Type: text/plain",
        b"Content-Type: multipart/mixed; boundary=b2",
        b"Content-Transfer-Encoding: base64",
        b"aGVsbG8=",
        b"=41=\r\n",
        b"<a href='http://x.example/'>x</a>",
    ]
)


@st.composite
def _lines(draw: Any, pieces: Any, max_size: int) -> bytes:
    out = b""
    for piece in draw(st.lists(pieces, max_size=max_size)):
        out += piece + draw(_EOLS)
    return out


@st.composite
def messages(draw: Any) -> bytes:
    head = draw(_lines(_HEADER_PIECES, 10))
    separator = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"\r\r\n"]))
    body = draw(_lines(_BODY_PIECES, 25))
    return head + separator + body


# -- differential tests ----------------------------------------------------------------------


@FUZZ
@given(st.one_of(messages(), st.binary(max_size=600)))
def test_parsed_views_match_the_general_code(raw: bytes) -> None:
    assert_same_views(raw)


@FUZZ
@given(messages(), st.integers(1, 4), st.integers(0, 3), st.integers(0, 200))
def test_parsed_views_match_the_general_code_under_limits(
    raw: bytes, max_parts: int, max_depth: int, max_text_bytes: int
) -> None:
    assert_same_views(raw, max_parts=max_parts, max_depth=max_depth, max_text_bytes=max_text_bytes)


@FUZZ
@given(st.one_of(messages(), st.binary(max_size=300)), st.data())
def test_split_section_matches_the_general_code_at_any_offsets(raw: bytes, data: Any) -> None:
    start = data.draw(st.integers(0, len(raw)))
    end = data.draw(st.integers(start, len(raw)))
    expected = mime_headers._split_any_section(raw, start, end)
    assert mime_headers.split_section(raw, start, end) == expected


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b"\xe9", b"+2AA-", b"\x1b$B"])).map(
            b"".join
        ),
    ),
    st.sampled_from(
        [
            None,
            "",
            "us-ascii",
            '"UTF-8"',
            "utf8",
            "latin1",
            "iso-8859-15",
            "windows-1251",
            "utf-7",
            "iso-2022-jp",
            "utf-16",
            "hz",
            "bogus",
            "koi8-r",
        ]
    ),
)
def test_decode_text_lf_matches_decoding_then_replacing(data: bytes, charset: str | None) -> None:
    assert mime_headers.decode_text_lf(data, charset) == _decode_text_lf_general(data, charset)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(
            st.sampled_from(
                ["://", "http", "www", "WwW", ".", "w.", "W.", ":", "/", "x", " ", "ftp", "\n"]
            )
        ).map("".join),
    )
)
def test_find_text_urls_matches_the_general_code(text: str) -> None:
    assert mime_html.find_text_urls(text) == mime_html._find_urls_in(text)


@FUZZ
@given(
    st.binary(max_size=200),
    st.data(),
    st.sampled_from(["", "7bit", "8bit", "binary", "base64", "quoted-printable", "x-uue"]),
    st.one_of(st.none(), st.integers(0, 100)),
)
def test_decode_body_slice_matches_the_view(
    buf: bytes, data: Any, encoding: str, limit: int | None
) -> None:
    start = data.draw(st.integers(0, len(buf) + 2))
    end = data.draw(st.integers(0, len(buf) + 2))
    leaf = Leaf(buf, start, end, "text/plain", None, "", "", encoding)
    # A buffer that is not bytes takes the general path (a memoryview of it).
    general = Leaf(bytearray(buf), start, end, "text/plain", None, "", "", encoding)
    assert mime_parts.decode_body(leaf, limit) == mime_parts.decode_body(general, limit)


def test_ascii_transparent_codecs_read_ascii_as_ascii() -> None:
    ascii_bytes = bytes(range(128))
    for name in mime_headers._ASCII_TRANSPARENT_CODECS:
        assert codecs.lookup(name).name == name
        assert ascii_bytes.decode(name) == ascii_bytes.decode("ascii")


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda path: path.name)
def test_corpus_views_match_the_general_code(path: Path) -> None:
    raw = path.read_bytes()
    assert_same_views(raw)
    assert_same_views(raw.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))


@pytest.mark.parametrize(
    "raw",
    [
        PLAIN,
        ALTERNATIVE,
        b"",
        b"\r\n\r\nbody",
        b"\r\nbody\r\n\r\n",
        b"Subject: x\r\n\r\n",
        b"Subject: x\r\n",
        b"Subject\r\n : x\r\n\r\nbody",
        b"Subject: a\r\n b\r\n\tc \r\n\r\nbody",
        b"Subject: a\r\n \r\n b\r\n\r\nbody",
        b" stray: x\r\nSubject: a\r\n\r\nbody",
        b"From sender Mon\r\nSubject: a\r\n\r\nbody",
        b"From : x\r\n\r\nbody",
        b"Subject : a\r\n\r\nbody",
        b"Subject:\x0b a \x0c\r\n\r\nbody",
        b"Subject: \x1ca\x1c\xc2\x85\r\n\r\nbody",
        b"Subject: a\rb\r\n\r\nbody",
        b"Subject: a\nb: c\r\n\r\nbody",
        b"Subject: caf\xe9\r\n\r\nbody",
        b"To: a@b\r\n: no name\r\n\r\nbody",
        b"Content-Type: text/plain; charset=utf-7\r\n\r\n+2AA-\r\n",
        b"Content-Type: text/plain; charset=iso-2022-jp\r\n\r\n\x1b$B$3\x1b(B\r\n",
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nwww.x.example\r\n",
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\nno boundary here\r\n",
        b"CONTENT-TYPE: TEXT/HTML\r\n\r\n<b>http://x.example/</b>\r\n",
        b"Content-Type: text/plain\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n",
    ],
)
def test_tricky_messages_match_the_general_code(raw: bytes) -> None:
    assert_same_views(raw)
    assert_same_views(raw, max_parts=1, max_depth=0, max_text_bytes=3)


def test_long_content_values_are_not_memoized() -> None:
    boundary = "b" * 300
    raw = (
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\n\r\nhello\r\n--{boundary}--\r\n"
    ).encode()
    before = mime_parts._declared_memo.cache_info().currsize
    assert ParsedMessage(raw).body_text == "hello"
    cached = mime_parts._declared_memo.cache_info().currsize
    assert cached <= before + 1  # the part's empty declaration at most, never the long one
    assert_same_views(raw)


# -- the fast paths are taken ----------------------------------------------------------------


def _refuse(*args: object, **kwargs: object) -> Any:
    raise AssertionError("the general code ran")


def test_a_plain_header_section_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime_headers, "_split_any_section", _refuse)
    fields, header_end, body_start = mime_headers.split_section(PLAIN, 0, len(PLAIN))
    assert fields[0] == ("From", "<bench@example.org>")
    assert PLAIN[header_end:body_start] == b"\r\n"
    folded = b"Subject: a\r\n b\r\nTo: c\r\n\r\nbody"
    assert mime_headers.split_section(folded, 0, len(folded))[0] == [
        ("Subject", "a b"),
        ("To", "c"),
    ]


def test_multipart_part_headers_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime_headers, "_split_any_section", _refuse)
    msg = ParsedMessage(ALTERNATIVE)
    assert msg.body_text == "See www.example.com/a today.\nSee this"


def test_a_single_part_message_skips_the_tree_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime_parts, "_walk_tree", _refuse)
    assert [leaf.content_type for leaf in ParsedMessage(PLAIN)._structure.leaves] == ["text/plain"]


def test_repeated_declarations_are_parsed_once() -> None:
    fields = [("Content-Type", "text/plain; charset=utf-8"), ("X-Other", "1")]
    first = mime_parts._declared(fields, "text/plain")
    hits = mime_parts._declared_memo.cache_info().hits
    assert mime_parts._declared(list(fields), "text/plain") is first
    assert mime_parts._declared_memo.cache_info().hits == hits + 1


def test_ascii_text_skips_charset_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime_headers, "decode_text", _refuse)
    assert mime_headers.decode_text_lf(b"a\r\nb\r\n", "utf-8") == "a\nb\n"
    assert mime_headers.decode_text_lf(b"a\r\nb", None) == "a\nb"


def test_text_without_url_marks_skips_the_url_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime_html, "_find_urls_in", _refuse)
    assert mime_html.find_text_urls("no links: here, just words.\n" * 20) == []


def test_an_unencoded_body_is_one_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime_parts, "memoryview", _refuse, raising=False)
    leaf = Leaf(PLAIN, 10, 30, "text/plain", None, "", "", "7bit")
    assert mime_parts.decode_body(leaf, 5) == PLAIN[10:15]
