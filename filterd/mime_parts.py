"""The MIME tree of a message, walked without copying: a list of leaf parts as offsets into the
raw bytes, and the transfer decoding of one leaf.

The walker is our own rather than ``email.parser``: it is iterative (no recursion limit to hit),
stops at ``max_depth`` and ``max_parts``, finds each boundary with ``bytes.find`` (linear: a
candidate is only examined at the start of a line), and never raises. It follows RFC 2046 and
what mail clients do with broken input: an unterminated multipart ends at the end of the
message, a multipart whose boundary never occurs is read as text, a part without a Content-Type
is text/plain (message/rfc822 inside multipart/digest), an invalid Content-Type is text/plain,
and message/rfc822 parts are walked into (and also reported themselves).

A single-part message is its own only leaf without the walk, and the Content-* values each
part declares are parsed once per distinct short value, as mail repeats them.
"""

from __future__ import annotations

import binascii
import functools
import re
from dataclasses import dataclass

from filterd.mime_headers import HeaderField, decode_base64, parse_params, split_section

_TYPE_RE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_ENCODED = frozenset({"base64", "quoted-printable"})
# Encoded input needed per decoded byte, at most: base64 yields 3 bytes per 4 characters,
# quoted-printable at least 1 per 3, plus line breaks.
_INPUT_PER_OUTPUT = {"base64": 2, "quoted-printable": 4}


@dataclass(frozen=True, slots=True)
class Leaf:
    """One part that is not walked into further: where its body is and what it declares."""

    buf: bytes
    start: int
    end: int
    content_type: str  # lower-cased type/subtype, defaults applied
    charset: str | None
    filename: str
    disposition: str  # lower-cased 'attachment' / 'inline' / '' (not given)
    encoding: str  # lower-cased Content-Transfer-Encoding, '' if not given
    container: bool = False  # a message/rfc822 walked into, or a multipart cut at max_depth


PARTS = "parts"
DEPTH = "depth"


@dataclass(frozen=True, slots=True)
class Structure:
    """The leaves of a message in document order, and the limits (``PARTS``, ``DEPTH``) that
    cut the walk short, if any."""

    leaves: tuple[Leaf, ...]
    cut_by: frozenset[str] = frozenset()

    @property
    def truncated(self) -> bool:
        return bool(self.cut_by)


@dataclass(frozen=True, slots=True)
class _Declared:
    content_type: str
    charset: str | None
    filename: str
    disposition: str
    encoding: str
    boundary: str


def _as_saved(filename: str) -> str:
    """An attachment's name as a mail client saves it: without the blanks around it (Python's
    ``get_filename`` strips them) and without trailing dots (Windows drops them), so that
    ``invoice.js `` or ``setup.exe.`` cannot slip past a rule on ``*.js`` or ``*.exe``."""
    return filename.strip().rstrip(". \t")


def _declared(fields: list[HeaderField], default_type: str) -> _Declared:
    # The first of each Content-* field, found by C-level list searches rather than a loop.
    names = [name.lower() for name, _ in fields]
    content_type = fields[names.index("content-type")][1] if "content-type" in names else None
    disposition = (
        fields[names.index("content-disposition")][1] if "content-disposition" in names else None
    )
    encoding = (
        fields[names.index("content-transfer-encoding")][1]
        if "content-transfer-encoding" in names
        else None
    )
    if (
        (content_type is None or len(content_type) <= _MEMO_VALUE_CHARS)
        and (disposition is None or len(disposition) <= _MEMO_VALUE_CHARS)
        and (encoding is None or len(encoding) <= _MEMO_VALUE_CHARS)
    ):
        return _declared_memo(content_type, disposition, encoding, default_type)
    return _declared_values(content_type, disposition, encoding, default_type)


def _declared_values(
    content_type: str | None, disposition: str | None, encoding: str | None, default_type: str
) -> _Declared:
    """What a part declares, from its first Content-Type, Content-Disposition and
    Content-Transfer-Encoding values (None: absent)."""
    ctype, params = parse_params(content_type) if content_type is not None else (default_type, {})
    if not _TYPE_RE.fullmatch(ctype):
        ctype = "text/plain"  # RFC 2045 section 5.2: an invalid Content-Type means text/plain
    disp, disp_params = parse_params(disposition) if disposition is not None else ("", {})
    filename = _as_saved(disp_params.get("filename") or params.get("name") or "")
    return _Declared(
        content_type=ctype,
        charset=params.get("charset"),
        filename=filename,
        disposition=disp,
        encoding=(encoding or "").strip().lower().partition(" ")[0],
        boundary=params.get("boundary", ""),
    )


# Mail repeats the same few Content-* values ("text/plain; charset=utf-8", "base64", none at
# all) from part to part and message to message; ``_declared_values`` is a pure function of
# them and its result is immutable, so they are parsed once. Only short values are kept: a
# hostile message's long ones would otherwise stay in memory after it.
_MEMO_VALUE_CHARS = 200
_declared_memo = functools.lru_cache(maxsize=1024)(_declared_values)


def walk(
    buf: bytes,
    fields: list[HeaderField],
    body_start: int,
    *,
    max_parts: int,
    max_depth: int,
) -> Structure:
    """Walk the message whose header fields are ``fields`` and whose body starts at
    ``body_start``; return its leaves."""
    top = _declared(fields, "text/plain")
    ctype = top.content_type
    if max_parts >= 1 and not ctype.startswith("multipart/") and ctype not in _MESSAGE_TYPES:
        # A single part: the walk would make it the only leaf.
        return Structure((_leaf(buf, body_start, len(buf), ctype, top),))
    return _walk_tree(buf, fields, body_start, top, max_parts=max_parts, max_depth=max_depth)


