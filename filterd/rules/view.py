"""The per-message side of the rule engine: field values and multi-pattern hits, both lazy.

A *field* is one string a matcher looks at (``sender``, ``from.name``, ``header:subject``,
``body``, ``url.domain``, ``attachment.filename`` ...). Fields belong to an item *group*: the
fields of one group are parallel lists (item ``i`` of ``from``, ``from.domain`` and
``from.name`` describe the same address), so a condition with several keys can require them
to hold on the same item. Nothing is parsed or scanned until a rule asks for it: a rule set
that only looks at the envelope never parses the message, one that never looks at the body
never decodes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from filterd.mime import MAX_URLS, Address, ArchiveMember, Attachment, ParsedMessage, Url
from filterd.model import Message

if TYPE_CHECKING:
    from filterd.rules.matchers import FieldScanner

MAX_ITEMS = 1000  # per group: bounds per-message work on mail with absurd numbers of items
# Groups the parser bounds itself are not cut again at MAX_ITEMS, which would hide what comes
# after: a deceptive link behind 1,000 harmless ones, a script in a second zip behind a first
# zip of 1,000 photos. URLs stop at mime.MAX_URLS; zip members at mime.MAX_ARCHIVE_MEMBERS per
# archive and archives at the MIME part limit, so the work their names cost stays linear in
# the size of the message.
_LIMITS: dict[str, int | None] = {"url": MAX_URLS, "archive": None}


def envelope_domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


def group_of(field: str) -> str:
    """The item group of a field: ``from.name`` -> ``from``; header fields are their own group."""
    if field.startswith("header:"):
        return field
    return field.partition(".")[0]


Value = str | bytes


class MessageScan:
    """Everything the conditions of one evaluation read, computed on first use and cached."""

    __slots__ = (
        "_archive_index",
        "_encoded",
        "_hits",
        "_items",
        "_max_scan",
        "_parsed",
        "_scanners",
        "_values",
        "message",
        "quote",
    )

    def __init__(
        self, message: Message, scanners: Mapping[str, FieldScanner], max_scan_bytes: int
    ) -> None:
        self.message = message
        self._scanners = scanners
        self._max_scan = max_scan_bytes
        self._parsed: ParsedMessage | None = None
        self._items: dict[str, Sequence[object]] = {}
        self._values: dict[str, Sequence[Value]] = {}
        self._encoded: dict[str, list[bytes]] = {}
        self._hits: dict[str, list[frozenset[int]]] = {}
        self._archive_index: tuple[list[ArchiveMember], list[tuple[int, int]]] | None = None
        # Whether pattern matches quote the text they matched (a second regex search per
        # matched pattern): off while deciding, on when the trace is built.
        self.quote = False

    @property
    def parsed(self) -> ParsedMessage:
        if self._parsed is None:
            # A spooled message is parsed whole when it was read back for its rules: every part
            # counts, not only those in the first bytes.
            message = self.message
            source = message.raw if message.whole is None else message.whole
            self._parsed = ParsedMessage(source, max_text_bytes=self._max_scan)
        return self._parsed

    # -- items and values -------------------------------------------------------------------

    def items(self, group: str) -> Sequence[object]:
        cached = self._items.get(group)
        if cached is None:
            cached = self._load_items(group)[: _LIMITS.get(group, MAX_ITEMS)]
            self._items[group] = cached
        return cached

    def count(self, group: str) -> int:
        return len(self.items(group))

    def _load_items(self, group: str) -> Sequence[object]:
        envelope = self.message.envelope
        if group == "sender":
            return [envelope.sender]
        if group == "recipient":
            return list(envelope.recipients)
        if group == "helo":
            return [] if envelope.helo is None else [envelope.helo]
        if group in ("from", "to"):
            return self.parsed.addresses(group)
        if group.startswith("header:"):
            return self.parsed.header_values(group[len("header:") :])
        if group == "body":
            # Without trailing line breaks, so that "$" means the end of the text as it
            # would in Python (RE2's "$" does not match before a final newline). Each text
            # part is already cut at max_scan_bytes (ParsedMessage's max_text_bytes): cutting
            # the parts joined would let a long harmless first part hide the ones after it.
            return [self.parsed.body_text.rstrip("\r\n")]
        if group == "raw":
            return [self.message.raw[: self._max_scan]]
        if group == "url":
            return self.parsed.urls
        if group == "attachment":
            return self.parsed.attachments
        if group == "archive":
            return self._archive()[0]
        raise KeyError(group)

    def values(self, field: str) -> Sequence[Value]:
        cached = self._values.get(field)
        if cached is None:
            group = group_of(field)
            project = _PROJECTIONS.get(field)
            items = self.items(group)
            # Unprojected groups (sender, helo, header:*, body, raw) hold their values as items.
            values: Sequence[Value] = (
                items
                if project is None  # type: ignore[assignment]
                else [project(item) for item in items]
            )
            self._values[field] = values
            return values
        return cached

    def encoded(self, field: str) -> list[bytes]:
        """The field's values as UTF-8, which RE2 reads natively.

        Encoding once per message serves the field's Set scan and every quote of a match; RE2's
        Python wrapper would otherwise re-encode a str per call and map byte offsets back to
        characters, which costs more than the scan itself on a large body.
        """
        cached = self._encoded.get(field)
        if cached is None:
            cached = [
                value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
                for value in self.values(field)
            ]
            self._encoded[field] = cached
        return cached

    # -- multi-pattern hits -----------------------------------------------------------------

    def hits(self, field: str) -> list[frozenset[int]]:
        """Per item of the field, the indices of the field's patterns found in it."""
        cached = self._hits.get(field)
        if cached is None:
            scanner = self._scanners[field]
            cached = [scanner.scan(value) for value in self.encoded(field)]
            self._hits[field] = cached
        return cached

    def fired(self, field: str) -> set[int]:
        """Indices of the field's patterns found in any of its items."""
        out: set[int] = set()
        for found in self.hits(field):
            out.update(found)
        return out

    # -- archives ---------------------------------------------------------------------------

    def _archive(self) -> tuple[list[ArchiveMember], list[tuple[int, int]]]:
        if self._archive_index is None:
            members: list[ArchiveMember] = []
            ranges: list[tuple[int, int]] = []
            for attachment in self.items("attachment"):
                start = len(members)
                if isinstance(attachment, Attachment):
                    members.extend(attachment.archive_members)
                ranges.append((start, len(members)))
            self._archive_index = (members, ranges)
        return self._archive_index

    def archive_range(self, attachment_index: int) -> range:
        """Indices into the ``archive`` group of the members of one attachment."""
        start, end = self._archive()[1][attachment_index]
        return range(start, end)


