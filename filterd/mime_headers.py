"""Header-level MIME parsing: the header section of an entity, unfolding, RFC 2047 encoded
words, Content-* parameters (RFC 2045 / RFC 2231) and charset decoding.

Everything here is hand-written over ``bytes`` and ``str`` with atomic groups in the regexes
(``(?>...)``: once matched, never backtracked into), so the work is linear in the input and
never raises on hostile bytes. ``email.header`` is not used: it
raises on bad base64 or unknown charsets for the whole header, where we want to decode every
encoded word on its own and fall back per word.

The usual header section (UTF-8 fields, CRLF line ends, a blank line) is split by whole-section
C-level passes, and ASCII text in an ASCII-compatible charset is decoded without its charset;
anything else takes the general code, which gives the same result for those shapes.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re
from itertools import repeat
from urllib.parse import unquote_to_bytes

# The header section: an optional mbox "From " line, stray continuation lines, then fields
# ("name:" followed by continuation lines; an empty name counts, as in Python's feedparser,
# which skips such a line and reads on). It stops at the first line that is neither, which is
# the blank separator line or, in a message without one, the first body line (as Python's
# feedparser does). Atomic groups keep the match linear.
#
# Atomic groups, not the possessive quantifiers (``x*+``) they stand for: Python before 3.11.5
# matches possessive quantifiers wrongly (CPython gh-100061, gh-106052), and Debian 12's
# python3 is 3.11.2. tests/unit/test_regex_portability.py keeps them out of filterd.
_SECTION_RE = re.compile(
    rb"(?:From (?>[^\n]*)(?:\n|\Z))?"
    rb"(?>(?:[ \t](?>[^\n]*)(?:\n|\Z))*)"
    rb"(?>(?:"
    rb"(?>[\x21-\x39\x3b-\x7e]*)(?>[ \t]*):(?>[^\n]*)(?:\n|\Z)"
    rb"(?>(?:[ \t](?>[^\n]*)(?:\n|\Z))*)"
    rb")*)"
)
_FIELD_RE = re.compile(
    rb"^((?>[\x21-\x39\x3b-\x7e]*))(?>[ \t]*):((?>[^\n]*)(?>(?:\n[ \t](?>[^\n]*))*))", re.M
)
_BLANK_RE = re.compile(rb"(?>\r*)\n")
# Where a logical header line ends: at a CRLF that no fold continues.
_FIELD_BREAK_RE = re.compile("\r\n(?![ \t])")
_ASCII_SPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips; str.strip() strips more
_FOLD_RE = re.compile(rb"\r*\n(?=[ \t])")
# Membership tests on bytes on the per-message path take an int for a single byte and find()
# for a longer needle: ``b"\n" in data`` first tries the needle as an int, and Python 3.11
# builds (and drops) a formatted TypeError for it before it searches, a microsecond a test.
CR_BYTE, LF_BYTE = ord("\r"), ord("\n")

# One RFC 2047 encoded word. The text part stops at the next '?' so a run of unterminated
# "=?" openers costs linear time; spaces inside Q text are tolerated (broken encoders emit them).
_EW_RE = re.compile(r"=\?((?>[^?\s]*))\?([bBqQ])\?((?>[^?]*))\?=")
_SPACE_ONLY_RE = re.compile(r"(?>[ \t\r\n]*)")

# Parameter lists: quoted strings (with backslash escapes, possibly unterminated), runs of
# other characters, and the ';' separators.
_PARAM_TOKEN_RE = re.compile(r'"(?>(?:[^"\\]|\\.)*)"?|(?>[^;"]+)|;')
# No cap on the number of parameters or sections beyond the three digits RFC 2231 needs: a
# cap would let junk parameters push "boundary" or a filename's last section out of sight.
_SECTION_KEY_RE = re.compile(r"([^*]+)\*(\d{1,3})(\*?)\Z")

# Codecs that are text encodings in Python but are not mail charsets, or whose decoders are
# superlinear on hostile input (punycode): never use them for message text.
_REFUSED_CODECS = frozenset(
    {"punycode", "idna", "raw_unicode_escape", "unicode_escape", "undefined", "mbcs", "oem"}
)
# Labels mail clients read as a superset (the WHATWG encoding standard does the same).
_CHARSET_ALIASES = {
    "ks_c_5601-1987": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-sjis": "shift_jis",
    "x-gbk": "gb18030",
}

HeaderField = tuple[str, str]  # (name as written, value unfolded, not RFC 2047 decoded)


def split_section(buf: bytes, start: int, end: int) -> tuple[list[HeaderField], int, int]:
    """Parse the header section of the entity at ``buf[start:end]``.

    Returns the fields and two offsets: where the header section ends (the separator line is
    not included) and where the body starts (after the separator line, if there is one).
    """
    plain = _split_plain_section(buf, start, end)
    if plain is not None:
        return plain
    return _split_any_section(buf, start, end)


def _split_plain_section(
    buf: bytes, start: int, end: int
) -> tuple[list[HeaderField], int, int] | None:
    """``_split_any_section`` by whole-section passes for the usual shape, None for any other:
    UTF-8 fields ("name:" lines, possibly folded) with CRLF line ends, up to a blank CRLF line.

    In that shape every line up to the first blank line is a field or one of its continuation
    lines, so the section ends at that blank line; each field's value is the same text the
    general code unfolds and strips (every line break inside a value is a CRLF before a fold);
    and the section, valid UTF-8 as a whole and cut only at ASCII characters, decodes field by
    field as it does at once. A lone CR or LF, an empty name, white space before the colon, a
    fold before the colon, a stray first continuation line, an mbox "From " line, 8-bit
    non-UTF-8 bytes, or no blank line leave it to the general code.
    """
    if start and buf[start - 1] != 0x0A:
        return None  # the general code reads no field on a line that starts before ``start``
    separator = buf.find(b"\r\n\r\n", start, end)
    if separator < 0:
        return None
    header_end = separator + 2
    try:
        section = buf[start:separator].decode("utf-8")
    except UnicodeDecodeError:
        return None
    breaks = section.count("\r\n")
    if section.count("\r") != breaks or section.count("\n") != breaks:
        return None  # a lone CR or LF: a line end (or not) the way the general code sees it
    folded = "\r\n " in section or "\r\n\t" in section
    lines = _FIELD_BREAK_RE.split(section) if folded else section.split("\r\n")
    names, colons, values = zip(*map(str.partition, lines, repeat(":")), strict=True)
    joined_names = "".join(names)
    # Each name must be a run of printable ASCII other than space (':' cannot occur: the line
    # was cut at its first one); a name holding a fold's CRLF fails here too.
    if (
        "" in colons
        or "" in names
        or not (joined_names.isascii() and joined_names.isprintable())
        or " " in joined_names
    ):
        return None
    if folded:
        values = tuple(value.replace("\r\n", "") for value in values)
    fields = list(zip(names, map(str.strip, values, repeat(_ASCII_SPACE)), strict=True))
    return fields, header_end, header_end + 2


def _split_any_section(buf: bytes, start: int, end: int) -> tuple[list[HeaderField], int, int]:
    """``split_section`` for any bytes: the general code, one field at a time."""
    match = _SECTION_RE.match(buf, start, end)
    header_end = match.end() if match else start
    blank = _BLANK_RE.match(buf, header_end, end)
    body_start = blank.end() if blank else header_end
    fields: list[HeaderField] = []
    for field in _FIELD_RE.finditer(buf, start, header_end):
        if field.start(1) == field.end(1):
            continue  # ": value" has no name: a defect Python's parser skips, and so do we
        value = field.group(2)
        if LF_BYTE in value:
            value = _FOLD_RE.sub(b"", value)
        fields.append((field.group(1).decode("ascii"), decode_header_bytes(value.strip())))
    return fields, header_end, body_start


def decode_header_bytes(data: bytes) -> str:
    """Header bytes to text: UTF-8 (SMTPUTF8 and most raw 8-bit headers), else Windows-1252."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


