"""Header edits on a raw message: pure ``bytes -> bytes`` functions.

Owns removing, adding and rewriting header fields (and the SpamAssassin-compatible ``X-Spam-*``
set) without touching any other byte of the message: the body, the order and the folding of the
fields we do not edit stay byte-identical, and the message keeps its own line ending (CRLF as
received over SMTP, bare LF for files written on Unix).

The header block is scanned the way Python's ``email`` feed parser does it: it ends at the first
empty line, or at the first line that is neither a field nor a continuation (a message without a
header/body separator), or at the end of the data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import Header, decode_header, make_header

__all__ = [
    "SPAM_HEADER_PREFIX",
    "add_headers",
    "apply_modifications",
    "fold_header",
    "prefix_subject",
    "remove_headers",
    "spam_headers",
]

SPAM_HEADER_PREFIX = "X-Spam-"

# RFC 5322 recommends 78 characters per line; 998 is the hard limit.
_SOFT_LIMIT = 78
_HARD_LIMIT = 998

# A field name is printable ASCII except the colon; obsolete syntax allows blanks before the colon.
# An empty name is read as a (broken) field too, as Python's email parser does: there the header
# section goes on after such a line, so the fields after it must be seen here as well.
_FIELD_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]*)[ \t]*:")
_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# Every control character but TAB would let a value end its line or confuse a parser: CR, LF,
# VT, FF, NUL, NEL and the Unicode separators all count as line breaks somewhere (str.splitlines,
# which email.header uses, breaks on all of them).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]+")
_CHUNK_RE = re.compile(r"[ \t]*[^ \t]+|[ \t]+")


@dataclass(frozen=True)
class _Field:
    """One header field as it sits in the raw bytes: ``raw[start:end]`` with its continuations."""

    name: bytes | None  # None for lines that belong to no field (mbox "From ", stray continuation)
    start: int
    end: int


@dataclass(frozen=True)
class _HeaderBlock:
    fields: tuple[_Field, ...]
    end: int  # offset of the first byte after the last field (the separator or the body)
    eol: bytes


def _line_ending(raw: bytes) -> bytes:
    nl = raw.find(b"\n")
    if nl > 0 and raw[nl - 1 : nl] == b"\r":
        return b"\r\n"
    if nl >= 0:
        return b"\n"
    return b"\r\n"  # no line at all: SMTP's line ending


def _scan(raw: bytes) -> _HeaderBlock:
    fields: list[_Field] = []
    pos = 0
    size = len(raw)
    while pos < size:
        nl = raw.find(b"\n", pos)
        line_end = size if nl < 0 else nl + 1
        line = raw[pos:line_end]
        if line in (b"\n", b"\r\n", b"\r"):
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                last = fields[-1]
                fields[-1] = _Field(last.name, last.start, line_end)
            else:
                fields.append(_Field(None, pos, line_end))
        else:
            match = _FIELD_RE.match(line)
            if match is not None:
                fields.append(_Field(match.group(1), pos, line_end))
            elif pos == 0 and line.startswith(b"From "):
                fields.append(_Field(None, pos, line_end))
            else:
                break  # not a field: the body starts here (no header/body separator)
        pos = line_end
    return _HeaderBlock(tuple(fields), pos, _line_ending(raw))


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid header field name {name!r}")


def _sanitise(value: str) -> str:
    return _CONTROL_RE.sub(" ", value).strip(" \t")


def _chunks(value: str) -> list[tuple[str, str]]:
    """``(fold, text)`` pairs: each word with its leading blanks, and what a fold before it adds.

    Folding before a blank adds nothing once unfolded. A word too long for any line is cut after
    its commas, the way SpamAssassin folds a long ``tests=`` list: only there a fold adds a TAB.
    """
    chunks: list[tuple[str, str]] = []
    for chunk in _CHUNK_RE.findall(value):
        if len(chunk) <= _HARD_LIMIT - 2 or "," not in chunk:
            chunks.append(("", chunk))
            continue
        parts = chunk.split(",")
        chunks.append(("", parts[0] + ","))
        chunks.extend(("\t", part + ",") for part in parts[1:-1])
        chunks.append(("\t", parts[-1]))
    return chunks


def _fold_ascii(name: str, value: str, eol: str) -> str:
    """Fold before whitespace so that unfolding (removing the line breaks) gives ``value`` back."""
    lines: list[str] = []
    line = f"{name}:"
    bare = True  # only "Name:" so far: never break there
    for fold, text in _chunks(" " + value):
        # Trailing blanks stay on their line: alone on one they would make a line of nothing
        # but blanks, which RFC 5322 forbids and a lenient parser reads as the header's end.
        if not bare and len(line) + len(text) > _SOFT_LIMIT and text.strip(" \t"):
            lines.append(line)
            line = fold + text
        else:
            line += text
        bare = False
    lines.append(line)
    return eol.join(lines) + eol


def fold_header(name: str, value: str, eol: str = "\r\n") -> bytes:
    """One header field, ready to insert: sanitised, folded at 78 columns, RFC 2047 if needed.

    CR, LF and other control characters in ``value`` become spaces, so a value can never start
    a field of its own. A name that is not a valid field name raises ``ValueError``.
    """
    _check_name(name)
    value = _sanitise(value)
    if value.isascii():
        folded = _fold_ascii(name, value, eol)
        if all(len(line) <= _HARD_LIMIT for line in folded.split(eol)):
            return folded.encode("ascii")
    # Non-ASCII, or an ASCII word too long to fold: encoded words can be split anywhere.
    encoded = Header(value, "utf-8", maxlinelen=_SOFT_LIMIT, header_name=name).encode(linesep=eol)
    return f"{name}: {encoded}{eol}".encode("ascii")


def _may_have_prefixed_field(raw: bytes, starts: tuple[bytes, ...]) -> bool:
    """Whether a line of the header block starts with one of the lower-case ``starts``: a
    cheap test that can say yes wrongly (then the full scan decides), never no wrongly."""
    cut = raw.find(b"\n\r\n")
    cut = len(raw) if cut < 0 else cut
    bare = raw.find(b"\n\n", 0, cut)  # a bare-LF separator before it, if any
    cut = bare if bare >= 0 else cut
    head = b"\n" + raw[: cut + 1].lower()
    return any(b"\n" + start in head for start in starts)


def remove_headers(raw: bytes, names: Iterable[str], *, prefixes: Iterable[str] = ()) -> bytes:
    """Remove every occurrence of the named fields and of fields whose name starts with a prefix.

    Names and prefixes compare case-insensitively. Continuation lines go with their field;
    every other byte is kept as it was.
    """
    wanted = {n.lower().encode("ascii", "replace") for n in names}
    starts = tuple(p.lower().encode("ascii", "replace") for p in prefixes if p)
    if not wanted and not starts:
        return raw
    if not wanted and not _may_have_prefixed_field(raw, starts):
        return raw  # the usual case (no X-Spam-* to strip): one search, no per-line work
    block = _scan(raw)
    pieces: list[bytes] = []
    kept_from = 0
    for field in block.fields:
        if field.name is None:
            continue
        lowered = field.name.lower()
        if lowered in wanted or lowered.startswith(starts):
            pieces.append(raw[kept_from : field.start])
            kept_from = field.end
    if not pieces:
        return raw
    pieces.append(raw[kept_from:])
    return b"".join(pieces)


def add_headers(raw: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    """Prepend fields at the top of the header block, in the given order (as Received: is)."""
    if not headers:
        return raw
    eol = _line_ending(raw).decode("ascii")
    new = b"".join(fold_header(name, value, eol) for name, value in headers)
    # A message that starts with blank-led lines (continuations of no field) would have them
    # continue the last field added: they stay first, belonging to nothing, as they came.
    start = 0
    while raw[start : start + 1] in (b" ", b"\t"):
        nl = raw.find(b"\n", start)
        if nl < 0:
            break
        start = nl + 1
    return raw[:start] + new + raw[start:]


def _decoded(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", text).strip()
    try:
        return str(make_header(decode_header(unfolded)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        return unfolded


def _encoded_prefix(prefix: str, *, original_starts_encoded: bool) -> str:
    """The prefix as header text that decodes to ``prefix`` directly followed by the subject."""
    if prefix.isascii() and not (original_starts_encoded and not prefix[-1:].isspace()):
        return prefix
    if original_starts_encoded:
        # Whitespace between two encoded words is dropped by decoders, so the prefix keeps its own
        # trailing blank inside the encoded word and a plain space separates the two.
        return Header(prefix, "utf-8").encode() + " "
    # Plain text follows: the separating whitespace is kept by decoders, so it comes from the
    # prefix itself (an encoded word must be followed by whitespace anyway).
    stripped = prefix.rstrip()
    tail = prefix[len(stripped) :] or " "
    return Header(stripped, "utf-8").encode() + tail


def prefix_subject(raw: bytes, prefix: str) -> bytes:
    """Put ``prefix`` in front of the (first) Subject; add a Subject if there is none.

    A subject that already starts with the prefix is left alone, so a message that passes
    twice is not tagged twice. The original subject bytes (and their encoding) are kept.
    """
    prefix = _CONTROL_RE.sub(" ", prefix).lstrip(" \t")
    if not prefix.strip():
        return raw
    block = _scan(raw)
    for field in block.fields:
        if field.name is None or field.name.lower() != b"subject":
            continue
        line = raw[field.start : field.end]
        colon = line.index(b":")
        value = line[colon + 1 :]
        if _decoded(value).startswith(prefix.strip()):
            return raw
        body = value.lstrip(b" \t\r\n")  # later lines start with a blank: stays a continuation
        if not body:  # an empty Subject becomes the bare prefix
            body = block.eol
            prefix = prefix.rstrip()
        starts_encoded = body.startswith(b"=?")
        new_value = _encoded_prefix(prefix, original_starts_encoded=starts_encoded).encode("ascii")
        rewritten = _refold_first_line(line[: colon + 1] + b" " + new_value + body, block.eol)
        return raw[: field.start] + rewritten + raw[field.end :]
    return add_headers(raw, [("Subject", prefix.strip())])


def _refold_first_line(field: bytes, eol: bytes) -> bytes:
    """Fold the first line of a rewritten field if the prefix pushed it past 78 columns."""
    nl = field.find(b"\n")
    first, rest = (field, b"") if nl < 0 else (field[: nl + 1], field[nl + 1 :])
    content = first.rstrip(b"\r\n")
    ending = first[len(content) :] or (eol if rest else b"")
    if len(content) <= _SOFT_LIMIT:
        return field
    text = content.decode("utf-8", "surrogateescape")
    name, _, value = text.partition(":")
    folded = _fold_ascii(name, value.lstrip(" "), eol.decode("ascii"))
    folded = folded[: -len(eol)]  # the original line ending follows
    return folded.encode("utf-8", "surrogateescape") + ending + rest


def _score_text(score: float, required: float, flag: bool) -> str:
    """One decimal, as SpamAssassin prints it, without rounding across the threshold.

    SpamAssassin (bug 6419) never shows a spam score below ``required`` nor a ham score at or
    above it; we do the same when the flag follows from the score, so 4.96 on ham reads 4.9.
    """
    text = f"{score:.1f}"
    if flag == (score >= required):
        shown, needed = float(text), float(f"{required:.1f}")
        if flag and shown < needed:
            text = f"{needed:.1f}"
        elif not flag and shown >= needed:
            text = f"{needed - 0.1:.1f}"
    return "0.0" if text == "-0.0" else text


def spam_headers(
    score: float, required: float, tests: Sequence[str], flag: bool
) -> list[tuple[str, str]]:
    """The SpamAssassin-compatible field set: ``X-Spam-Flag`` (only when flagged, as SpamAssassin
    does), ``X-Spam-Score`` and ``X-Spam-Status: Yes, score=7.5 required=5.0 tests=a,b``."""
    shown = _score_text(score, required, flag)
    required_text = f"{required:.1f}"
    names = ",".join(tests) if tests else "none"
    status = f"{'Yes' if flag else 'No'}, score={shown} required={required_text} tests={names}"
    headers = [("X-Spam-Score", shown), ("X-Spam-Status", status)]
    if flag:
        headers.insert(0, ("X-Spam-Flag", "YES"))
    return headers


def apply_modifications(
    raw: bytes,
    *,
    remove: Sequence[str] = (),
    add: Sequence[tuple[str, str]] = (),
    subject_prefix: str = "",
) -> bytes:
    """Every header edit of a delivery, in order: incoming ``X-Spam-*`` and ``remove`` go first
    (so no sender can forge a verdict and ``add`` can replace a field), then the subject prefix,
    then ``add`` on top."""
    edited = remove_headers(raw, remove, prefixes=(SPAM_HEADER_PREFIX,))
    if subject_prefix:
        edited = prefix_subject(edited, subject_prefix)
    return add_headers(edited, add)