def _walk_tree(
    buf: bytes,
    fields: list[HeaderField],
    body_start: int,
    top: _Declared,
    *,
    max_parts: int,
    max_depth: int,
) -> Structure:
    """``walk`` for any message, part by part; ``top`` is what the message itself declares."""
    leaves: list[Leaf] = []
    cut_by: set[str] = set()
    count = 0
    # (buffer, header start, end, depth, default type, pre-parsed (fields, body start) or None)
    stack: list[tuple[bytes, int, int, int, str, tuple[list[HeaderField], int] | None]] = [
        (buf, 0, len(buf), 0, "text/plain", (fields, body_start))
    ]
    while stack:
        data, start, end, depth, default_type, parsed = stack.pop()
        count += 1
        if count > max_parts:
            cut_by.add(PARTS)
            break
        if parsed is None:
            part_fields, _, body = split_section(data, start, end)
        else:
            part_fields, body = parsed
        info = top if count == 1 else _declared(part_fields, default_type)
        ctype = info.content_type
        if ctype.startswith("multipart/"):
            if depth >= max_depth:
                cut_by.add(DEPTH)
                leaves.append(_leaf(data, body, end, ctype, info, container=True))
                continue
            split = _split_multipart(data, body, end, info.boundary, max_parts)
            if split is not None:
                parts, cut = split
                if cut:
                    cut_by.add(PARTS)
                child_type = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                stack.extend((data, s, e, depth + 1, child_type, None) for s, e in reversed(parts))
                continue
            ctype = "text/plain"  # no usable boundary: what is there is shown as text
        elif ctype in _MESSAGE_TYPES:
            if depth >= max_depth:
                cut_by.add(DEPTH)
            else:
                outer = _leaf(data, body, end, ctype, info, container=True)
                leaves.append(outer)
                inner, inner_start, inner_end = data, body, end
                if info.encoding in _ENCODED:  # not allowed by RFC 2046, but sent and displayed
                    inner = decode_body(outer)
                    inner_start, inner_end = 0, len(inner)
                stack.append((inner, inner_start, inner_end, depth + 1, "text/plain", None))
                continue
        leaves.append(_leaf(data, body, end, ctype, info))
    return Structure(tuple(leaves), frozenset(cut_by))


def _leaf(
    buf: bytes, start: int, end: int, content_type: str, info: _Declared, *, container: bool = False
) -> Leaf:
    return Leaf(
        buf,
        start,
        end,
        content_type,
        info.charset,
        info.filename,
        info.disposition,
        info.encoding,
        container,
    )


def _split_multipart(
    buf: bytes, start: int, end: int, boundary: str, limit: int
) -> tuple[list[tuple[int, int]], bool] | None:
    """The (start, end) body ranges of the parts of a multipart body, and whether ``limit``
    cut the list; None when the boundary is empty or never occurs."""
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode("utf-8", "surrogatepass")
    parts: list[tuple[int, int]] = []
    part_start: int | None = None  # None while in the preamble
    pos = start
    while True:
        hit = buf.find(delimiter, pos, end)
        if hit < 0:
            break
        pos = hit + 1
        if hit != start and buf[hit - 1] != 0x0A:
            continue  # only a delimiter at the start of a line counts
        after = hit + len(delimiter)
        closing = buf.startswith(b"--", after, end)
        newline = buf.find(b"\n", after, end)
        line_end = end if newline < 0 else newline
        if buf[after + 2 * closing : line_end].strip(b" \t\r"):
            continue  # "--b1" seen in "--b10": another boundary, or text
        if part_start is not None:
            content_end = hit
            if content_end > part_start and buf[content_end - 1] == 0x0A:
                content_end -= 1  # the line break before a delimiter belongs to it
                if content_end > part_start and buf[content_end - 1] == 0x0D:
                    content_end -= 1
            parts.append((part_start, content_end))
            if len(parts) >= limit:
                return parts, True
        if closing:
            return parts, False
        part_start = line_end + 1 if newline >= 0 else end
        pos = part_start
    if part_start is None:
        return None
    parts.append((part_start, end))  # unterminated: the last part runs to the end
    return parts, False


def decode_body(leaf: Leaf, limit: int | None = None) -> bytes:
    """The body of a leaf with its transfer encoding undone; at most ``limit`` bytes.

    With a limit, only as much encoded input as can produce ``limit`` bytes is decoded.
    """
    end = leaf.end
    if limit is not None:
        end = min(end, leaf.start + limit * _INPUT_PER_OUTPUT.get(leaf.encoding, 1) + 8)
    if leaf.encoding not in _ENCODED and type(leaf.buf) is bytes:
        # Nothing to undo: the body is one slice (the view below would be copied just the same).
        data = leaf.buf[leaf.start : end]
        return data if limit is None or len(data) <= limit else data[:limit]
    # A view, not a slice: an attachment's encoded body may be megabytes, and decoding needs
    # no copy of it first (a spooled message is parsed whole).
    encoded = memoryview(leaf.buf)[leaf.start : end]
    if leaf.encoding == "base64":
        data = decode_base64(encoded)
    elif leaf.encoding == "quoted-printable":
        data = binascii.a2b_qp(encoded)
    else:
        data = bytes(encoded)
    return data if limit is None or len(data) <= limit else data[:limit]