@functools.lru_cache(maxsize=256)
def _codec_name(label: str) -> str | None:
    """The Python codec for a declared charset label, or None when unknown or refused."""
    label = _CHARSET_ALIASES.get(label, label)
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError):
        return None
    if name == "iso8859-1":
        return "cp1252"  # what senders labelling Latin-1 really send (WHATWG does the same)
    return None if name in _REFUSED_CODECS else name


def decode_text(data: bytes, charset: str | None) -> str:
    """Decode message text in its declared charset with replacement characters.

    Unknown charsets decode as UTF-8. Undeclared (or US-ASCII) text is tried as UTF-8 first and
    read as Windows-1252 when that fails, which is what unlabelled 8-bit mail usually is.
    """
    label = _charset_label(charset)
    if label in ("", "us-ascii", "ascii"):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("cp1252", "replace")
    codec = _codec_name(label)
    if codec is None:
        return data.decode("utf-8", "replace")
    try:
        text = data.decode(codec, "replace")
    except (UnicodeError, LookupError, ValueError, TypeError):
        # A codec that fails internally: the charset label must never make parsing fail.
        return data.decode("utf-8", "replace")
    if codec == "utf-7":
        # UTF-7 decodes "+2AA-" to a lone surrogate, which is no character: text holding one
        # cannot be encoded again (RE2, the log line), and would fail the message every time.
        text = without_surrogates(text)
    return text


def _charset_label(charset: str | None) -> str:
    return charset.strip().strip("\"'").lower() if charset else ""


# Codecs (as ``_codec_name`` names them) that read every ASCII byte as that ASCII character,
# one byte at a time: ASCII text decodes alike in all of them. Not UTF-7 (its '+' starts a
# shifted run), nor ISO-2022 or HZ (ASCII escapes switch character sets), nor UTF-16/32.
_ASCII_TRANSPARENT_CODECS = frozenset(
    {"ascii", "utf-8", "cp1252", "cp1250", "cp1251", "koi8-r", "koi8-u"}
    | {f"iso8859-{number}" for number in (2, 3, 4, 5, 7, 9, 10, 13, 14, 15, 16)}
)


