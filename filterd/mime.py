"""Lazy content parsing of one message for the rule pipeline: headers, addresses, body text,
URLs and attachments.

``ParsedMessage`` computes each view on first use (``computed_once``), so a rule set
that looks only at headers never walks the MIME tree, and a body never gets decoded twice. It
never raises on any input bytes and bounds its work on hostile input (``max_depth``,
``max_parts``, ``max_text_bytes``, at most ``MAX_ARCHIVE_MEMBERS`` zip names and ``MAX_URLS``
URLs); ``truncated`` tells whether a limit cut the MIME walk short, ``truncated_by`` which.

The pieces live in helpers: ``mime_headers`` (header section, RFC 2047/2231, charsets),
``mime_address`` (address lists), ``mime_parts`` (MIME tree walk, transfer decoding),
``mime_html`` (HTML to text, links, URL hosts), ``mime_filetype`` (magic bytes, zip listing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from filterd.mime_address import parse_address_list
from filterd.mime_filetype import detect_type, list_zip_members
from filterd.mime_headers import (
    HeaderField,
    decode_text,
    decode_text_lf,
    decode_words,
    split_section,
)
from filterd.mime_html import find_text_urls, render_html, url_domain
from filterd.mime_parts import Leaf, Structure, decode_body, walk

MAX_ARCHIVE_MEMBERS = 1000
MAX_URLS = 10_000
_BODY_TYPES = frozenset({"text/plain", "text/html"})

_T = TypeVar("_T")


class computed_once(Generic[_T]):
    """``functools.cached_property`` without its lock.

    On Python 3.11 every first access takes an RLock shared by all instances of the class
    (3.12 dropped it): a measurable part of evaluating a small message, whose views are each
    read once. A ParsedMessage belongs to one evaluation; two threads computing the same view
    at once would only compute it twice.
    """

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> computed_once[_T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...
    def __get__(self, instance: object | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        # A non-data descriptor: once the value is in the instance's __dict__, attribute
        # lookups find it there and never come back here.
        value = instance.__dict__[self.name] = self.func(instance)
        return value


@dataclass(frozen=True)
class Address:
    """One mailbox from From/To/Cc/Reply-To/Sender."""

    name: str  # display name, RFC 2047 decoded ('' if none)
    address: str  # 'user@example.com' as written ('' if there is none)
    domain: str  # lower-cased part after the last '@' ('' if none)


@dataclass(frozen=True)
class Url:
    """A URL found in a text part or an HTML attribute."""

    url: str  # as found (href, or a bare http(s)/ftp/www. URL in text)
    domain: str  # lower-cased host, no port/userinfo, IDNA-decoded where possible
    link_text: str | None  # for an HTML <a>, its visible text (whitespace-collapsed), else None


@dataclass(frozen=True)
class ArchiveMember:
    """One entry of a zip attachment's central directory."""

    filename: str
    size: int  # uncompressed size as declared


@dataclass(frozen=True)
class Attachment:
    """A leaf part that is not an inline text/plain or text/html body part."""

    filename: str  # RFC 2231 / RFC 2047 decoded; Content-Type name= counts; '' if none
    content_type: str  # declared (or defaulted), lower-cased 'type/subtype'
    detected_type: str  # from magic bytes; 'application/octet-stream' when unknown
    size: int  # decoded size in bytes
    archive_members: tuple[ArchiveMember, ...]  # zip members (central directory only)


