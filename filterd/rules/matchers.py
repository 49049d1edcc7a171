"""String matchers and the multi-pattern engine that runs every regex of a rule set at once.

Every pattern-like matcher (``equals``, ``contains``, ``regex``, ``glob``) becomes one RE2
pattern, registered in a ``PatternTable`` under the *field* it looks at (``body``,
``header:subject``, ``url.domain`` ...). At load the table compiles one ``re2.Set`` per field,
so a message costs one linear-time pass per field value whatever the number of rules; a
condition then only asks whether its pattern's index is among the hits. The single compiled
regex a matcher also keeps is used only to quote *what* matched, for rules that did match.

``in`` and ``in_list`` are exact lookups in a frozenset instead: lists can be long, and a
hash lookup per value is cheaper than any automaton.
"""

from __future__ import annotations

import ast
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import re2

from filterd.yamlsrc import Pos

if TYPE_CHECKING:
    from filterd.errors import Problem
    from filterd.rules.view import MessageScan

# A Set's memory budget (program plus DFA cache). RE2 allocates DFA states only as scans need
# them, so typical use stays far below it; it bounds what hostile input can make one field's
# Set hold. RE2's default (8 MiB) cannot build a set of about 1,000 loose patterns; a set that
# does not fit is split into chunks (``_compile_chunks``) instead of failing.
SET_MAX_MEM = 32 << 20
REGEX_MAX_MEM = 8 << 20
_EXCERPT = 60
EMPTY_HITS: frozenset[int] = frozenset()


def _options(max_mem: int) -> Any:
    options = re2.Options()
    options.max_mem = max_mem
    options.log_errors = False  # errors surface as located problems or not at all, never on stderr
    return options


_REGEX_OPTIONS = _options(REGEX_MAX_MEM)


class MatcherKind(enum.Enum):
    """The string matcher keywords of the rule language."""

    EQUALS = "equals"
    CONTAINS = "contains"
    REGEX = "regex"
    GLOB = "glob"
    IN = "in"
    IN_LIST = "in_list"


class LookupKind(enum.Enum):
    """How ``in`` / ``in_list`` entries compare with a value."""

    EXACT = "exact"  # the whole value equals an entry
    DOMAIN = "domain"  # the domain equals an entry, or a ".suffix" entry covers it
    ADDRESS = "address"  # the address equals an entry, or its domain matches as DOMAIN


def _re2_message(exc: Exception) -> str:
    text = str(exc)
    if text.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
    return text


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot run on RE2, phrased for a mail admin; None when it compiles."""
    try:
        re2.compile(pattern, _REGEX_OPTIONS)
    except re2.error as exc:
        detail = _re2_message(exc)
        if "(?=" in detail or "(?!" in detail or "(?<=" in detail or "(?<!" in detail:
            return (
                f"invalid regex: lookaround is not supported by the linear-time engine "
                f"(RE2): {detail}"
            )
        if "\\Z" in detail:
            return "invalid regex: \\Z is not supported by RE2, use \\z for end of text"
        if detail.startswith("invalid escape sequence: \\") and detail[-1:].isdigit():
            return f"invalid regex: backreferences are not supported by RE2: {detail}"
        return f"invalid regex: {detail}"
    return None


def glob_to_regex(glob: str) -> str:
    """A shell glob (``*``, ``?``, ``[...]``) as an anchored RE2 pattern over the whole value."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            end = i
            if end < n and glob[end] in "!^":
                end += 1
            if end < n and glob[end] == "]":
                end += 1
            while end < n and glob[end] != "]":
                end += 1
            if end >= n:
                out.append(re2.escape("["))  # an unclosed bracket is a literal, as in fnmatch
                continue
            body = glob[i:end]
            i = end + 1
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            body = body.replace("\\", "\\\\").replace("]", "\\]").replace("[", "\\[")
            out.append(f"[{'^' if negate else ''}{body}]")
        else:
            out.append(re2.escape(char))
    return "^(?s:" + "".join(out) + ")$"


