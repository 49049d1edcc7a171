"""Property tests: no input makes ParsedMessage (or a helper) raise, and well-formed messages
built by the standard library come back with their text and attachments intact."""

from __future__ import annotations

import base64
import io
import zipfile
from email.headerregistry import Address
from email.message import EmailMessage

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterd.mime import MAX_ARCHIVE_MEMBERS, ParsedMessage
from filterd.mime_address import parse_address_list
from filterd.mime_filetype import detect_type, list_zip_members
from filterd.mime_headers import decode_words, parse_params
from filterd.mime_html import find_text_urls, render_html, url_domain

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def touch_everything(msg: ParsedMessage) -> None:
    raw = msg.raw
    assert raw.startswith(msg.header_block)
    assert raw.endswith(msg.body_bytes)
    assert len(msg.header_block) + len(msg.body_bytes) <= len(raw)
    names = msg.header_names_lower()
    for name, value in msg.headers:
        assert name.lower() in names
        assert value in msg.header_values(name)
    for header in ("From", "To", "Cc", "Reply-To", "Sender"):
        for address in msg.addresses(header):
            written = address.address
            assert address.domain == (written.rpartition("@")[2].lower() if "@" in written else "")
    assert isinstance(msg.subject, str)
    assert isinstance(msg.message_id, str)
    assert isinstance(msg.body_text, str)
    assert "\ue000" not in msg.body_text
    assert "\ue001" not in msg.body_text
    assert len(set(msg.urls)) == len(msg.urls)
    for attachment in msg.attachments:
        assert attachment.size >= 0
        assert "/" in attachment.content_type
        assert "/" in attachment.detected_type
        assert len(attachment.archive_members) <= MAX_ARCHIVE_MEMBERS
    assert isinstance(msg.truncated, bool)


@FUZZ
@given(st.binary(max_size=4000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    touch_everything(ParsedMessage(raw))


# -- MIME-ish structures ---------------------------------------------------------------------

_EOL = st.sampled_from(["\r\n", "\n"])
_CHARSETS = st.sampled_from(
    [
        "utf-8",
        "iso-8859-1",
        "x-bogus",
        "utf-7",
        "iso-2022-jp",
        "punycode",
        "base64",
        "utf-16",
        "",
        '"utf-8"',
        "idna",
        "undefined",
    ]
)
_ENCODINGS = st.sampled_from(["base64", "quoted-printable", "7bit", "8bit", "x-junk", ""])
_BOUNDARIES = st.sampled_from(["b", "b1", "b10", "-", "==x==", "", "b b", '"q"'])
_LEAF_TYPES = st.sampled_from(
    [
        "text/plain",
        "text/html",
        "application/octet-stream",
        "application/zip",
        "image/png",
        "message/rfc822",
        "text",
        "garbage/",
        "TEXT/HTML",
        "multipart/mixed",
    ]
)
_FILENAMES = st.sampled_from(
    [
        "",
        'filename="a.exe"',
        "filename*=UTF-8''%E2%82%AC.js",
        "filename*0*=x'y'%ZZ; filename*1=q",
        'filename="=?utf-8?b?w6k=?=.zip"',
        'name="unterminated',
        "filename*=''",
        "filename*99=x",
    ]
)
_TEXTS = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.sampled_from(
            [
                "<a href='http://x.example/p'>",
                "</a>",
                "<p>",
                "<script>",
                "</script>",
                "<!--",
                "-->",
                "&amp;",
                "&#x110000;",
                "&#0;",
                "www.w.example",
                "http://[::1",
                "=?utf-8?q?",
                "?=",
                "=E2=82",
                "=\r\n",
                "TVqQ",
                "UEsDBA",
                "<",
                ">",
                '"',
                "'",
                "\x00",
                "\r",
                " ",
            ]
        ),
        max_size=30,
    ).map("".join),
)


@st.composite
def _leaf(draw: st.DrawFn) -> str:
    eol = draw(_EOL)
    headers = [f"Content-Type: {draw(_LEAF_TYPES)}; charset={draw(_CHARSETS)}"]
    if draw(st.booleans()):
        headers.append(f"Content-Transfer-Encoding: {draw(_ENCODINGS)}")
    filename = draw(_FILENAMES)
    if filename:
        headers.append(
            f"Content-Disposition: {draw(st.sampled_from(['attachment', 'inline']))}; {filename}"
        )
    body = draw(_TEXTS)
    if draw(st.booleans()):
        body = base64.b64encode(body.encode("utf-8", "surrogatepass")).decode()
    return eol.join(headers) + eol + eol + body


