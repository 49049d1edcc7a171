"""ParsedMessage over the corpus and hand-built messages: headers, addresses, body text, URLs,
attachments, limits; plus the helpers (encoded words, RFC 2231, HTML, URL hosts, magic, zip).

Where the standard library can answer the same question (header names and values, attachment
payloads), it is used as the oracle rather than a hard-coded answer.
"""

from __future__ import annotations

import base64
import email
import email.policy
import io
import tracemalloc
import zipfile
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path

import pytest

from filterd.mime import MAX_ARCHIVE_MEMBERS, Address, ParsedMessage, Url
from filterd.mime_address import parse_address_list
from filterd.mime_filetype import detect_type, list_zip_members
from filterd.mime_headers import decode_words
from filterd.mime_html import find_text_urls, render_html, url_domain
from tests.support.blowup import run_to_completion

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.eml"))
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def corpus(name: str) -> ParsedMessage:
    return ParsedMessage((CORPUS / name).read_bytes())


def touch_everything(msg: ParsedMessage) -> None:
    """Read every public view (what a rule set may do)."""
    assert isinstance(msg.header_block, bytes)
    assert isinstance(msg.body_bytes, bytes)
    for name, value in msg.headers:
        assert isinstance(name, str)
        assert isinstance(value, str)
        msg.header_values(name)
    for header in ("From", "To", "Cc", "Reply-To", "Sender"):
        msg.addresses(header)
    msg.header_names_lower()
    assert isinstance(msg.message_id, str)
    assert isinstance(msg.subject, str)
    assert isinstance(msg.body_text, str)
    assert all(isinstance(url, Url) for url in msg.urls)
    for attachment in msg.attachments:
        assert attachment.size >= 0
        assert len(attachment.archive_members) <= MAX_ARCHIVE_MEMBERS
    assert isinstance(msg.truncated, bool)


def mail(*lines: str, eol: str = "\r\n") -> bytes:
    return eol.join(lines).encode("utf-8")


# -- the corpus ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_every_corpus_message_parses(path: Path) -> None:
    touch_everything(ParsedMessage(path.read_bytes()))


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_header_names_and_values_match_the_stdlib(path: Path) -> None:
    raw = path.read_bytes()
    msg = ParsedMessage(raw)
    oracle = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert [name for name, _ in msg.headers] == oracle.keys()
    for (_, value), raw_value in zip(msg.headers, oracle.values(), strict=True):
        if isinstance(raw_value, str) and raw_value.isascii():
            unfolded = raw_value.replace("\r\n", "").replace("\n", "").strip()
            assert value == str(make_header(decode_header(unfolded)))


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_header_block_and_body_split_at_the_blank_line(path: Path) -> None:
    raw = path.read_bytes()
    msg = ParsedMessage(raw)
    sep = b"\r\n" if b"\r\n" in raw else b"\n"
    head, _, body = raw.partition(sep + sep)
    assert msg.header_block == head + sep
    assert msg.body_bytes == body


# The deep-nesting sample is deeper than max_depth on purpose; test_deep_nesting_is_cut_at_max_depth
# covers it, so it is left out here rather than skipped.
@pytest.mark.parametrize(
    "path",
    [p for p in CORPUS_FILES if p.name != "malformed-deep-nesting.eml"],
    ids=lambda p: p.name,
)
def test_attachments_match_the_stdlib_payloads(path: Path) -> None:
    raw = path.read_bytes()
    # The stdlib walks into every message/* type (delivery-status blocks too): compare the rest.
    oracle = email.message_from_bytes(raw, policy=email.policy.default)
    expected = [
        (
            part.get_filename() or "",
            part.get_content_type(),
            len(part.get_payload(decode=True) or b""),
        )
        for part in oracle.walk()
        if not part.is_multipart()
        and (
            part.get_content_type() not in ("text/plain", "text/html")
            or part.get_filename()
            or part.get_content_disposition() == "attachment"
        )
    ]
    got = [
        (a.filename, a.content_type, a.size)
        for a in ParsedMessage(raw).attachments
        if not a.content_type.startswith("message/")
    ]
    assert got == expected


def test_delivery_status_is_an_attachment() -> None:
    types = [a.content_type for a in corpus("ham-bounce-null-sender.eml").attachments]
    assert types == ["message/delivery-status", "text/rfc822-headers"]