class ParsedMessage:
    """The parsed views of one raw message (as received over SMTP, CRLF or bare LF)."""

    def __init__(
        self,
        raw: bytes,
        *,
        max_text_bytes: int = 1_048_576,
        max_parts: int = 500,
        max_depth: int = 30,
    ) -> None:
        self.raw = bytes(raw)
        self.max_text_bytes = max(0, max_text_bytes)
        self.max_parts = max(1, max_parts)
        self.max_depth = max(0, max_depth)
        self._address_cache: dict[str, list[Address]] = {}

    # -- headers -------------------------------------------------------------------------------

    @computed_once
    def _section(self) -> tuple[tuple[HeaderField, ...], int, int]:
        fields, header_end, body_start = split_section(self.raw, 0, len(self.raw))
        return tuple(fields), header_end, body_start

    @computed_once
    def header_block(self) -> bytes:
        """Raw bytes of the header section, up to (not including) the blank line."""
        return self.raw[: self._section[1]]

    @computed_once
    def body_bytes(self) -> bytes:
        """Raw bytes after the blank line (the whole rest when there is no blank line)."""
        return self.raw[self._section[2] :]

    @computed_once
    def headers(self) -> tuple[tuple[str, str], ...]:
        """(name as written, value unfolded and RFC 2047 decoded), in order."""
        return tuple((name, decode_words(value)) for name, value in self._section[0])

    @computed_once
    def _index(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for position, (name, _) in enumerate(self._section[0]):
            index.setdefault(name.lower(), []).append(position)
        return index

    def header_values(self, name: str) -> list[str]:
        """Decoded values of every header called ``name`` (case-insensitive), in order."""
        headers = self.headers
        return [headers[i][1] for i in self._index.get(name.lower(), ())]

    def header_names_lower(self) -> frozenset[str]:
        """The lower-cased names of all headers present (for ``exists`` checks)."""
        return self._names_lower

    @computed_once
    def _names_lower(self) -> frozenset[str]:
        return frozenset(self._index)

    def addresses(self, header_name: str) -> list[Address]:
        """The mailboxes of every header called ``header_name``, in order."""
        key = header_name.lower()
        cached = self._address_cache.get(key)
        if cached is None:
            cached = []
            for i in self._index.get(key, ()):
                for name, address in parse_address_list(self._section[0][i][1]):
                    domain = address.rpartition("@")[2].lower() if "@" in address else ""
                    cached.append(Address(name, address, domain))
            self._address_cache[key] = cached
        return list(cached)

    @computed_once
    def message_id(self) -> str:
        """The first Message-ID header value, or ''."""
        values = self.header_values("message-id")
        return values[0].strip() if values else ""

    @computed_once
    def subject(self) -> str:
        """The first Subject header, decoded, or ''."""
        values = self.header_values("subject")
        return values[0] if values else ""

    # -- body ----------------------------------------------------------------------------------

    @computed_once
    def _structure(self) -> Structure:
        fields, _, body_start = self._section
        return walk(
            self.raw, list(fields), body_start, max_parts=self.max_parts, max_depth=self.max_depth
        )

    @computed_once
    def truncated(self) -> bool:
        """Whether ``max_parts`` or ``max_depth`` cut the MIME walk short (a sign of abuse)."""
        return self._structure.truncated

    @computed_once
    def truncated_by(self) -> frozenset[str]:
        """Which limits cut the MIME walk short: ``"parts"`` (``max_parts``), ``"depth"``
        (``max_depth``); empty when the whole structure was walked."""
        return self._structure.cut_by

    @computed_once
    def _text_parts(self) -> tuple[tuple[str, tuple[tuple[str, str | None], ...]], ...]:
        """(decoded text, links as (url, link text or None)) of every text/* leaf."""
        parts = []
        for leaf in self._structure.leaves:
            if leaf.container or not leaf.content_type.startswith("text/"):
                continue
            data = decode_body(leaf, self.max_text_bytes)
            if leaf.content_type == "text/html":
                text, links = render_html(decode_text(data, leaf.charset))
            else:
                text = decode_text_lf(data, leaf.charset)
                links = [(url, None) for url in find_text_urls(text)]
            parts.append((text, tuple(links)))
        return tuple(parts)

    @computed_once
    def body_text(self) -> str:
        """Decoded text of all text/* parts, HTML rendered to text, joined by newlines."""
        return "\n".join(text for text, _ in self._text_parts if text)

    @computed_once
    def urls(self) -> tuple[Url, ...]:
        """URLs of all text parts and HTML links, deduplicated, in order of appearance."""
        return self._collect_urls(MAX_URLS)

    def _collect_urls(self, limit: int) -> tuple[Url, ...]:
        found: dict[tuple[str, str | None], Url] = {}
        if limit <= 0:
            return ()
        domains: dict[str, str] = {}
        for _, links in self._text_parts:
            for link in links:
                if link in found:
                    continue
                url = link[0]
                domain = domains.get(url)
                if domain is None:
                    domain = domains[url] = url_domain(url)
                found[link] = Url(url, domain, link[1])
                if len(found) >= limit:
                    return tuple(found.values())
        return tuple(found.values())

    @computed_once
    def attachments(self) -> tuple[Attachment, ...]:
        """Every leaf that is not an inline text/plain or text/html body part."""
        return tuple(_attachment(leaf) for leaf in self._structure.leaves if _is_attachment(leaf))


def _is_attachment(leaf: Leaf) -> bool:
    return (
        leaf.content_type not in _BODY_TYPES
        or bool(leaf.filename)
        or leaf.disposition == "attachment"
    )


def _attachment(leaf: Leaf) -> Attachment:
    data = decode_body(leaf)
    detected = detect_type(data)
    members: tuple[ArchiveMember, ...] = ()
    if detected == "application/zip":
        members = tuple(
            ArchiveMember(name, size) for name, size in list_zip_members(data, MAX_ARCHIVE_MEMBERS)
        )
    return Attachment(leaf.filename, leaf.content_type, detected, len(data), members)