def pattern_source(kind: MatcherKind, value: str) -> str:
    """The RE2 pattern (without case flag) for one string of an equals/contains/regex/glob."""
    if kind is MatcherKind.EQUALS:
        return "^(?:" + str(re2.escape(value)) + ")$"
    if kind is MatcherKind.CONTAINS:
        return str(re2.escape(value))
    if kind is MatcherKind.GLOB:
        return glob_to_regex(value)
    return value


def combined_source(kind: MatcherKind, values: Iterable[str], case_sensitive: bool) -> str:
    """One pattern for a matcher with one or several strings (any of them may match)."""
    parts = [pattern_source(kind, value) for value in values]
    body = parts[0] if len(parts) == 1 else "|".join(f"(?:{part})" for part in parts)
    return ("(?:" if case_sensitive else "(?i:") + body + ")"


def _quote(text: str) -> str:
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return f'"{text}"' if len(text) <= _EXCERPT else f'"{text[:_EXCERPT]}..."'


def _as_text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class PatternMatch:
    """A matcher served by the field's ``re2.Set``: index ``index`` of field ``field``."""

    __slots__ = ("field", "index", "label", "regex")

    def __init__(self, field: str, index: int, regex: Any, label: str) -> None:
        self.field = field
        self.index = index
        self.regex = regex
        self.label = label

    def holds(self, scan: MessageScan, item: int) -> bool:
        return self.index in scan.hits(self.field)[item]

    def first(self, scan: MessageScan, count: int) -> int | None:
        """The first of items ``0 .. count-1`` whose value holds this pattern, or None."""
        index = self.index
        for item, found in enumerate(scan.hits(self.field)[:count]):
            if index in found:
                return item
        return None

    def describe(self, scan: MessageScan, item: int) -> str:
        if not scan.quote:
            return f"{self.label} matched"
        value = scan.encoded(self.field)[item]
        found = self.regex.search(value)
        excerpt = _as_text(found.group(0) if found is not None else value[:200])
        return f"{self.label} matched {_quote(excerpt)}"


# The longest DNS name (RFC 1035, without the root dot). A ``.suffix`` entry can only cover a
# host through a suffix no longer than this, so longer suffixes need not be looked up.
MAX_DOMAIN_LENGTH = 253


def domain_candidates(domain: str) -> list[str]:
    """``domain`` and the ``.suffix`` forms that cover it: a.b.c -> a.b.c, .b.c, .c

    Only suffixes of at most ``MAX_DOMAIN_LENGTH`` characters are built: every suffix of a
    hostile 40,000-label host would be quadratic in its length (gigabytes of strings), while
    no real name, and so no meaningful list entry, is longer. At most 128 short candidates.
    """
    out = [domain]
    # A suffix starting after the dot at index i has len(domain) - i - 1 characters.
    dot = domain.find(".", max(0, len(domain) - MAX_DOMAIN_LENGTH - 1))
    while dot >= 0:
        if dot + 1 < len(domain):
            out.append(domain[dot:])
        dot = domain.find(".", dot + 1)
    return out


class LookupMatch:
    """``in`` / ``in_list``: an exact (by default case-folded) lookup in a set of entries."""

    __slots__ = ("case_sensitive", "entries", "field", "kind", "label")

    def __init__(
        self,
        field: str,
        entries: frozenset[str],
        kind: LookupKind,
        case_sensitive: bool,
        label: str,
    ) -> None:
        self.field = field
        self.entries = entries
        self.kind = kind
        self.case_sensitive = case_sensitive
        self.label = label

    def holds(self, scan: MessageScan, item: int) -> bool:
        return self.lookup(_as_text(scan.values(self.field)[item])) is not None

    def first(self, scan: MessageScan, count: int) -> int | None:
        """The first of items ``0 .. count-1`` whose value is covered, or None. Whether an
        item holds depends on its value alone, so each distinct value is looked up once."""
        values = scan.values(self.field)[:count]
        for value in dict.fromkeys(values):
            if self.lookup(_as_text(value)) is not None:
                return values.index(value)
        return None

    def lookup(self, value: str) -> str | None:
        """The entry that covers ``value``, or None."""
        if not self.case_sensitive:
            value = value.casefold()
        if value in self.entries:
            return value
        if self.kind is LookupKind.EXACT:
            return None
        domain = value.rpartition("@")[2] if self.kind is LookupKind.ADDRESS else value
        if not domain:
            return None
        for candidate in domain_candidates(domain):
            if candidate in self.entries:
                return candidate
        return None

    def describe(self, scan: MessageScan, item: int) -> str:
        value = _as_text(scan.values(self.field)[item])
        entry = self.lookup(value)
        return f"{self.label} matched {_quote(value)} (entry {_quote(entry or '')})"