def _address(item: object) -> str:
    return item.address if isinstance(item, Address) else str(item)


def _domain(item: object) -> str:
    return item.domain if isinstance(item, Address) else envelope_domain(str(item))


def _name(item: object) -> str:
    return item.name if isinstance(item, Address) else ""


def _url(item: object) -> str:
    return item.url if isinstance(item, Url) else ""


def _url_domain(item: object) -> str:
    return item.domain if isinstance(item, Url) else ""


def _link_text(item: object) -> str:
    return (item.link_text or "") if isinstance(item, Url) else ""


def _attachment(attr: str) -> Callable[[object], str]:
    def project(item: object) -> str:
        return str(getattr(item, attr)) if isinstance(item, Attachment) else ""

    return project


def _member_name(item: object) -> str:
    return item.filename if isinstance(item, ArchiveMember) else ""


_PROJECTIONS: dict[str, Callable[[object], str]] = {
    "sender.domain": _domain,
    "recipient.domain": _domain,
    "from": _address,
    "from.domain": _domain,
    "from.name": _name,
    "to": _address,
    "to.domain": _domain,
    "to.name": _name,
    "url": _url,
    "url.domain": _url_domain,
    "url.link_text": _link_text,
    "attachment.filename": _attachment("filename"),
    "attachment.content_type": _attachment("content_type"),
    "attachment.detected_type": _attachment("detected_type"),
    "archive.filename": _member_name,
}