@pytest.mark.parametrize(
    ("name", "subject"),
    [
        ("ham-encoded-words-iso2022jp.eml", "会議の議事録\uff0811月分\uff09"),
        ("malformed-8bit-headers-unknown-charset.eml", "Grüße aus Köln \u2013 raw 8-bit header"),
        ("malformed-bare-lf.eml", "bare LF line endings"),
        ("malformed-missing-headers.eml", "no from, no date, no message-id"),
        ("spam-lottery-html.eml", "CONGRATULATIONS!!! You have WON $1,500,000.00 USD"),
    ],
)
def test_subject_is_decoded(name: str, subject: str) -> None:
    assert corpus(name).subject == subject


@pytest.mark.parametrize(
    ("name", "header", "expected"),
    [
        (
            "ham-encoded-words-iso2022jp.eml",
            "From",
            [("田中 太郎", "tanaka@example.jp", "example.jp")],
        ),
        (
            "ham-bounce-null-sender.eml",
            "From",
            [("Mail Delivery System", "MAILER-DAEMON@mx.example.net", "mx.example.net")],
        ),
        (
            "phish-link-mismatch.eml",
            "from",
            [("PayPal Service", "service@paypa1-secure.example", "paypa1-secure.example")],
        ),
        (
            "spam-lottery-html.eml",
            "Reply-To",
            [("", "claims.agent@freemail.example", "freemail.example")],
        ),
        ("spam-lottery-html.eml", "To", []),  # undisclosed-recipients:; is an empty group
        ("ham-smtputf8-address.eml", "From", [("用户", "用户@例子.广告", "例子.广告")]),
        (
            "malformed-8bit-headers-unknown-charset.eml",
            "From",
            [("Jörg", "joerg@example.de", "example.de")],
        ),
        ("malformed-missing-headers.eml", "From", []),
    ],
)
def test_addresses(name: str, header: str, expected: list[tuple[str, str, str]]) -> None:
    assert corpus(name).addresses(header) == [Address(*fields) for fields in expected]


def test_iso2022jp_body_is_decoded() -> None:
    assert "11月の会議の議事録を送ります。" in corpus("ham-encoded-words-iso2022jp.eml").body_text


def test_gtube_is_in_the_body() -> None:
    assert GTUBE in corpus("spam-gtube.eml").body_text


def test_phish_link_text_and_href_differ() -> None:
    msg = corpus("phish-link-mismatch.eml")
    link = next(url for url in msg.urls if url.link_text is not None)
    assert link.url == "http://paypa1-secure.example/login.php?acct=bob"
    assert link.domain == "paypa1-secure.example"
    assert link.link_text == "https://www.paypal.com/signin"
    assert url_domain(link.link_text) == "www.paypal.com"
    assert "Please verify your account within 24 hours." in msg.body_text
    assert "<p>" not in msg.body_text


def test_lottery_html_body_and_shortener() -> None:
    msg = corpus("spam-lottery-html.eml")
    assert "processing fee of $250" in msg.body_text
    assert Url("http://bit.ly/claim-now", "bit.ly", "CLAIM NOW") in msg.urls


def test_zip_member_is_listed() -> None:
    (attachment,) = corpus("malware-zip-with-js.eml").attachments
    assert attachment.filename == "scan.zip"
    assert attachment.detected_type == "application/zip"
    assert [m.filename for m in attachment.archive_members] == ["Invoice_Scan_2026.js"]
    assert attachment.archive_members[0].size > 0


def test_double_extension_is_an_executable() -> None:
    (attachment,) = corpus("malware-double-extension.eml").attachments
    assert attachment.filename == "invoice-44821.pdf.exe"
    assert attachment.content_type == "application/octet-stream"
    assert attachment.detected_type == "application/x-dosexec"


def test_pdf_attachment() -> None:
    msg = corpus("ham-pdf-attachment.eml")
    (attachment,) = msg.attachments
    assert (attachment.filename, attachment.content_type, attachment.detected_type) == (
        "statement-2026-11.pdf",
        "application/pdf",
        "application/pdf",
    )
    assert msg.body_text.strip() == "Please find your statement attached."


