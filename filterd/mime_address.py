"""Address-list parsing for From/To/Cc/Reply-To/Sender (RFC 5322 section 3.4, leniently).

A single linear scan over the undecoded header value: quoted strings, nested comments, angle
addresses, groups (``undisclosed-recipients:;``) and separators. Display names are RFC 2047
decoded only after the structure is known, so an encoded comma or '<' in a name cannot split or
forge an address. Common breakage is tolerated: ';' between addresses (Outlook), unterminated
quotes or brackets, a bare name without an address, ``Name user@example.com`` without brackets.

Nearly every real value is a list of plain mailboxes (``<a@b>``, ``a@b``, ``Name <a@b>``,
``"Last, First" <a@b>``) or an empty group; one regex reads those with the same result the scan
gives, and anything else (comments, backslashes, other colons, spaces inside an address, text
after the '>') goes to the scan.
"""

from __future__ import annotations

import re

from filterd.mime_headers import decode_words

_SPECIAL_RE = re.compile(r'[",:;<()\\]')
_QUOTED_RE = re.compile(r'(?>(?:(?>[^"\\]+)|\\.?)*)"?', re.S)
_COMMENT_STEP_RE = re.compile(r"[()\\]")
_SPACES_RE = re.compile(r"\s+")
_ESCAPE_RE = re.compile(r"\\(.)", re.S)
# A word of an address as written: a run of text without whitespace, where a quoted string
# (its spaces included) counts as text, so that ``"john doe"@example.com`` is one word.
_WORD_RE = re.compile(r'(?:"(?>(?:[^"\\]+|\\.)*)"?|[^\s"])+', re.S)
_MAX_ADDRESSES = 1000

# One element of an address list in a shape whose reading by the scan below is plain, up to and
# including the separator after it: a display name of text and quoted strings without
# backslashes, then an angle address; or a bare addr-spec; or an empty group; or nothing. The
# classes leave out every character the scan treats specially (and whitespace in addresses,
# which it removes), so the name text is exactly what the scan collects and the address is
# taken as written. Atomic groups keep each attempt linear in the element's length.
_COMMON_ELEMENT_RE = re.compile(
    r'(?:((?>(?:(?>[^",:;<()\\]+)|"[^"\\]*")*))<([^\s<>",:;()\\]+)>'
    r'|(?>\s*)((?>[^\s<>",:;()\\@]*)@(?>[^\s<>",:;()\\]*))'
    r'|(?>[^",:;<()\\@]*):(?>\s*);'
    r")?(?>\s*)(?:[,;]|\Z)"
)

Mailbox = tuple[str, str]  # (display name decoded, address as written)


class _Element:
    """The pieces of one mailbox between separators."""

    __slots__ = (
        "after",
        "after_raw",
        "angle",
        "comments",
        "has_at",
        "phrase",
        "raw",
        "raw_checked",
    )

    def __init__(self) -> None:
        self.phrase: list[str] = []  # text before any angle address, quotes removed
        self.raw: list[str] = []  # the same text as written (quotes kept), for bare addr-specs
        self.angle: str | None = None
        self.comments: list[str] = []
        self.has_at = False  # whether a piece of ``raw`` holds an "@" (see _has_at)
        self.raw_checked = 0  # how many pieces of ``raw`` _has_at has looked at
        # Text after the angle address (unquoted, and as written): the display name of a next
        # angle address that comes with no separator before it (see _parse_general).
        self.after: list[str] = []
        self.after_raw: list[str] = []

    def mailboxes(self) -> list[Mailbox]:
        """The element's mailbox (none for an empty element). Bare addresses with only spaces
        between them ("a@x.example b@y.example", no comma) are one mailbox each, so that none
        hides behind another."""
        comment = _SPACES_RE.sub(" ", " ".join(self.comments)).strip()
        if self.angle is not None:
            address = self.angle.strip()
            if address.startswith("@") and ":" in address:
                address = address.rpartition(":")[2]  # obsolete source route: @a,@b:user@c
            name = _clean_name("".join(self.phrase)) or _clean_name(comment)
            return [(name, _without_spaces(address))]
        written = "".join(self.raw)
        words = _WORD_RE.findall(written)
        if not words:
            return [(_clean_name(comment), "")] if comment else []
        if "@" not in written:
            # No address at all: keep the text as a name so name rules still see it.
            return [(_clean_name("".join(self.phrase)), "")]
        if len(words) > 1:
            if all(0 < word.find("@") < len(word) - 1 for word in words):
                name = _clean_name(comment)
                return [(name, word) for word in words]
            if "@" in words[-1]:
                # "Name user@example.com" without brackets; or "user @ example.com" (obsolete
                # spacing)
                if "@" in words[0] or words[-1].startswith("@"):
                    return [(_clean_name(comment), "".join(words))]
                return [(_clean_name(" ".join(words[:-1]).replace('"', "")), words[-1])]
        return [(_clean_name(comment), "".join(words))]


def _without_spaces(address: str) -> str:
    """``address`` without the whitespace around its parts (``user @ example.com``, folding),
    keeping what a quoted local part holds (``"john doe"@example.com``)."""
    if '"' in address:
        return "".join(_WORD_RE.findall(address))
    return _SPACES_RE.sub("", address)


