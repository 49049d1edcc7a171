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
from collections.abc import Set as AbstractSet
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
            load = _LOADERS.get(group)
            loaded: Sequence[object]
            if load is not None:
                loaded = load(self)
            elif group.startswith("header:"):
                loaded = self.parsed.header_values(group[len("header:") :])
            else:
                raise KeyError(group)
            cached = loaded[: _LIMITS.get(group, MAX_ITEMS)]
            self._items[group] = cached
        return cached

    def count(self, group: str) -> int:
        return len(self.items(group))

    # The loaders of the named groups (header:* groups are read by name, see ``items``).

    def _sender(self) -> Sequence[object]:
        return [self.message.envelope.sender]

    def _recipients(self) -> Sequence[object]:
        return list(self.message.envelope.recipients)

    def _helo(self) -> Sequence[object]:
        helo = self.message.envelope.helo
        return [] if helo is None else [helo]

    def _from(self) -> Sequence[object]:
        return self.parsed.addresses("from")

    def _to(self) -> Sequence[object]:
        return self.parsed.addresses("to")

    def _body(self) -> Sequence[object]:
        # Without trailing line breaks, so that "$" means the end of the text as it would in
        # Python (RE2's "$" does not match before a final newline). Each text part is already
        # cut at max_scan_bytes (ParsedMessage's max_text_bytes): cutting the parts joined
        # would let a long harmless first part hide the ones after it.
        return [self.parsed.body_text.rstrip("\r\n")]

    def _raw(self) -> Sequence[object]:
        return [self.message.raw[: self._max_scan]]

    def _urls(self) -> Sequence[object]:
        return self.parsed.urls

    def _attachments(self) -> Sequence[object]:
        return self.parsed.attachments

    def _archive_members(self) -> Sequence[object]:
        return self._archive()[0]

    def values(self, field: str) -> Sequence[Value]:
        cached = self._values.get(field)
        if cached is None:
            group, project = _FIELD_PLANS.get(field) or _plan(field)
            items = self.items(group)
            # Unprojected groups (sender, helo, header:*, body, raw) hold their values as items.
            values: Sequence[Value] = (
                items  # type: ignore[assignment]
                if project is None
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

    def fired(self, field: str) -> AbstractSet[int]:
        """Indices of the field's patterns found in any of its items."""
        hits = self.hits(field)
        if len(hits) == 1:
            return hits[0]  # one item (the body, a subject): its hits are the answer
        out: set[int] = set()
        for found in hits:
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


_LOADERS: dict[str, Callable[[MessageScan], Sequence[object]]] = {
    "sender": MessageScan._sender,
    "recipient": MessageScan._recipients,
    "helo": MessageScan._helo,
    "from": MessageScan._from,
    "to": MessageScan._to,
    "body": MessageScan._body,
    "raw": MessageScan._raw,
    "url": MessageScan._urls,
    "attachment": MessageScan._attachments,
    "archive": MessageScan._archive_members,
}

# field -> (its group, the projection of an item to the field's value or None): worked out
# once per field name, not on every message. Field names come from loaded rule sets, so this
# stays as small as the fields the rules name.
_FIELD_PLANS: dict[str, tuple[str, Callable[[object], str] | None]] = {}


def _plan(field: str) -> tuple[str, Callable[[object], str] | None]:
    plan = _FIELD_PLANS[field] = (group_of(field), _PROJECTIONS.get(field))
    return plan