Matcher = PatternMatch | LookupMatch


@dataclass
class _FieldPatterns:
    sources: list[str] = field(default_factory=list)
    positions: list[Pos] = field(default_factory=list)
    index_of: dict[str, int] = field(default_factory=dict)


class FieldScanner:
    """The compiled ``re2.Set`` (split into chunks only if RE2 cannot build it whole) of a field."""

    __slots__ = ("chunks", "field", "size")

    def __init__(self, field: str, chunks: tuple[tuple[Any, int], ...], size: int) -> None:
        self.field = field
        self.chunks = chunks  # (set, index offset)
        self.size = size

    def scan(self, value: str | bytes) -> frozenset[int]:
        """Indices of every pattern of this field that occurs in ``value``: one pass per chunk."""
        if len(self.chunks) == 1:
            found = self.chunks[0][0].Match(value)
            return frozenset(found) if found else EMPTY_HITS
        hits: set[int] = set()
        for compiled, offset in self.chunks:
            found = compiled.Match(value)
            if found:
                hits.update(offset + index for index in found)
        return frozenset(hits) if hits else EMPTY_HITS


class PatternTable:
    """Collects the patterns of a whole rule set per field, then compiles one Set per field."""

    def __init__(self) -> None:
        self._fields: dict[str, _FieldPatterns] = {}

    def add(self, field_name: str, source: str, pos: Pos) -> int:
        """Register ``source`` for ``field_name``; identical patterns share one index."""
        patterns = self._fields.setdefault(field_name, _FieldPatterns())
        known = patterns.index_of.get(source)
        if known is not None:
            return known
        patterns.index_of[source] = len(patterns.sources)
        patterns.sources.append(source)
        patterns.positions.append(pos)
        return patterns.index_of[source]

    def compile(
        self, problems: list[Problem], *, max_mem: int = SET_MAX_MEM
    ) -> dict[str, FieldScanner]:
        """One scanner per field; a pattern that cannot be built is a located problem."""
        options = _options(max_mem)
        scanners: dict[str, FieldScanner] = {}
        for name, patterns in self._fields.items():
            chunks: list[tuple[Any, int]] = []
            _compile_chunks(patterns, 0, len(patterns.sources), chunks, problems, options=options)
            scanners[name] = FieldScanner(name, tuple(chunks), len(patterns.sources))
        return scanners


def _compile_chunks(
    patterns: _FieldPatterns,
    start: int,
    end: int,
    chunks: list[tuple[Any, int]],
    problems: list[Problem],
    *,
    options: Any,
) -> None:
    # Halve the range until RE2 can build each part: a giant rule set still loads, at the cost
    # of one more pass per extra chunk, instead of failing as a whole.
    compiled = re2.Set.SearchSet(options)
    try:
        for source in patterns.sources[start:end]:
            compiled.Add(source)
        compiled.Compile()
    except re2.error:
        if end - start == 1:
            problems.append(
                patterns.positions[start].problem(
                    "regex is too large for the matching engine; simplify it"
                )
            )
            return
        middle = (start + end) // 2
        _compile_chunks(patterns, start, middle, chunks, problems, options=options)
        _compile_chunks(patterns, middle, end, chunks, problems, options=options)
        return
    chunks.append((compiled, start))


def compile_regex(source: str) -> Any:
    """The single regex used to quote a match (the source was validated beforehand)."""
    return re2.compile(source, _REGEX_OPTIONS)