def _multipart(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    @st.composite
    def build(draw: st.DrawFn) -> str:
        eol = draw(_EOL)
        boundary = draw(_BOUNDARIES)
        kind = draw(st.sampled_from(["mixed", "alternative", "digest", "related"]))
        parts = draw(st.lists(children, max_size=4))
        lines = [f'Content-Type: multipart/{kind}; boundary="{boundary}"', "", "preamble"]
        for part in parts:
            lines += [f"--{boundary}", part]
        if draw(st.booleans()):
            lines.append(f"--{boundary}--")  # sometimes unterminated
        return eol.join(lines)

    return build()


_ENTITIES = st.recursive(_leaf(), _multipart, max_leaves=12)


@FUZZ
@given(
    entity=_ENTITIES,
    headers=st.lists(
        st.tuples(
            st.sampled_from(["From", "To", "Cc", "Subject", "Reply-To", "X-Junk", "Sender"]),
            st.one_of(
                st.text(max_size=60),
                st.sampled_from(
                    [
                        '"A, B" <a@b.example>',
                        "g: x@y.example;",
                        "=?utf-8?b?4oKs?= <e@x>",
                        "<",
                        "(((",
                        "a@b, , c@d",
                        '"\\',
                        "=?x?q?=ZZ?=",
                    ]
                ),
            ),
        ),
        max_size=6,
    ),
    max_parts=st.integers(1, 50),
    max_depth=st.integers(0, 8),
    max_text_bytes=st.integers(0, 300),
)
def test_mime_structures_never_raise(
    entity: str,
    headers: list[tuple[str, str]],
    max_parts: int,
    max_depth: int,
    max_text_bytes: int,
) -> None:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    raw = (head + "MIME-Version: 1.0\r\n" + entity).encode("utf-8", "surrogatepass")
    msg = ParsedMessage(
        raw, max_parts=max_parts, max_depth=max_depth, max_text_bytes=max_text_bytes
    )
    touch_everything(msg)
    assert len(msg.attachments) <= max_parts


# -- round trips through the standard library's generator -------------------------------------

_WORDS = (
    st.text(
        alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")),
        min_size=1,
        max_size=40,
    )
    .map(lambda s: " ".join(s.split()))
    .filter(bool)
)


@FUZZ
@given(
    subject=_WORDS,
    name=_WORDS,
    text=_WORDS,
    files=st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z0-9ÄÖÜéß€ _-]{1,20}\.(exe|pdf|js|zip)", fullmatch=True),
            st.binary(max_size=300),
        ),
        max_size=3,
    ),
)
def test_stdlib_built_messages_round_trip(
    subject: str, name: str, text: str, files: list[tuple[str, bytes]]
) -> None:
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = Address(display_name=name, addr_spec="sender@example.org")
    message.set_content(text)
    for filename, data in files:
        message.add_attachment(
            data, maintype="application", subtype="octet-stream", filename=filename
        )
    msg = ParsedMessage(message.as_bytes())
    touch_everything(msg)
    assert msg.subject == subject
    (sender,) = msg.addresses("from")
    assert (sender.name, sender.address, sender.domain) == (
        name,
        "sender@example.org",
        "example.org",
    )
    assert " ".join(msg.body_text.split()) == text
    # the names as the stdlib reads them back (blanks around them stripped, as clients do)
    assert [(a.filename, a.size) for a in msg.attachments] == [
        (part.get_filename(), len(data))
        for part, (_, data) in zip(message.iter_attachments(), files, strict=True)
    ]
    for attachment, (_, data) in zip(msg.attachments, files, strict=True):
        assert attachment.detected_type == detect_type(data)


# -- helpers on their own --------------------------------------------------------------------

_HTML_TOKENS = st.lists(
    st.sampled_from(
        [
            "<",
            ">",
            "/",
            '"',
            "'",
            "=",
            " ",
            "\n",
            "a",
            "p",
            "href",
            "src",
            "img",
            "title",
            "script",
            "style",
            "<!--",
            "-->",
            "<!",
            "&",
            "#",
            ";",
            "amp",
            "x",
            "http://h.example",
            "\ue000",
            "\ue001",
            "\u200b",
        ]
    ),
    max_size=60,
).map("".join)


@FUZZ
@given(st.one_of(_HTML_TOKENS, st.text(max_size=300)))
def test_html_rendering_never_raises(markup: str) -> None:
    text, links = render_html(markup)
    assert "\ue000" not in text
    assert "\ue001" not in text
    for url, link_text in links:
        assert url
        url_domain(url)
        assert link_text is None or link_text == " ".join(link_text.split())


@FUZZ
@given(st.text(max_size=300))
def test_text_helpers_never_raise(value: str) -> None:
    for url in find_text_urls(value):
        assert url in value
        url_domain(url)
    url_domain(value)
    decode_words(value)
    parse_params(value)
    for _, address in parse_address_list(value):
        assert " " not in address


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8),
    st.integers(1, 5),
)
def test_damaged_zips_never_raise(flips: list[tuple[int, int]], limit: int) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(4):
            archive.writestr(f"member{i}.js", b"x" * i)
    data = bytearray(buffer.getvalue())
    for offset, value in flips:
        data[offset % len(data)] = value
    members = list_zip_members(bytes(data), limit)
    assert len(members) <= limit
    detect_type(bytes(data))