def decode_text_lf(data: bytes, charset: str | None) -> str:
    """``decode_text`` with each CRLF as a bare LF."""
    if data.isascii():
        label = _charset_label(charset)
        if label in ("", "us-ascii", "ascii") or _codec_name(label) in _ASCII_TRANSPARENT_CODECS:
            # ASCII text means the same in every such charset, so the line breaks can be
            # rewritten on the bytes, where split and join beat ``str.replace``.
            if CR_BYTE in data:
                data = b"\n".join(data.split(b"\r\n"))
            return data.decode("ascii")
    text = decode_text(data, charset)
    return text.replace("\r\n", "\n") if "\r" in text else text


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def without_surrogates(text: str) -> str:
    """``text`` with each lone surrogate (no character: strict UTF-8 refuses it) as U+FFFD.
    ASCII text, nearly all of it, is returned at once."""
    return text if text.isascii() else _SURROGATE_RE.sub("\ufffd", text)


def decode_base64(data: bytes | memoryview) -> bytes:
    """Lenient base64: junk characters are skipped and missing padding is supplied."""
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        pass
    cleaned = bytes(data).translate(None, _NON_B64)
    cleaned = cleaned[: len(cleaned) - len(cleaned) % 4] if len(cleaned) % 4 == 1 else cleaned
    cleaned += b"=" * (-len(cleaned) % 4)
    try:
        return binascii.a2b_base64(cleaned)
    except (binascii.Error, ValueError):
        return b""


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NON_B64 = bytes(b for b in range(256) if b not in _B64_ALPHABET)


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words in a header value; text without ``=?`` is returned as is.

    Whitespace between adjacent encoded words is dropped (RFC 2047 section 6.2), and adjacent
    words in the same charset are decoded together so a character split across words survives.
    Each run decodes on its own: a bad word or unknown charset never spoils the rest.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    last_was_word = False
    for match in _EW_RE.finditer(value):
        gap = value[pos : match.start()]
        if not (last_was_word and _SPACE_ONLY_RE.fullmatch(gap)):
            if pending:
                out.append(decode_text(bytes(pending), pending_charset))
                pending.clear()
            out.append(gap)
        charset = match.group(1).partition("*")[0]  # RFC 2231 language suffix
        if pending and charset.lower() != pending_charset.lower():
            out.append(decode_text(bytes(pending), pending_charset))
            pending.clear()
        pending_charset = charset
        text = match.group(3).encode("utf-8", "replace")
        if match.group(2) in "bB":
            pending += decode_base64(text)
        else:
            pending += binascii.a2b_qp(text, header=True)
        pos = match.end()
        last_was_word = True
    if pending:
        out.append(decode_text(bytes(pending), pending_charset))
    out.append(value[pos:])
    return "".join(out)


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"'):
        body = value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:]
        return re.sub(r"\\(.)", r"\1", body) if "\\" in body else body
    return value


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type / Content-Disposition value into its lower-cased main value and its
    parameters (keys lower-cased; RFC 2231 continuations and charsets and RFC 2047 words in
    values decoded). Later duplicates of a plain parameter do not override the first."""
    segments: list[list[str]] = [[]]
    for piece in _PARAM_TOKEN_RE.findall(value):
        if piece == ";":
            segments.append([])
        else:
            segments[-1].append(piece)
    main = "".join(segments[0]).strip().lower()
    plain: dict[str, str] = {}
    sections: dict[str, dict[int, tuple[str, bool]]] = {}
    for segment in segments[1:]:
        key, sep, raw = "".join(segment).partition("=")
        key = key.strip().lower()
        if not sep or not key:
            continue
        if key.endswith("*") and "*" not in key[:-1]:
            sections.setdefault(key[:-1], {})[0] = (raw.strip(), True)
            continue
        section = _SECTION_KEY_RE.match(key)
        if section:
            parts = sections.setdefault(section.group(1), {})
            parts.setdefault(int(section.group(2)), (_unquote(raw), bool(section.group(3))))
            continue
        plain.setdefault(key, _unquote(raw))
    params = {key: decode_words(text) for key, text in plain.items()}
    for key, parts in sections.items():
        joined = _join_sections(parts)
        if joined or key not in params:  # broken sections never hide a plain value
            params[key] = joined
    return main, params


def _join_sections(parts: dict[int, tuple[str, bool]]) -> str:
    """Reassemble RFC 2231 sections 0..n (stopping at the first gap) and decode them."""
    charset = ""
    data = bytearray()
    for number in range(len(parts)):
        if number not in parts:
            break
        text, encoded = parts[number]
        if encoded:
            text = _unquote(text)
            if number == 0 and text.count("'") >= 2:
                charset, _, rest = text.split("'", 2)
                text = rest
            data += unquote_to_bytes(text)
        else:
            data += text.encode("utf-8", "replace")
    return decode_words(decode_text(bytes(data), charset or None))