def test_calendar_part_is_text_and_attachment() -> None:
    msg = corpus("ham-calendar-invite.eml")
    assert "BEGIN:VCALENDAR" in msg.body_text
    assert [a.content_type for a in msg.attachments] == ["text/calendar"]


def test_newsletter_text_html_and_urls() -> None:
    msg = corpus("ham-newsletter-utf8.eml")
    assert "Japanese\u2019 remains" in msg.body_text  # quoted-printable UTF-8 curly quote
    assert "아시아엔" in msg.body_text  # Korean pingback line from the HTML part
    assert (
        Url("https://news.example.org/unsubscribe?u=8121", "news.example.org", "Unsubscribe")
        in msg.urls
    )
    unsubscribe = msg.header_values("list-unsubscribe")[0]
    assert "<https://news.example.org/unsubscribe?u=8121>, <mailto:" in unsubscribe
    assert msg.attachments == ()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("malformed-bare-lf.eml", "Every line of this message ends in a bare LF.\n.\nThe previous"),
        ("malformed-bad-base64.eml", "Hello world"),
        (
            "malformed-8bit-headers-unknown-charset.eml",
            "Schöne Grüße, und ein ungültiges Byte: \ufffd",
        ),
        ("malformed-long-line.eml", "x" * 5000),
        ("malformed-unterminated-multipart.eml", "first part, no closing boundary"),
        ("malformed-missing-headers.eml", "body only"),
    ],
)
def test_malformed_bodies_are_read(name: str, fragment: str) -> None:
    assert fragment in corpus(name).body_text


def test_deep_nesting_is_cut_at_max_depth() -> None:
    raw = (CORPUS / "malformed-deep-nesting.eml").read_bytes()
    shallow = ParsedMessage(raw)
    assert shallow.truncated
    assert "deep" not in shallow.body_text
    assert [a.content_type for a in shallow.attachments] == ["multipart/mixed"]
    assert shallow.truncated_by == {"depth"}
    deep = ParsedMessage(raw, max_depth=100)
    assert not deep.truncated
    assert deep.truncated_by == frozenset()
    assert deep.body_text.strip() == "deep"


def test_headers_only_use_leaves_the_body_alone() -> None:
    msg = corpus("malware-zip-with-js.eml")
    assert msg.subject == "Scanned document"
    assert msg.header_values("MESSAGE-ID") == ["<mal-zip@corpus.filterd.test>"]
    assert "_structure" not in vars(msg)
    assert "_text_parts" not in vars(msg)


# -- hand-built messages ---------------------------------------------------------------------


def test_an_address_list_of_many_pieces_and_colons_parses_in_linear_time() -> None:
    # Every ':' asked whether the mailbox so far held an '@' by rescanning all its pieces: a
    # From of 16,000 escapes and 16,000 colons (48 KB) took 12 s. At 600 KB that is half an
    # hour; linear, it takes well under a second (see tests/support/blowup.py).
    printed = run_to_completion(
        "from filterd.mime_address import parse_address_list\n"
        "print(parse_address_list('\\\\a' * 200_000 + ' x@y.example' + ':' * 200_000)[-1])"
    )
    assert "x@y.example" in printed


def test_a_field_without_a_name_is_skipped_and_the_header_section_goes_on() -> None:
    # As Python's parser does (an InvalidHeaderDefect, then the next field): the fields after
    # ": x" are headers, for the rules as for whatever reads the message after filterd.
    raw = b"From: a@x\r\n: x\r\nX-Spam-Flag: NO\r\nSubject: s\r\n\r\nbody\r\n"
    msg = ParsedMessage(raw)
    oracle = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert [name for name, _ in msg.headers] == oracle.keys() == ["From", "X-Spam-Flag", "Subject"]
    assert msg.body_text.strip() == "body"


def test_folded_headers_and_case_insensitive_lookup() -> None:
    msg = ParsedMessage(
        mail(
            "Subject: first line",
            "\tsecond line",
            "  third",
            "X-Dup: one",
            "x-dup: two",
            "Received: a",
            " b",
            "",
            "body",
        )
    )
    assert msg.subject == "first line\tsecond line  third"
    assert msg.header_values("X-DUP") == ["one", "two"]
    assert msg.header_values("received") == ["a b"]
    assert msg.header_values("absent") == []
    assert msg.header_names_lower() == frozenset({"subject", "x-dup", "received"})
    assert [name for name, _ in msg.headers] == ["Subject", "X-Dup", "x-dup", "Received"]
    assert msg.body_text == "body"


