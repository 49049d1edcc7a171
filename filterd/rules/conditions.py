"""Compiled conditions: the predicate tree a rule's ``if:`` becomes at load.

Each node answers ``eval(scan)`` with a short description of what matched (the trace's
``detail``) or None. Each node also states its *atoms*: multi-pattern hits of which at least
one must be present for the node to hold (None when no such guarantee exists, e.g. under
``not:``). The pipeline uses atoms to evaluate only the rules whose patterns fired, so the
Python work per message follows the rules that match, not the size of the rule set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import re2

from filterd.mime import Address, ArchiveMember, Attachment, Url
from filterd.mime_headers import without_surrogates
from filterd.rules.lists import IpNetwork, parse_client_ip
from filterd.rules.matchers import LookupMatch, Matcher, PatternMatch

if TYPE_CHECKING:
    from filterd.rules.view import MessageScan

Atom = tuple[str, int]  # (field, pattern index in that field's Set)
Atoms = frozenset[Atom] | None


class ItemPredicate(Protocol):
    """A test on item ``i`` of a group (one address, one URL, one attachment ...)."""

    def holds(self, scan: MessageScan, item: int) -> bool: ...

    def describe(self, scan: MessageScan, item: int) -> str: ...


def matcher_atom(predicate: object) -> Atom | None:
    if isinstance(predicate, PatternMatch):
        return (predicate.field, predicate.index)
    if isinstance(predicate, ArchivePredicate):
        return predicate.atom
    return None


class Condition:
    """Base of the compiled condition nodes."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label

    def eval(self, scan: MessageScan) -> str | None:
        raise NotImplementedError

    def atoms(self) -> Atoms:
        return None


class AllOf(Condition):
    __slots__ = ("children",)

    def __init__(self, children: Sequence[Condition]) -> None:
        super().__init__("all(" + ", ".join(child.label for child in children) + ")")
        self.children = tuple(children)

    def eval(self, scan: MessageScan) -> str | None:
        details: list[str] = []
        for child in self.children:
            detail = child.eval(scan)
            if detail is None:
                return None
            details.append(detail)
        return "; ".join(details) if details else "always"

    def atoms(self) -> Atoms:
        # Every child must hold, so any one child's atoms gate the whole: take the narrowest.
        gated = [atoms for atoms in (child.atoms() for child in self.children) if atoms]
        return min(gated, key=len) if gated else None


class AnyOf(Condition):
    __slots__ = ("children",)

    def __init__(self, children: Sequence[Condition]) -> None:
        super().__init__("any(" + ", ".join(child.label for child in children) + ")")
        self.children = tuple(children)

    def eval(self, scan: MessageScan) -> str | None:
        for child in self.children:
            detail = child.eval(scan)
            if detail is not None:
                return detail
        return None

    def atoms(self) -> Atoms:
        union: set[Atom] = set()
        for child in self.children:
            atoms = child.atoms()
            if not atoms:
                return None  # one ungated alternative makes the whole ungated
            union |= atoms
        return frozenset(union) if union else None


class NotOf(Condition):
    __slots__ = ("child",)

    def __init__(self, child: Condition) -> None:
        super().__init__(f"not({child.label})")
        self.child = child

    def eval(self, scan: MessageScan) -> str | None:
        return self.label if self.child.eval(scan) is None else None


class ItemCondition(Condition):
    """Some item of ``group`` satisfies every predicate (``from: {address: M, name: M}``)."""

    __slots__ = ("group", "predicates")

    def __init__(self, group: str, predicates: Sequence[ItemPredicate], label: str) -> None:
        super().__init__(label)
        self.group = group
        # Pattern predicates first: they are set lookups, and they fail fastest.
        self.predicates = tuple(sorted(predicates, key=lambda p: matcher_atom(p) is None))

    def eval(self, scan: MessageScan) -> str | None:
        count = scan.count(self.group)
        if not count:
            return None  # most mail has no attachment, archive or URL for these to look at
        predicates = self.predicates
        if len(predicates) == 1:
            # One test per item (the usual rule): ask it for its first item at once, which
            # the common predicates answer without a Python call per item.
            item = _first_item(predicates[0], scan, count)
            return None if item is None else predicates[0].describe(scan, item)
        for item in range(count):
            for predicate in predicates:
                if not predicate.holds(scan, item):
                    break
            else:
                return "; ".join(predicate.describe(scan, item) for predicate in predicates)
        return None

    def atoms(self) -> Atoms:
        for predicate in self.predicates:
            atom = matcher_atom(predicate)
            if atom is not None:
                return frozenset((atom,))
        return None


def _first_item(predicate: ItemPredicate, scan: MessageScan, count: int) -> int | None:
    """The first of items ``0 .. count-1`` that ``predicate`` holds for, or None."""
    if isinstance(predicate, PatternMatch | LookupMatch | LinkTextMismatch):
        return predicate.first(scan, count)
    holds = predicate.holds
    for item in range(count):
        if holds(scan, item):
            return item
    return None


