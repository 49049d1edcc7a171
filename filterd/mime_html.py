"""HTML to visible text, links with their visible text, bare URLs in text, and URL hosts.

The HTML scanner is hand-written rather than ``html.parser``: one C-level split rewrites plain
tags, then a single forward pass of regex searches with atomic groups handles links,
hidden blocks and comments, so hostile markup (unterminated comments, quotes or tags) costs
linear time, and only the few tags that carry links have their attributes read. Script, style
and similar invisible blocks are dropped; block elements become line breaks; character
references are decoded; zero-width characters that spammers use to split words are removed.

Work per character or per tag is kept in C (``re``, ``str`` methods, ``map``) wherever the
result is provably the same as the straightforward Python: markup whose only remaining tags
are <a> and </a> skips the token loop, texts are collapsed in whole-text passes, and bare
URLs are looked for only where "://" or "www." occurs, and not at all in text that holds
neither.
"""

from __future__ import annotations

import functools
import html
import re
from itertools import compress, repeat
from operator import not_
from urllib.parse import unquote

from filterd.mime_headers import without_surrogates

# One token at a '<': a tag (closing slash, name, attributes up to an optional '>'; quotes only
# matter after '=', as in the HTML tokenizer), a comment opener, or another markup declaration.
_TOKEN_RE = re.compile(
    r"""<(?:(/?)([a-zA-Z](?>[^\s/>]*))((?>(?:(?>[^>"'=]+)|=(?>\s*)"(?>[^"]*)"?|=(?>\s*)'(?>[^']*)'?|=|["'])*))(>?)"""
    r"""|(!--)|[!?])"""
)
# What ``_attribute(attrs, "href")`` reads when href, quoted, is the first attribute.
_SIMPLE_HREF_RE = re.compile(
    r"""(?>[\s/]*)[hH][rR][eE][fF](?>\s*)=(?>\s*)(?:"((?>[^"]*))"|'((?>[^']*))')"""
)
_ATTR_RE = re.compile(
    r"""((?>[^\s"'>/=]+))"""
    r"""(?:(?>\s*)=(?>\s*)(?:"((?>[^"]*))"?|'((?>[^']*))'?|((?>[^\s>]*))))?"""
)
_BREAK = "\ue000"  # a private-use character marking a line break while text is assembled
_EDGE = "\ue001"  # marks where a link starts or ends: no bare URL is read across it