def _clean_name(text: str) -> str:
    # str.split() cuts at the characters \s matches, and is several times faster than
    # _SPACES_RE.sub(" ", ...).strip(), which gives the same.
    return " ".join(decode_words(text).split())


def _skip_comment(value: str, pos: int, out: list[str]) -> int:
    """Scan a (possibly nested, possibly unterminated) comment whose '(' is at ``pos - 1``."""
    depth = 1
    begin = pos
    while depth:
        step = _COMMENT_STEP_RE.search(value, pos)
        if step is None:
            out.append(value[begin:])
            return len(value)
        char = step.group()
        pos = step.end()
        if char == "\\":
            pos += 1
        elif char == "(":
            depth += 1
        else:
            depth -= 1
    out.append(_ESCAPE_RE.sub(r"\1", value[begin : pos - 1]))
    return pos


def parse_address_list(value: str) -> list[Mailbox]:
    """Every mailbox in an address-list header value (undecoded), in order."""
    common = _parse_common(value)
    return _parse_general(value) if common is None else common


def _parse_common(value: str) -> list[Mailbox] | None:
    """The mailboxes of a value made only of common elements (see _COMMON_ELEMENT_RE), or
    None for the general scan to read it."""
    result: list[Mailbox] = []
    pos = 0
    length = len(value)
    match_element = _COMMON_ELEMENT_RE.match
    while True:
        element = match_element(value, pos)
        if element is None:
            return None
        phrase, angle, bare = element.groups()
        if angle is not None:
            # Quoted strings here hold no backslash, so dropping the quotes unquotes them.
            result.append((_clean_name(phrase.replace('"', "")) if phrase else "", angle))
        elif bare is not None:
            result.append(("", bare))
        pos = element.end()
        if pos >= length or len(result) == _MAX_ADDRESSES:
            return result


def _parse_general(value: str) -> list[Mailbox]:
    """Every mailbox in ``value``, by the full scan that reads any shape."""
    result: list[Mailbox] = []
    element = _Element()
    in_group = False
    pos = 0
    length = len(value)

    def finish() -> None:
        nonlocal element
        for mailbox in element.mailboxes():
            if (mailbox[0] or mailbox[1]) and len(result) < _MAX_ADDRESSES:
                result.append(mailbox)
        element = _Element()

    while pos < length and len(result) < _MAX_ADDRESSES:
        special = _SPECIAL_RE.search(value, pos)
        end = special.start() if special else length
        if end > pos:
            if element.angle is None:
                element.phrase.append(value[pos:end])
                element.raw.append(value[pos:end])
            else:
                element.after.append(value[pos:end])
                element.after_raw.append(value[pos:end])
        if special is None:
            break
        char = special.group()
        pos = special.end()
        if char == '"':
            quoted = _QUOTED_RE.match(value, pos)
            stop = quoted.end() if quoted else length
            inner = value[pos:stop]
            if not inner.endswith('"') or (inner.endswith('\\"') and _odd_escape(inner)):
                continue  # an unterminated quote: read on as if the '"' were not there
            unquoted = _ESCAPE_RE.sub(r"\1", inner.removesuffix('"'))
            if element.angle is None:
                element.raw.append('"' + inner)
                element.phrase.append(unquoted)
            else:
                element.after_raw.append('"' + inner)
                element.after.append(unquoted)
            pos = stop
        elif char == "(":
            pos = _skip_comment(value, pos, element.comments)
        elif char == "<":
            close = value.find(">", pos)
            stop = length if close < 0 else close
            if element.angle is not None:
                # A second angle address with no separator before it ("<a@bank> <b@evil>"): a
                # mailbox of its own, with the text between the two as its display name, so
                # that rules on the addresses and names see it too.
                name, name_raw = element.after, element.after_raw
                finish()
                element.phrase, element.raw = name, name_raw
            element.angle = value[pos:stop]
            pos = stop + 1
        elif char == "\\":
            if element.angle is None:
                element.phrase.append(value[pos : pos + 1])
                element.raw.append(value[pos - 1 : pos + 1])
            pos += 1
        elif char == ":" and not in_group and element.angle is None and not _has_at(element):
            in_group = True  # the group's display name is not a mailbox
            element = _Element()
        elif char == ":":
            if element.angle is None:
                element.phrase.append(":")
                element.raw.append(":")
        else:  # ',' or ';'
            finish()
            if char == ";":
                in_group = False
    finish()
    return result


def _has_at(element: _Element) -> bool:
    """Whether the element's text so far holds an "@". Asked at every ':', so each piece is
    looked at once: rescanning them all each time made a header of many pieces and many
    colons quadratic (seconds for a few tens of KB)."""
    if not element.has_at:
        raw = element.raw
        element.has_at = any("@" in piece for piece in raw[element.raw_checked :])
        element.raw_checked = len(raw)
    return element.has_at


def _odd_escape(inner: str) -> bool:
    """Whether the final '"' of ``inner`` is escaped (an odd run of backslashes before it)."""
    run = len(inner) - 1 - len(inner[:-1].rstrip("\\"))
    return run % 2 == 1