class ArchivePredicate:
    """An attachment holds an archive member satisfying every member predicate."""

    __slots__ = ("atom", "predicates")

    def __init__(self, predicates: Sequence[ItemPredicate]) -> None:
        self.predicates = tuple(sorted(predicates, key=lambda p: matcher_atom(p) is None))
        self.atom = next((a for a in map(matcher_atom, self.predicates) if a is not None), None)

    def _member(self, scan: MessageScan, item: int) -> int | None:
        for member in scan.archive_range(item):
            if all(predicate.holds(scan, member) for predicate in self.predicates):
                return member
        return None

    def holds(self, scan: MessageScan, item: int) -> bool:
        return self._member(scan, item) is not None

    def describe(self, scan: MessageScan, item: int) -> str:
        member = self._member(scan, item)
        if member is None:
            return "archive member"
        inner = "; ".join(predicate.describe(scan, member) for predicate in self.predicates)
        return f"archive member {inner}"


class SizePredicate:
    """``size: {gt: N, lt: N}`` on an attachment or archive member."""

    __slots__ = ("group", "gt", "lt")

    def __init__(self, group: str, gt: int | None, lt: int | None) -> None:
        self.group = group
        self.gt = gt
        self.lt = lt

    def _size(self, scan: MessageScan, item: int) -> int:
        value = scan.items(self.group)[item]
        return value.size if isinstance(value, Attachment | ArchiveMember) else 0

    def holds(self, scan: MessageScan, item: int) -> bool:
        return size_in_bounds(self._size(scan, item), self.gt, self.lt)

    def describe(self, scan: MessageScan, item: int) -> str:
        return f"{self.group} size {self._size(scan, item)} {bounds_label(self.gt, self.lt)}"


def size_in_bounds(size: int, gt: int | None, lt: int | None) -> bool:
    return (gt is None or size > gt) and (lt is None or size < lt)


def bounds_label(gt: int | None, lt: int | None) -> str:
    parts = ([f"> {gt}"] if gt is not None else []) + ([f"< {lt}"] if lt is not None else [])
    return " and ".join(parts)


# -- domain mismatch extensions --------------------------------------------------------------

_OPTIONS: Any = re2.Options()
_OPTIONS.log_errors = False
# Link text that *is* a URL or a host name (possibly with a path), not prose mentioning one.
_SHOWN_URL = re2.compile(
    r"(?i)^\s*(?:[a-z][a-z0-9+.-]*://)?(?:[^\s/@:]+@)?"
    r"((?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z][a-z0-9-]*[a-z0-9])"
    r"(?::\d+)?(?:[/?#]\S*)?\s*$",
    _OPTIONS,
)
_NAME_ADDRESS = re2.compile(r"(?i)[^\s<>@\"']+@((?:[a-z0-9-]+\.)+[a-z]{2,63})", _OPTIONS)
_NAME_DOMAIN = re2.compile(
    r"(?i)(?:^|[\s(\[\"'])((?:www\.)?(?:[a-z0-9-]+\.)+"
    r"(?:com|net|org|info|biz|io|co|me|gov|edu|de|uk|fr|it|es|nl|ru|cn|jp|us|ca|au|ch|at"
    r"|be|se|no|dk|fi|pl|br|in))(?:$|[\s)\]\"',.:;])",
    _OPTIONS,
)