def test_no_blank_line_and_no_headers() -> None:
    only_headers = ParsedMessage(b"Subject: x\r\nFrom: a@b.example\r\n")
    assert only_headers.header_block == b"Subject: x\r\nFrom: a@b.example\r\n"
    assert only_headers.body_bytes == b""
    body_after_headers = ParsedMessage(b"Subject: x\nthis line is not a header\nmore\n")
    assert body_after_headers.header_block == b"Subject: x\n"
    assert body_after_headers.body_text == "this line is not a header\nmore\n"
    no_headers = ParsedMessage(b"\r\njust a body")
    assert no_headers.headers == ()
    assert no_headers.body_text == "just a body"
    empty = ParsedMessage(b"")
    assert (empty.headers, empty.subject, empty.message_id, empty.body_text) == ((), "", "", "")


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # white space between encoded words goes
        ("x =?utf-8?q?a_b?= y", "x a b y"),  # white space next to plain text stays
        ("=?UTF-8?B?4oKs?=", "€"),
        ("=?utf-8?b?4oI=?= =?utf-8?b?rA==?=", "€"),  # one character split across two words
        ("=?iso-8859-1?q?J=F6rg?=", "Jörg"),
        ("=?x-no-such-charset?q?caf=C3=A9?=", "café"),  # unknown charset: UTF-8
        ("=?utf-8?b?!!!?=x", "x"),  # garbage decodes to nothing, never raises
        ("=?utf-8*en?q?hi?=", "hi"),  # RFC 2231 language suffix
        ("no words here =? ?=", "no words here =? ?="),
        ("=?utf-8?q?unterminated", "=?utf-8?q?unterminated"),
    ],
)
def test_encoded_words(value: str, decoded: str) -> None:
    assert decode_words(value) == decoded


@pytest.mark.parametrize(
    ("header", "filename"),
    [
        ("attachment; filename*=UTF-8''%E2%82%AC%20rates.pdf.exe", "€ rates.pdf.exe"),
        (
            "attachment; filename*0*=UTF-8''%E2%82; filename*1*=%AC; filename*2=\" x.zip\"",
            "€ x.zip",
        ),
        ("attachment; filename=\"plain.doc\"; filename*=iso-8859-1''r%E9sum%E9.doc", "résumé.doc"),
        ('attachment; filename="=?utf-8?b?w6l0w6k=?=.js"', "été.js"),
        ('attachment; filename="a;b \\"q\\".txt"', 'a;b "q".txt'),
        ("inline; FILENAME=upper.png", "upper.png"),
        # as a client saves them: blanks around and trailing dots dropped, so *.js still holds
        ('attachment; filename="invoice.js "', "invoice.js"),
        ('attachment; filename="invoice.js\t"', "invoice.js"),
        ("attachment; filename*=utf-8''invoice.js%20", "invoice.js"),
        ('attachment; filename="=?utf-8?q?invoice=2Ejs_?="', "invoice.js"),
        ('attachment; filename="setup.exe."', "setup.exe"),
    ],
)
def test_disposition_filenames(header: str, filename: str) -> None:
    raw = mail(
        "Content-Type: multipart/mixed; boundary=B",
        "",
        "--B",
        "Content-Type: application/octet-stream",
        f"Content-Disposition: {header}",
        "",
        "data",
        "--B--",
    )
    assert [a.filename for a in ParsedMessage(raw).attachments] == [filename]


def test_content_type_name_counts_as_filename() -> None:
    raw = mail(
        "Content-Type: multipart/mixed; boundary=B",
        "",
        "--B",
        'Content-Type: application/x-msdownload; name="=?utf-8?q?setup=2Eexe?="',
        "Content-Transfer-Encoding: base64",
        "",
        base64.b64encode(b"MZ\x90\x00").decode(),
        "--B--",
    )
    (attachment,) = ParsedMessage(raw).attachments
    assert (
        attachment.filename,
        attachment.content_type,
        attachment.detected_type,
        attachment.size,
    ) == ("setup.exe", "application/x-msdownload", "application/x-dosexec", 4)


