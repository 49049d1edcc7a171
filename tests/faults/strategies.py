"""Hypothesis strategies for the fuzz tests: SMTP command sequences and MIME structures.

The MIME side builds trees (multipart nesting, message/rfc822 inside, every transfer encoding,
real and bogus charsets, broken and missing boundaries, forged X-Spam-* headers) and mutates the
sample corpus (``tests/corpus``) so that realistic messages are the seeds.
"""

from __future__ import annotations

import base64
import quopri
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.eml"))


def corpus_bytes() -> list[bytes]:
    return [path.read_bytes() for path in CORPUS_FILES]


# --- MIME ----------------------------------------------------------------------------------------

EOL = st.sampled_from([b"\r\n", b"\n"])
CHARSETS = st.sampled_from(
    [
        "utf-8",
        "us-ascii",
        "iso-8859-1",
        "iso-8859-15",
        "windows-1252",
        "koi8-r",
        "shift_jis",
        "iso-2022-jp",
        "gb2312",
        "big5",
        "utf-16",
        "utf-16le",
        "utf-7",
        "x-unknown",
        "",
        "utf8 ",
        '"utf-8"',
        "UTF-8; format=flowed",
        "idna",
        "rot13",
        "base64",
    ]
)
ENCODINGS = st.sampled_from(
    [
        "7bit",
        "8bit",
        "binary",
        "base64",
        "quoted-printable",
        "Base64",
        "x-uuencode",
        "bogus",
        "",
    ]
)
BOUNDARIES = st.sampled_from(
    [
        "b",
        "==_Part_1",
        "-",
        "x" * 70,
        "x" * 200,
        "a b",
        'a"b',
        "",
        "--",
        "=?x?=",
        "bound;ary",
    ]
)
LEAF_TYPES = st.sampled_from(
    [
        "text/plain",
        "text/html",
        "text/calendar",
        "application/octet-stream",
        "application/zip",
        "application/pdf",
        "image/png",
        "application/x-msdownload",
        "text",
        "/",
        "garbage",
    ]
)
FILENAMES = st.sampled_from(
    [
        "",
        "invoice.pdf",
        "invoice.pdf.exe",
        "report.js",
        "a" * 300 + ".exe",
        "../../etc/passwd",
        "=?utf-8?b?w6kuZXhl?=",
        "x\x00y.exe",
        "résumé.docx",
        "archive.zip",
    ]
)
PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"MZ\x90\x00\x03\x00\x00\x00",
            b"PK\x03\x04\x14\x00\x00\x00",
            b"%PDF-1.7\n",
            b'<html><a href="http://evil.example/x">https://bank.example</a></html>',
            b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
            b"You have won the lottery! Pay the processing fee.",
            b"\x00\x01\x02\xff\xfe",
            b"=?utf-8?q?=E2=82=AC?=",
            b"http://bit.ly/x www.example.com",
            b".\r\n..\r\n.",
        ]
    ),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def _encode(payload: bytes, encoding: str, broken: bool) -> bytes:
    if encoding.lower() == "base64":
        out = base64.encodebytes(payload)
        return out[: len(out) // 2] + b"!!" + out[len(out) // 2 :] if broken else out
    if encoding == "quoted-printable":
        out = quopri.encodestring(payload)
        return out + b"=Z" if broken else out
    return payload


@st.composite
def leaves(draw: st.DrawFn) -> bytes:
    eol = draw(EOL)
    ctype, charset, encoding = draw(LEAF_TYPES), draw(CHARSETS), draw(ENCODINGS)
    headers = [f"Content-Type: {ctype}; charset={charset}".encode()]
    if encoding:
        headers.append(f"Content-Transfer-Encoding: {encoding}".encode())
    filename = draw(FILENAMES)
    if filename:
        style = draw(st.sampled_from(["plain", "2231", "name"]))
        if style == "2231":
            quoted = "".join(f"%{b:02X}" for b in filename.encode("utf-8", "surrogateescape"))
            disposition = f"attachment; filename*=utf-8''{quoted}"
        elif style == "name":
            disposition = "inline"
            headers[0] += f'; name="{filename}"'.encode("utf-8", "surrogateescape")
        else:
            disposition = f'attachment; filename="{filename}"'
        headers.append(f"Content-Disposition: {disposition}".encode("utf-8", "surrogateescape"))
    body = _encode(draw(PAYLOADS), encoding, draw(st.booleans()))
    return eol.join(headers) + eol + eol + body


def multiparts(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        eol = draw(EOL)
        boundary = draw(BOUNDARIES).encode()
        subtype = draw(
            st.sampled_from(["mixed", "alternative", "related", "digest", "signed", "x"])
        )
        parts = draw(st.lists(children, max_size=4))
        declared = draw(st.sampled_from(["same", "other", "none"]))
        param = {"same": b'; boundary="' + boundary + b'"', "other": b"; boundary=zz", "none": b""}[
            declared
        ]
        lines = [b"Content-Type: multipart/" + subtype.encode() + param, b"", b"preamble"]
        for part in parts:
            lines += [b"--" + boundary + draw(st.sampled_from([b"", b"  ", b"--"])), part]
        ending = draw(st.sampled_from(["closed", "open", "truncated"]))
        if ending == "closed":
            lines += [b"--" + boundary + b"--", b"epilogue"]
        elif ending == "truncated":
            lines.append(b"--" + boundary[: len(boundary) // 2])
        return eol.join(lines)

    return build()


@st.composite
def embedded(draw: st.DrawFn, inner: st.SearchStrategy[bytes]) -> bytes:
    """message/rfc822 around a whole message."""
    eol = draw(EOL)
    return eol.join([b"Content-Type: message/rfc822", b"", b"Subject: inner", draw(inner)])


ENTITIES = st.recursive(
    leaves(), lambda kids: st.one_of(multiparts(kids), embedded(kids)), max_leaves=14
)

HEADER_VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            '"Bank, Support" <support@bank.example>',
            "=?utf-8?b?UGF5UGFs?= <x@evil.example>",
            "=?iso-2022-jp?b?GyRCJUYlOSVIGyhC?=",
            "=?bogus?q?=FF=FE?=",
            "undisclosed-recipients:;",
            "<>",
            "a@b@c",
            "(comment) x@y.example",
            "\x00",
            "a" * 1200,
        ]
    ),
)
# Incoming X-Spam-* headers that a sender may use to forge a verdict, in spellings parsers accept.
FORGERIES = st.sampled_from(
    [
        b"X-Spam-Flag: NO",
        b"x-spam-flag:NO",
        b"X-Spam-Flag : NO",
        b"X-Spam-Flag\t:NO",
        b"X-Spam-Status: No, score=-100",
        b"X-SPAM-SCORE: -100",
        b"X-Spam-Status:\r\n No, score=0",
        b"X-Spam-Flag: NO\r\n\tcontinued",
    ]
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A whole message: headers (some forged), MIME-Version, an entity tree."""
    eol = draw(EOL)
    headers = [
        f"{name}: {value}".encode("utf-8", "surrogatepass")
        for name, value in draw(
            st.lists(
                st.tuples(
                    st.sampled_from(
                        ["From", "To", "Cc", "Subject", "Reply-To", "Date", "X-Mailer"]
                    ),
                    HEADER_VALUES,
                ),
                max_size=6,
            )
        )
    ]
    headers += draw(st.lists(FORGERIES, max_size=2))
    headers.append(b"MIME-Version: 1.0")
    return eol.join(headers) + eol + draw(ENTITIES)


@st.composite
def corpus_mutants(draw: st.DrawFn) -> bytes:
    """A corpus message, cut, spliced, flipped or with a fragment inserted."""
    seeds = corpus_bytes()
    raw = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["cut", "flip", "insert", "splice", "dup"]))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "cut":
            del raw[at : at + draw(st.integers(1, 400))]
        elif op == "flip" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = draw(
                st.one_of(
                    FORGERIES,
                    PAYLOADS,
                    st.sampled_from(
                        [b"\r\n--", b"\r\n\r\n", b"\n.\n", b"=?utf-8?b?", b"boundary=", b"\x00"]
                    ),
                )
            )
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            raw[at:] = other[draw(st.integers(0, max(0, len(other) - 1))) :]
        else:
            raw += raw[at : at + 2000]
    return bytes(raw)


ANY_MESSAGE = st.one_of(messages(), corpus_mutants(), st.sampled_from(corpus_bytes()))


# --- SMTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One client action: a command line, or a DATA command followed by ``body`` if accepted."""

    line: bytes
    body: bytes | None = None


ADDRESSES = st.one_of(
    st.sampled_from(
        [
            "a@example.org",
            "rcpt@example.net",
            "",
            "postmaster",
            "a@[127.0.0.1]",
            "@r1,@r2:a@b.example",
            '"quoted local"@example.org',
            "jörg@例え.jp",
            "a" * 300 + "@example.org",
            "a@b",
            "<>",
            "a@example.org>",
            "<a@example.org",
            "a\x00b@example.org",
            "a\rb@example.org",
            "a b@c",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_characters="\n", codec="utf-8"), max_size=60),
)
MAIL_PARAMS = st.lists(
    st.sampled_from(
        [
            "SIZE=100",
            "SIZE=99999999999",
            "SIZE=",
            "SIZE=-1",
            "BODY=8BITMIME",
            "BODY=7BIT",
            "BODY=X",
            "SMTPUTF8",
            "RET=FULL",
            "ENVID=x",
            "AUTH=<>",
            "X=Y",
            "=",
            "NOTIFY=NEVER",
            "\x00",
        ]
    ),
    max_size=3,
)
HOSTNAMES = st.sampled_from(
    ["client.test", "", "[127.0.0.1]", "x" * 600, "ü.example", "a b", "\x00"]
)
JUNK = st.binary(max_size=120).map(lambda b: b.replace(b"\n", b""))


def _text(line: str) -> bytes:
    return line.encode("utf-8", "surrogateescape")


@st.composite
def steps(draw: st.DrawFn) -> Step:
    kind = draw(
        st.sampled_from(
            [
                "ehlo",
                "helo",
                "mail",
                "mail",
                "rcpt",
                "rcpt",
                "rcpt",
                "data",
                "data",
                "rset",
                "noop",
                "xforward",
                "other",
                "junk",
                "bad-mail",
                "case",
            ]
        )
    )
    if kind in ("ehlo", "helo"):
        return Step(_text(f"{kind.upper()} {draw(HOSTNAMES)}").rstrip(b" "))
    if kind == "mail":
        params = " ".join(draw(MAIL_PARAMS))
        return Step(_text(f"MAIL FROM:<{draw(ADDRESSES)}> {params}".rstrip()))
    if kind == "rcpt":
        return Step(_text(f"RCPT TO:<{draw(ADDRESSES)}>"))
    if kind == "data":
        return Step(b"DATA", draw(ANY_MESSAGE))
    if kind == "xforward":
        attrs = draw(
            st.lists(
                st.sampled_from(
                    [
                        "ADDR=192.0.2.7",
                        "NAME=mx.example",
                        "HELO=[UNAVAILABLE]",
                        "IDENT=Q1+2B",
                        "PROTO=ESMTP",
                        "SOURCE=REMOTE",
                        "PORT=25",
                        "ADDR=",
                        "JUNK=1",
                        "ADDR=::1",
                        "NAME=" + "n" * 300,
                        "=",
                    ]
                ),
                max_size=4,
            )
        )
        return Step(_text("XFORWARD " + " ".join(attrs)).rstrip(b" "))
    if kind == "other":
        return Step(
            draw(
                st.sampled_from(
                    [
                        b"VRFY root",
                        b"EXPN all",
                        b"HELP",
                        b"HELP MAIL",
                        b"STARTTLS",
                        b"AUTH PLAIN AAAA",
                        b"BDAT 10 LAST",
                        b"NOOP arg",
                        b"RSET now",
                        b"DATA now",
                        b"TURN",
                        b"ETRN x",
                    ]
                )
            )
        )
    if kind == "bad-mail":
        return Step(
            draw(
                st.sampled_from(
                    [
                        b"MAIL",
                        b"MAIL FROM",
                        b"MAIL FROM:",
                        b"MAIL TO:<a@b>",
                        b"MAIL FROM:a@b",
                        b"RCPT",
                        b"RCPT TO:",
                        b"RCPT FROM:<a@b>",
                        b"MAIL FROM:<a@b> SIZE=1 SIZE=2",
                        b"mail from:<a@b>",
                    ]
                )
            )
        )
    if kind == "case":
        return Step(
            draw(st.sampled_from([b"eHlO x", b"rset", b"NoOp", b"Mail From:<a@example.org>"]))
        )
    if kind == "rset":
        return Step(b"RSET")
    if kind == "noop":
        return Step(b"NOOP")
    return Step(draw(JUNK))


@st.composite
def transactions(draw: st.DrawFn) -> list[Step]:
    """A mostly well-formed transaction, so that sequences reach DATA often."""
    params = " ".join(draw(MAIL_PARAMS)) if draw(st.booleans()) else ""
    sender = draw(st.one_of(st.just("sender@example.org"), st.just(""), ADDRESSES))
    out = [Step(_text(f"MAIL FROM:<{sender}> {params}".rstrip()))]
    for _ in range(draw(st.integers(1, 3))):
        rcpt = draw(st.one_of(st.just("rcpt@example.net"), ADDRESSES))
        out.append(Step(_text(f"RCPT TO:<{rcpt}>")))
    out.append(Step(b"DATA", draw(ANY_MESSAGE)))
    return out


SESSIONS = st.lists(
    st.one_of(steps().map(lambda step: [step]), transactions()), min_size=1, max_size=8
).map(lambda groups: [s for g in groups for s in g])