_BLOCK, _CELL, _HIDDEN, _LINK = range(4)
_BLOCK_NAMES = (
    "address article aside blockquote br center dd div dl dt fieldset figure footer form h1 h2 "
    "h3 h4 h5 h6 header hr li main nav ol option p pre section table tbody tfoot thead tr ul"
)
_TAG_KINDS = dict.fromkeys(_BLOCK_NAMES.split(" "), _BLOCK)
_TAG_KINDS.update(td=_CELL, th=_CELL)
# Never displayed. When the closing tag is missing the opening tag is ignored instead of hiding
# the rest, so an unclosed <title> cannot blank out the text rules look at.
_TAG_KINDS.update(dict.fromkeys(("script", "style", "template", "title", "xml"), _HIDDEN))
# Tag -> attribute holding a URL worth reporting (only <a> has visible link text).
_LINK_ATTRS = {"a": "href", "area": "href", "form": "action", "img": "src", "iframe": "src"}
_TAG_KINDS.update(dict.fromkeys(("a", "area", "img", "iframe"), _LINK))
# The fast path: plain tags (no '<' inside) are rewritten from one C-level split before the
# token loop, which then only sees links, hidden blocks, comments and odd markup. "[^<>]*+"
# keeps this linear: a failed attempt stops at the next '<', where the next attempt begins.
# Quoted values may hold '>' but not '<'; a tag with an unbalanced quote is left to the loop.
# Whether a '<' starts a plain tag depends only on the text up to its '>', so each tag is
# judged on its own. Tags the loop must see (links, hidden blocks, and <form>, a block that
# carries a URL) are excluded by name in the pattern itself, so the split's names map to their
# replacements through C-level ``map`` with no per-tag Python. The names are spelled with
# explicit ASCII case classes: ``name.lower()`` is the comparison, and re.IGNORECASE would also
# fold characters such as U+0130 or U+017F that ``str.lower`` does not turn into these names.
_LOOP_TAGS = ("a", "area", "form", "iframe", "img", "script", "style", "template", "title", "xml")
_LOOP_NAME = "|".join("".join(f"[{c}{c.upper()}]" for c in name) for name in _LOOP_TAGS)
_PLAIN_TAG_RE = re.compile(
    rf"""</?(?!(?:{_LOOP_NAME})(?![^\s/<>]))([a-zA-Z](?>[^\s/<>]*))"""
    r"""(?>(?:(?>[^<>"']+)|"(?>[^"<]*)"|'(?>[^'<]*)')*)>"""
)
# What a plain tag becomes; not listed: removed.
_PLAIN_REPLACEMENT = {
    name: _BREAK if kind == _BLOCK else " "
    for name, kind in _TAG_KINDS.items()
    if kind in (_BLOCK, _CELL) and name not in _LOOP_TAGS
}
_SKIPPED_SCHEMES = ("mailto:", "cid:", "tel:", "sms:", "callto:", "#")
_CLOSERS = {
    name: re.compile(rf"</{name}[\s/>]", re.I)
    for name, kind in _TAG_KINDS.items()
    if kind == _HIDDEN
}
# Removed from visible text: zero-width characters and soft hyphens that split words.
_INVISIBLE = ("\u00ad", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff")

# No look-behind for a word boundary: checked in Python for the rare hit, it would otherwise
# run at every position of the text.
_URL_PREFIX = r"(?:[hH][tT][tT][pP][sS]?://|[fF][tT][pP]://|[wW][wW][wW]\.)"
_URL_CHAR = r"[^\s<>\"'`\x00-\x1f\x7f]"
_TEXT_URL_RE = re.compile(_URL_PREFIX + "(?>" + _URL_CHAR + "+)")
# Where a match of _TEXT_URL_RE can start (bounded length: no scan to the end of the word).
_URL_START_RE = re.compile(_URL_PREFIX + _URL_CHAR)
# Trying _TEXT_URL_RE at every position costs ~45 ns a character (no literal prefix for re to
# skip ahead with). Every match holds "://" or a "www." whose "." a literal-prefix search finds
# at memchr speed, so the possible starts are found from those and only they are tried.
_WWW_DOT_RE = re.compile(r"\.(?<=[wW][wW][wW]\.)")
_URL_GLUE = frozenset(".-_")
_URL_TRAIL = ".,;:!?'\")]}>*"
# The usual URL, scheme://host/...: ``url_domain`` would take the host as it stands (no
# white space, userinfo, port, brackets or percent-escapes), so the general path is skipped.
_PLAIN_URL_RE = re.compile(
    r"(?:[hH][tT][tT][pP][sS]?|[fF][tT][pP][sS]?|[wW][sS][sS]?)://"
    r"((?>[^/?#\\\s%@\[:]+))(?=[/?#\\]|\Z)"
)
_SCHEME_RE = re.compile(r"[a-zA-Z](?>[a-zA-Z0-9+.-]*):")
_AUTHORITY_RE = re.compile(r"(?>[^/?#\\]*)")
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_HOST_SCHEMES = frozenset({"http", "https", "ftp", "ftps", "ws", "wss"})

Link = tuple[str, str | None]  # (URL as found, visible text for <a>, else None)


def _strip_invisible(text: str) -> str:
    for char in _INVISIBLE:
        if char in text:
            text = text.replace(char, "")
    return text


def _finish_text(raw: str) -> str:
    """Decode references, drop invisible characters, collapse white space (str.split's notion
    includes the no-break space), and turn break markers into single line breaks."""
    text = _strip_invisible(html.unescape(raw) if "&" in raw else raw)
    if _EDGE in text:
        text = text.replace(_EDGE, "")
    return "\n".join(filter(None, _collapse_pieces(text, _BREAK)))


def _collapse_pieces(text: str, separator: str) -> list[str]:
    """``[" ".join(piece.split()) for piece in text.split(separator)]`` by C-level passes over
    the whole text: once white space is collapsed, the spaces next to a separator are exactly
    those that would have been stripped from the ends of the pieces."""
    text = " ".join(text.split())
    return (
        text.replace(" " + separator, separator)
        .replace(separator + " ", separator)
        .split(separator)
    )


def _link_text(raw: str) -> str:
    text = _strip_invisible(html.unescape(raw) if "&" in raw else raw)
    return " ".join(text.replace(_BREAK, " ").replace(_EDGE, "").split())


def _rewrite_plain_tags(markup: str) -> str:
    pieces = _PLAIN_TAG_RE.split(markup)  # text, (name, text)...
    if len(pieces) > 1:
        pieces[1::2] = map(_PLAIN_REPLACEMENT.get, map(str.lower, pieces[1::2]), repeat(""))
    return "".join(pieces)


def render_html(markup: str, max_links: int = 10_000) -> tuple[str, list[Link]]:
    """Visible text of an HTML document, and its links: those of tags in document order (at
    most ``max_links``), then the bare URLs of its visible text (never read across the edge of
    a link)."""
    for marker in (_BREAK, _EDGE):
        if marker in markup:
            markup = markup.replace(marker, "")
    markup = _rewrite_plain_tags(markup)
    fast = _render_anchors_only(markup, max_links)
    if fast is not None:
        text, links = fast
    else:
        text, links = _render_tokens(markup, max_links)
    links.extend((url, None) for url in find_text_urls(text.replace(_EDGE, " ")))
    return _finish_text(text), links


def _render_anchors_only(markup: str, max_links: int) -> tuple[str, list[Link]] | None:
    """``_render_tokens`` at C speed for markup whose only tokens (after the plain tags went)
    are complete <a> and </a> tags, the usual shape of a text-like HTML mail; None for any
    other markup.

    With no comment, hidden block or unterminated tag, nothing makes the token loop jump, so
    its tokens are those of one ``split``; each becomes a link edge, and a link's text is the
    text between its tag and the next one. The count check keeps every <a> under
    ``max_links``, as the loop would see it.
    """
    pieces = _TOKEN_RE.split(markup)  # text, (slash, name, attrs, gt, comment, text)...
    if len(pieces) == 1:
        return markup, []
    names = pieces[2::6]
    if None in names or "" in pieces[4::6] or set(map(str.lower, names)) != {"a"}:
        return None
    slashes = pieces[1::6]
    if slashes.count("") > max_links:
        return None
    texts = pieces[0::6]
    opening = list(map(not_, slashes))
    links = _anchor_links(list(compress(pieces[3::6], opening)), list(compress(texts[1:], opening)))
    return _EDGE.join(texts), links


def _anchor_links(attrs: list[str], shown: list[str]) -> list[Link]:
    """The links of <a> tags with attribute strings ``attrs`` followed by texts ``shown``:
    ``_attribute(attrs, "href")`` and ``_link_text`` of each, by whole-list passes where the
    values allow (an href quoted as the first attribute: the usual case)."""
    if not attrs:
        return []
    found = list(map(_SIMPLE_HREF_RE.match, attrs))
    simple = [m[1] if m[1] is not None else m[2] for m in found if m is not None]
    decoded = _decode_joined(simple) if simple else None
    values = decoded.split(_EDGE) if decoded is not None else []
    if len(values) != len(simple):  # a numeric reference: decode each on its own
        values = [_strip_invisible(html.unescape(v) if "&" in v else v) for v in simple]
    hrefs = iter(map(str.strip, values))
    decoded = _decode_joined(shown)
    texts = [] if decoded is None else _collapse_pieces(decoded.replace(_BREAK, " "), _EDGE)
    if len(texts) != len(shown):
        texts = list(map(_link_text, shown))
    links: list[Link] = []
    for match, attr, text in zip(found, attrs, texts, strict=True):
        url = _attribute(attr, "href") if match is None else _usable_url(next(hrefs))
        if url is not None:
            links.append((url, text))
    return links


def _decode_joined(values: list[str]) -> str | None:
    """The values joined by link edges, character references decoded and invisible
    characters dropped; None when a numeric reference (which could decode to a marker)
    forbids decoding them together. Decoding the joined text gives each value's own result:
    a reference cannot start inside another one, and named ones never decode to a marker."""
    joined = _EDGE.join(values)
    if "&" in joined:
        if "&#" in joined:
            return None
        joined = html.unescape(joined)
    return _strip_invisible(joined)


def _render_tokens(markup: str, max_links: int) -> tuple[str, list[Link]]:
    """Text with break and link-edge markers, and the links of tags, by one forward pass over
    the tokens of ``markup``."""
    out: list[str] = []
    links: list[Link] = []
    open_link: tuple[str, int] | None = None  # (href, index in out where its text starts)
    unclosed: set[str] = set()  # hidden tags whose closing tag does not occur
    pos = 0
    length = len(markup)
    search = _TOKEN_RE.search
    kinds = _TAG_KINDS
    while True:
        token = search(markup, pos)
        if token is None:
            out.append(markup[pos:])
            break
        start = token.start()
        if start > pos:
            out.append(markup[pos:start])
        slash, name, attrs, gt, comment = token.groups()
        if name is None:
            close = markup.find("-->" if comment else ">", token.end())
            if close < 0:
                break  # an unterminated comment or declaration hides the rest, as in a browser
            pos = close + (3 if comment else 1)
            continue
        if not gt:
            break  # a tag still open at the end of input: nothing after it is text
        pos = token.end()
        kind = kinds.get(name.lower())
        if kind is None:
            continue
        if kind == _BLOCK:
            out.append(_BREAK)
            if name.lower() != "form" or slash:
                continue
            kind = _LINK
        elif kind == _CELL:
            out.append(" ")
            continue
        lower = name.lower()
        if slash:
            if lower == "a":
                out.append(_EDGE)
                if open_link is not None:
                    links.append((open_link[0], _link_text("".join(out[open_link[1] :]))))
                    open_link = None
        elif kind == _HIDDEN:
            # A closer missing once is missing for every later opener: search only once.
            closer = None if lower in unclosed else _CLOSERS[lower].search(markup, pos)
            if closer is None:
                unclosed.add(lower)
            else:
                close = markup.find(">", closer.end() - 1)
                pos = length if close < 0 else close + 1
        elif len(links) < max_links:
            url = _attribute(attrs, _LINK_ATTRS[lower])
            if lower == "a":
                out.append(_EDGE)
                if open_link is not None:  # <a> does not nest: a new one closes the old
                    links.append((open_link[0], _link_text("".join(out[open_link[1] :]))))
                    open_link = None
                if url is not None:
                    open_link = (url, len(out))
            elif url is not None and url[:5].lower() != "data:":  # inline images are content
                links.append((url, None))
    if open_link is not None:
        links.append((open_link[0], _link_text("".join(out[open_link[1] :]))))
    return "".join(out), links


def _attribute(attrs: str, wanted: str) -> str | None:
    """The value of attribute ``wanted`` if it holds a URL worth reporting."""
    for match in _ATTR_RE.finditer(attrs):
        if match.group(1).lower() != wanted:
            continue
        value = match.group(2) or match.group(3) or match.group(4) or ""
        return _usable_url(
            _strip_invisible(html.unescape(value) if "&" in value else value).strip()
        )
    return None


def _usable_url(value: str) -> str | None:
    return None if not value or value.lower().startswith(_SKIPPED_SCHEMES) else value


def find_text_urls(text: str) -> list[str]:
    """Bare http(s)/ftp/www. URLs in plain text, trailing punctuation trimmed."""
    if not _may_hold_url(text):
        return []
    return _find_urls_in(text)


def _may_hold_url(text: str) -> bool:
    """False when ``text`` holds no "://" and no "w." or "W.", which every match of
    _TEXT_URL_RE holds; single-character memchr checks answer at once for most texts."""
    if ":" in text and "://" in text:
        return True
    return "." in text and ("w." in text or "W." in text)


def _find_urls_in(text: str) -> list[str]:
    """``find_text_urls`` for any text."""
    urls = []
    for match in _text_url_matches(text):
        start = match.start()
        if start and (text[start - 1].isalnum() or text[start - 1] in _URL_GLUE):
            continue  # inside a word: "xwww.example.com" is not a URL to report
        url = match.group()
        end = len(url)
        if url[-1] in _URL_TRAIL:
            # A closer is kept while it has an opener in the URL (a Wikipedia link's ')').
            unmatched = {c: url.count(c) - url.count(o) for c, o in (")(", "][", "}{")}
            while end and url[end - 1] in _URL_TRAIL:
                closer = url[end - 1]
                if closer in unmatched:
                    if unmatched[closer] <= 0:
                        break
                    unmatched[closer] -= 1
                end -= 1
        if url[:end].rstrip("/:.").lower() not in ("", "http", "https", "ftp", "www"):
            urls.append(url[:end])
    return urls


def _text_url_matches(text: str) -> list[re.Match[str]]:
    """What ``_TEXT_URL_RE.finditer(text)`` yields, found from the few possible starts."""
    # Each possible start costs some Python; where they are dense (hostile or link-list text)
    # the plain scan is cheaper, and the budget keeps the cost at most a fraction above it.
    budget = len(text) // 64 + 16
    mark = text.find("://")
    if mark >= 0 and text.count("://", mark) > budget:
        return list(_TEXT_URL_RE.finditer(text))
    starts: list[int] = []
    at_start = _URL_START_RE.match
    while mark >= 0:
        # https:// http:// ftp:// end in this "://" ("www." starts are found below).
        starts.extend(
            start
            for start in (mark - 5, mark - 4, mark - 3)
            if start >= 0 and at_start(text, start)
        )
        mark = text.find("://", mark + 3)
    for seen, dot in enumerate(_WWW_DOT_RE.finditer(text)):
        if seen > budget:
            return list(_TEXT_URL_RE.finditer(text))
        if at_start(text, dot.start() - 3):
            starts.append(dot.start() - 3)
    matches: list[re.Match[str]] = []
    end = 0
    # Like finditer: the next match is the first possible start at or after the last match's
    # end, and it runs to the end of its word (so every character is matched at most once).
    for start in sorted(starts):
        if start >= end:
            match = _TEXT_URL_RE.match(text, start)
            if match is not None:
                matches.append(match)
                end = match.end()
    return matches


def url_domain(url: str) -> str:
    """The lower-cased host of a URL: no scheme, userinfo or port; IDNA labels decoded.

    Browsers' leniency is followed where phishers use it: backslashes and extra slashes after
    the scheme, the last '@' ending the userinfo, percent-encoded and full-width-dot hosts.
    """
    plain = _PLAIN_URL_RE.match(url)
    if plain is not None:
        return _normal_host(plain.group(1))
    rest = url.strip()
    scheme = _SCHEME_RE.match(rest)
    if scheme is not None and not rest.lower().startswith("www."):
        if scheme.group()[:-1].lower() not in _HOST_SCHEMES and not rest.startswith(
            "//", scheme.end()
        ):
            return ""
        rest = rest[scheme.end() :].lstrip("/\\")
    elif rest.startswith("//"):
        rest = rest[2:]
    elif not rest.lower().startswith("www."):
        return ""
    authority = _AUTHORITY_RE.match(rest)
    host = authority.group() if authority else ""
    host = host.rpartition("@")[2]
    if "%" in host:
        host = unquote(host, errors="replace")
    if host.startswith("["):
        close = host.find("]")
        host = host[1:] if close < 0 else host[1:close]
    else:
        host = host.partition(":")[0]
    return _normal_host(host)


@functools.lru_cache(maxsize=4096)
def _normal_host(host: str) -> str:
    """A host as written (no userinfo, port or brackets) lower-cased, IDNA labels decoded."""
    host = host.translate(_DOTS).lower().strip(".")
    if "xn--" in host:
        host = ".".join(_idna_label(label) for label in host.split("."))
    return host


def _idna_label(label: str) -> str:
    if not label.startswith("xn--") or len(label) > 63:
        return label
    try:
        # Punycode directly, not the IDNA 2003 codec, whose nameprep changes what users see
        # (final sigma); labels are at most 63 characters, so the decoder's cost is bounded.
        decoded = label[4:].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):
        return label
    # Punycode can decode to a lone surrogate ("xn--ib9b"), which no text output can encode.
    return without_surrogates(decoded).lower() if decoded else label