def test_html_entities_scripts_and_styles() -> None:
    raw = mail(
        "Content-Type: text/html; charset=utf-8",
        "",
        "<html><head><style>.x{color:red}</style><title>t</title></head><body>",
        "<script>var s = '<p>not text</p>';</script>",
        "<p>Caf&eacute; &amp; cr&#232;me &#x41;&lt;b&gt;&nbsp;end</p><!-- a comment -->",
        "<div>pro\u200bcessing&shy; fee</div></body></html>",
    )
    msg = ParsedMessage(raw)
    assert msg.body_text == "Café & crème A<b> end\nprocessing fee"


def test_attachment_classification() -> None:
    raw = mail(
        "Content-Type: multipart/mixed; boundary=B",
        "",
        "--B",
        "Content-Type: text/plain",
        "",
        "inline body",
        "--B",
        "Content-Type: text/plain; name=notes.txt",
        "",
        "named text",
        "--B",
        "Content-Type: text/html",
        "Content-Disposition: attachment",
        "",
        "<b>page</b>",
        "--B",
        "Content-Type: image/png",
        "Content-Transfer-Encoding: base64",
        "",
        base64.b64encode(b"\x89PNG\r\n\x1a\n0000").decode(),
        "--B--",
    )
    msg = ParsedMessage(raw)
    assert [(a.filename, a.content_type, a.detected_type) for a in msg.attachments] == [
        ("notes.txt", "text/plain", "text/plain"),
        ("", "text/html", "text/plain"),
        ("", "image/png", "image/png"),
    ]
    assert msg.body_text == "inline body\nnamed text\npage"


def test_nested_message_is_reported_and_walked() -> None:
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content("inner text with http://inner.example/path")
    inner.add_attachment(
        b"MZ" + bytes(100), maintype="application", subtype="octet-stream", filename="tool.exe"
    )
    outer = EmailMessage()
    outer["Subject"] = "outer"
    outer.set_content("outer text")
    outer.add_attachment(inner)
    msg = ParsedMessage(outer.as_bytes())
    assert [(a.content_type, a.filename) for a in msg.attachments] == [
        ("message/rfc822", ""),
        ("application/octet-stream", "tool.exe"),
    ]
    assert msg.attachments[1].detected_type == "application/x-dosexec"
    assert msg.attachments[1].size == 102
    assert "inner text" in msg.body_text
    assert "outer text" in msg.body_text
    assert [url.domain for url in msg.urls] == ["inner.example"]


def test_base64_encoded_message_part_is_walked() -> None:
    inner = b"Subject: hidden\r\nContent-Type: text/plain\r\n\r\nsecret words\r\n"
    raw = mail(
        "Content-Type: multipart/mixed; boundary=B",
        "",
        "--B",
        "Content-Type: message/rfc822",
        "Content-Transfer-Encoding: base64",
        "",
        base64.b64encode(inner).decode(),
        "--B--",
    )
    msg = ParsedMessage(raw)
    assert "secret words" in msg.body_text
    assert msg.attachments[0].size == len(inner)
    assert msg.attachments[0].detected_type == "message/rfc822"


def test_digest_parts_default_to_messages() -> None:
    raw = mail(
        "Content-Type: multipart/digest; boundary=D",
        "",
        "--D",
        "",
        "Subject: one",
        "",
        "first digest text",
        "--D--",
    )
    msg = ParsedMessage(raw)
    assert [a.content_type for a in msg.attachments] == ["message/rfc822"]
    assert msg.body_text.strip() == "first digest text"


def test_boundary_prefix_and_transport_padding() -> None:
    raw = mail(
        'Content-Type: multipart/mixed; boundary="b1"',
        "",
        "preamble",
        "--b1  ",
        "Content-Type: multipart/alternative; boundary=b10",
        "",
        "--b10",
        "Content-Type: text/plain",
        "",
        "alt one",
        "--b10--",
        "--b1",
        "Content-Type: text/plain",
        "",
        "second",
        "--b1--",
        "epilogue",
    )
    msg = ParsedMessage(raw)
    assert msg.body_text == "alt one\nsecond"