def _bare(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    return domain[4:] if domain.startswith("www.") else domain


def domains_related(first: str, second: str) -> bool:
    """Same domain, or one is a subdomain of the other (``paypal.com`` / ``www.paypal.com``)."""
    a, b = _bare(first), _bare(second)
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def shown_domain(text: str) -> str | None:
    """The host a link's visible text claims, when the text is itself a URL or host name."""
    # A host name has a dot: most link text ("Read more") needs no regex search at all.
    if not text or len(text) > 2048 or "." not in text:
        return None
    # RE2 takes a str as strict UTF-8: a lone surrogate must not fail the message for good.
    found = _SHOWN_URL.search(without_surrogates(text))
    return found.group(1).lower() if found else None


class LinkTextMismatch:
    """``url: {text_domain_mismatch: true}``: the text shows one domain, the href another."""

    __slots__ = ()

    def _pair(self, scan: MessageScan, item: int) -> tuple[str, str] | None:
        url = scan.items("url")[item]
        if not isinstance(url, Url) or not url.link_text or not url.domain:
            return None
        return _mismatch(url.link_text, url.domain)

    def first(self, scan: MessageScan, count: int) -> int | None:
        """The first of items ``0 .. count-1`` whose text shows another domain, or None; a
        (text, domain) pair that repeats, as in a newsletter's links, is judged once."""
        judged: dict[tuple[str, str], bool] = {}
        for item, url in enumerate(scan.items("url")[:count]):
            if not isinstance(url, Url) or not url.link_text or not url.domain:
                continue
            key = (url.link_text, url.domain)
            verdict = judged.get(key)
            if verdict is None:
                verdict = judged[key] = _mismatch(url.link_text, url.domain) is not None
            if verdict:
                return item
        return None

    def holds(self, scan: MessageScan, item: int) -> bool:
        return self._pair(scan, item) is not None

    def describe(self, scan: MessageScan, item: int) -> str:
        shown, real = self._pair(scan, item) or ("", "")
        return f'link text shows "{shown}" but points to "{real}"'


def _mismatch(link_text: str, domain: str) -> tuple[str, str] | None:
    shown = shown_domain(link_text)
    if shown is None or domains_related(shown, domain):
        return None
    return shown, domain


class NameDomainMismatch:
    """``from: {name_domain_mismatch: true}``: the display name shows another domain."""

    __slots__ = ("group",)

    def __init__(self, group: str) -> None:
        self.group = group

    def _claimed(self, scan: MessageScan, item: int) -> str | None:
        address = scan.items(self.group)[item]
        if not isinstance(address, Address) or not address.name or not address.domain:
            return None
        # RE2 takes a str as strict UTF-8: a lone surrogate must not fail the message for good.
        name = without_surrogates(address.name[:512])
        for pattern in (_NAME_ADDRESS, _NAME_DOMAIN):
            for found in pattern.finditer(name):
                claimed = str(found.group(1)).lower()
                if not domains_related(claimed, address.domain):
                    return claimed
        return None

    def holds(self, scan: MessageScan, item: int) -> bool:
        return self._claimed(scan, item) is not None

    def describe(self, scan: MessageScan, item: int) -> str:
        address = scan.items(self.group)[item]
        real = address.domain if isinstance(address, Address) else ""
        return (
            f'{self.group} display name shows "{self._claimed(scan, item)}" but the '
            f'address is at "{real}"'
        )


# -- whole-message and envelope leaves ------------------------------------------------------


class HeaderExists(Condition):
    __slots__ = ("name", "want")

    def __init__(self, name: str, want: bool) -> None:
        super().__init__(f"header {name} {'exists' if want else 'missing'}")
        self.name = name.lower()
        self.want = want

    def eval(self, scan: MessageScan) -> str | None:
        present = self.name in scan.parsed.header_names_lower()
        return self.label if present == self.want else None


class MessageSize(Condition):
    __slots__ = ("gt", "lt")

    def __init__(self, gt: int | None, lt: int | None) -> None:
        super().__init__(f"size {bounds_label(gt, lt)}")
        self.gt = gt
        self.lt = lt

    def eval(self, scan: MessageScan) -> str | None:
        size = scan.message.size
        return (
            f"message size {size} {bounds_label(self.gt, self.lt)}"
            if size_in_bounds(size, self.gt, self.lt)
            else None
        )


class MimeTruncated(Condition):
    """``mime_truncated: true | parts | depth``: a parser limit cut the MIME walk short.

    Parts past the limit are invisible to every other condition; this lets a rule fail closed
    on such a message instead of judging the part of it that was looked at. ``limit`` is the
    one limit asked about (``"parts"``, ``"depth"``), or None for either.
    """

    __slots__ = ("limit",)

    def __init__(self, limit: str | None) -> None:
        super().__init__(f"mime_truncated {limit or 'true'}")
        self.limit = limit

    def eval(self, scan: MessageScan) -> str | None:
        parsed = scan.parsed
        cut_by = parsed.truncated_by
        if not cut_by or (self.limit is not None and self.limit not in cut_by):
            return None
        reasons = {
            "parts": f"more than {parsed.max_parts} parts",
            "depth": f"more than {parsed.max_depth} levels of nesting",
        }
        return "MIME structure cut short: " + " and ".join(reasons[key] for key in sorted(cut_by))


class ClientIp(Condition):
    __slots__ = ("networks",)

    def __init__(self, networks: Sequence[IpNetwork], label: str) -> None:
        super().__init__(label)
        self.networks = tuple(networks)

    def eval(self, scan: MessageScan) -> str | None:
        address = parse_client_ip(scan.message.envelope.client_ip)
        if address is None:
            return None
        for network in self.networks:
            if address.version == network.version and address in network:
                return f"client_ip {address} in {network}"
        return None


def item_label(group: str, predicates: Sequence[object]) -> str:
    parts = [getattr(p, "label", type(p).__name__) for p in predicates]
    return f"{group}: " + ", ".join(parts) if parts else group


__all__ = [
    "AllOf",
    "AnyOf",
    "ArchivePredicate",
    "Atom",
    "Atoms",
    "ClientIp",
    "Condition",
    "HeaderExists",
    "ItemCondition",
    "LinkTextMismatch",
    "LookupMatch",
    "Matcher",
    "MessageSize",
    "MimeTruncated",
    "NameDomainMismatch",
    "NotOf",
    "PatternMatch",
    "SizePredicate",
]