def test_bare_lf_multipart() -> None:
    raw = mail(
        "Content-Type: multipart/mixed; boundary=Z",
        "",
        "--Z",
        "Content-Type: text/plain",
        "",
        "lf text",
        "--Z",
        "Content-Type: application/zip",
        "Content-Transfer-Encoding: base64",
        "Content-Disposition: attachment; filename=a.zip",
        "",
        base64.encodebytes(_zip({"x.vbs": b"1"})).decode().strip(),
        "--Z--",
        eol="\n",
    )
    msg = ParsedMessage(raw)
    assert msg.body_text == "lf text"
    assert [m.filename for m in msg.attachments[0].archive_members] == ["x.vbs"]


def test_multipart_without_usable_boundary_is_text() -> None:
    for content_type in ("multipart/mixed", "multipart/mixed; boundary=NEVER"):
        msg = ParsedMessage(mail(f"Content-Type: {content_type}", "", "shown as text"))
        assert msg.body_text == "shown as text"


@pytest.mark.parametrize(
    ("charset", "payload", "text"),
    [
        ("windows-1252", b"\x93quoted\x94", "“quoted”"),
        ("iso-8859-1", b"\x80 caf\xe9", "€ café"),  # read as Windows-1252, as clients do
        ("koi8-r", b"\xf0\xd2\xc9\xd7\xc5\xd4", "Привет"),
        ("bogus-charset", b"caf\xc3\xa9", "café"),
        ("punycode", b"abc-", "abc-"),  # not a mail charset: read as UTF-8
        ("", b"caf\xe9", "café"),  # unlabelled 8-bit that is not UTF-8: Windows-1252
    ],
)
def test_charsets(charset: str, payload: bytes, text: str) -> None:
    label = f"; charset={charset}" if charset else ""
    raw = f"Content-Type: text/plain{label}\r\n\r\n".encode() + payload
    assert ParsedMessage(raw).body_text == text


def test_quoted_printable_and_base64_text() -> None:
    qp = ParsedMessage(
        mail(
            "Content-Transfer-Encoding: quoted-printable",
            "Content-Type: text/plain; charset=utf-8",
            "",
            "soft=",
            "break =E2=82=AC",
        )
    )
    assert qp.body_text == "softbreak €"
    b64 = ParsedMessage(mail("Content-Transfer-Encoding: BASE64", "", "aGVsbG8g", "d29ybGQ"))
    assert b64.body_text == "hello world"


def test_max_text_bytes_caps_each_part() -> None:
    raw = mail("Content-Transfer-Encoding: base64", "", base64.b64encode(b"a" * 5000).decode())
    assert ParsedMessage(raw, max_text_bytes=100).body_text == "a" * 100
    assert ParsedMessage(raw).body_text == "a" * 5000


def test_max_parts_bounds_the_walk() -> None:
    parts = []
    for i in range(50):
        parts += [
            "--B",
            "Content-Type: application/octet-stream",
            f"Content-Disposition: attachment; filename=f{i}.bin",
            "",
            "x",
        ]
    raw = mail("Content-Type: multipart/mixed; boundary=B", "", *parts, "--B--")
    limited = ParsedMessage(raw, max_parts=10)
    assert limited.truncated
    assert limited.truncated_by == {"parts"}
    assert len(limited.attachments) < 10
    full = ParsedMessage(raw)
    assert not full.truncated
    assert [a.filename for a in full.attachments] == [f"f{i}.bin" for i in range(50)]


def test_urls_from_text_and_html_deduplicated() -> None:
    raw = mail(
        "Content-Type: multipart/alternative; boundary=A",
        "",
        "--A",
        "Content-Type: text/plain",
        "",
        "Visit http://Example.COM/a, or www.two.example. Again: http://Example.COM/a",
        "--A",
        "Content-Type: text/html",
        "",
        '<a href="http://Example.COM/a">http://Example.COM/a</a>'
        '<img src="https://img.example/t.gif"><a href="mailto:x@y.example">mail</a>'
        '<a href="https://user@xn--bcher-kva.example:8443/p">  Books\n here </a>',
        "--A--",
    )
    assert ParsedMessage(raw).urls == (
        Url("http://Example.COM/a", "example.com", None),
        Url("www.two.example", "www.two.example", None),
        Url("http://Example.COM/a", "example.com", "http://Example.COM/a"),
        Url("https://img.example/t.gif", "img.example", None),
        Url("https://user@xn--bcher-kva.example:8443/p", "bücher.example", "Books here"),
    )


# -- helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            'a@b.example, "Doe, John" <j@d.example>; c@d.example',
            [("", "a@b.example"), ("Doe, John", "j@d.example"), ("", "c@d.example")],
        ),
        (
            "Team: a@x.example, B <b@y.example>;, z@z.example",
            [("", "a@x.example"), ("B", "b@y.example"), ("", "z@z.example")],
        ),
        (
            "(outer (nested) comment) user@host.example",
            [("outer (nested) comment", "user@host.example")],
        ),
        ("John john@x.example", [("John", "john@x.example")]),
        ("just a name", [("just a name", "")]),
        ('"unterminated <x@y.example>', [("unterminated", "x@y.example")]),
        ("<@route.example:u@h.example>", [("", "u@h.example")]),
        ("=?utf-8?q?M=C3=BCller=2C_Hans?= <h@m.example>", [("Müller, Hans", "h@m.example")]),
        ("", []),
        # A second angle address with no separator before it is a mailbox of its own, named by
        # the text between the two: a rule on From must see it, not only the first one.
        (
            "<good@bank.example> <evil@x.example>",
            [("", "good@bank.example"), ("", "evil@x.example")],
        ),
        (
            '"Bank" <good@bank.example> "Bank Security" <evil@x.example>',
            [("Bank", "good@bank.example"), ("Bank Security", "evil@x.example")],
        ),
        (
            "Bank <a@bank.example>Evil<e@x.example>",
            [("Bank", "a@bank.example"), ("Evil", "e@x.example")],
        ),
        ("A <a@b.example> trailing, C <c@d.example>", [("A", "a@b.example"), ("C", "c@d.example")]),
        # Bare addresses with only spaces between them are one mailbox each (they were run
        # together into one); the obsolete spacing around a single "@" still joins.
        ("a@bank.example b@evil.example", [("", "a@bank.example"), ("", "b@evil.example")]),
        ("a@b.example (note) c@d.example", [("note", "a@b.example"), ("note", "c@d.example")]),
        ("user @ example.com", [("", "user@example.com")]),
        ("user@ example.com", [("", "user@example.com")]),
        # A quoted local part keeps its spaces and stays one address (it was cut into a name
        # and a broken address, or had its spaces removed).
        ('"john doe"@example.com', [("", '"john doe"@example.com')]),
        (
            '"john doe"@example.com, b@x.example',
            [("", '"john doe"@example.com'), ("", "b@x.example")],
        ),
        ('Name <"john  doe"@example.com>', [("Name", '"john  doe"@example.com')]),
        ('"john doe" @ example.com', [("", '"john doe"@example.com')]),
        ('"Bank" notices@bank.example', [("Bank", "notices@bank.example")]),
        ('"a b"@x.example c@y.example', [("", '"a b"@x.example'), ("", "c@y.example")]),
    ],
)
def test_address_lists(value: str, expected: list[tuple[str, str]]) -> None:
    assert parse_address_list(value) == expected


@pytest.mark.parametrize(
    ("url", "domain"),
    [
        ("http://user:pw@Evil.COM:8080/x", "evil.com"),
        ("https:\\\\evil.example\\path", "evil.example"),
        ("WWW.Example.org/page", "www.example.org"),
        ("//cdn.example/a.js", "cdn.example"),
        ("http://a@b@c.example", "c.example"),
        ("http://%77%77%77.example.com", "www.example.com"),
        ("http://example\u3002com/", "example.com"),
        ("http://xn--bcher-kva.example", "bücher.example"),
        # punycode of a lone surrogate: no character, so U+FFFD (text output cannot hold it)
        ("http://xn--paypal-ud53a.com/", "paypal\ufffd.com"),
        ("http://[2001:db8::1]:80/", "2001:db8::1"),
        ("HTTP://Trailing.Dot./", "trailing.dot"),
        ("mailto:a@b.example", ""),
        ("javascript:alert(1)", ""),
        ("relative/path", ""),
    ],
)
def test_url_domain(url: str, domain: str) -> None:
    assert url_domain(url) == domain


def test_text_urls_trim_punctuation_but_keep_balanced_parentheses() -> None:
    text = (
        "(see http://a.example/x). Also https://en.wikipedia.org/wiki/Foo_(bar), "
        "xwww.not.example and <www.angle.example> and http://"
    )
    assert find_text_urls(text) == [
        "http://a.example/x",
        "https://en.wikipedia.org/wiki/Foo_(bar)",
        "www.angle.example",
    ]


@pytest.mark.parametrize(
    ("markup", "text", "links"),
    [
        ('<a href="x">one<a href="y">two', "onetwo", [("x", "one"), ("y", "two")]),
        ("<p title='a>b'>text</p>", "text", []),
        ("a < b and <3", "a < b and <3", []),
        ("<title>never closed", "never closed", []),  # an unclosed hidden tag hides nothing
        ("before<!-- unterminated comment", "before", []),
        ("<table><tr><td>a</td><td>b</td></tr></table>", "a b", []),
        ('<form action="https://f.example/post">x</form>', "x", [("https://f.example/post", None)]),
        ('<img src="data:image/png;base64,AAAA">', "", []),
        ("<A HREF=HTTP://UP.EXAMPLE>Up</A>", "Up", [("HTTP://UP.EXAMPLE", "Up")]),
    ],
)
def test_render_html(markup: str, text: str, links: list[tuple[str, str | None]]) -> None:
    assert render_html(markup) == (text, links)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"MZ\x90\x00", "application/x-dosexec"),
        (_zip({"a": b"b"}), "application/zip"),
        (b"%PDF-1.7\n", "application/pdf"),
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"GIF89a", "image/gif"),
        (b"\x1f\x8b\x08", "application/gzip"),
        (b"Rar!\x1a\x07\x01\x00", "application/x-rar"),
        (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/msword"),
        (b"plain words\r\n", "text/plain"),
        ("caf\u00e9".encode(), "text/plain"),
        (b"  <!DOCTYPE html><html>", "text/html"),
        (b"\x00\x01\x02binary", "application/octet-stream"),
        (b"", "application/x-empty"),
    ],
)
def test_detect_type(data: bytes, mime: str) -> None:
    assert detect_type(data) == mime


def test_zip_listing_is_bounded_and_reads_only_the_directory() -> None:
    names = {f"f{i}.js": b"" for i in range(MAX_ARCHIVE_MEMBERS + 200)}
    archive = _zip(names)
    members = list_zip_members(archive, MAX_ARCHIVE_MEMBERS)
    assert len(members) == MAX_ARCHIVE_MEMBERS
    assert members[:2] == [("f0.js", 0), ("f1.js", 0)]
    # A bomb's declared size is reported, not inflated.
    bomb = _zip({"big.bin": b"\x00" * 5_000_000})
    assert list_zip_members(bomb) == [("big.bin", 5_000_000)]
    assert len(bomb) < 10_000


def test_zip_listing_survives_damage() -> None:
    archive = _zip({"a.exe": b"x" * 50, "b.js": b"y"})
    assert list_zip_members(b"SFX stub" + archive) == [("a.exe", 50), ("b.js", 1)]
    assert list_zip_members(archive[:-22]) == [("a.exe", 50), ("b.js", 1)]  # no end record
    assert list_zip_members(archive[:40]) == [("a.exe", 50)]  # truncated in the first member
    assert list_zip_members(b"PK\x05\x06" + b"\xff" * 18) == []
    assert list_zip_members(b"not a zip") == []


def test_decoding_an_attachment_does_not_copy_its_encoded_body_first() -> None:
    # A spooled message is parsed whole: a 20 MB attachment's encoded body is not copied
    # before it is decoded, so the memory its decoding takes is the decoded size, not more.
    payload = bytes(range(256)) * 16384  # 4 MiB
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    raw = (
        b"Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: application/octet-stream; name=a.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--B--\r\n"
    )
    message = ParsedMessage(raw)
    tracemalloc.start()
    try:
        [attachment] = message.attachments
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert attachment.size == len(payload)
    assert peak < len(payload) + len(encoded) // 4  # the decoded bytes, and no encoded copy
