"""``if:`` blocks → compiled conditions, with every shape problem reported where it stands.

The condition vocabulary (PRODUCT.md, "Rule files") plus the documented extensions
``url: {link_text: M, text_domain_mismatch: true}``, ``from/to: {name_domain_mismatch:
true}`` and ``mime_truncated: true | parts | depth``. Pattern matchers register in the rule set's
``PatternTable``; list matchers resolve their named list here, so an unknown list is a
located error at load, not a miss at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from filterd.mime_parts import DEPTH, PARTS
from filterd.rules.conditions import (
    AllOf,
    AnyOf,
    ArchivePredicate,
    ClientIp,
    Condition,
    HeaderExists,
    ItemCondition,
    ItemPredicate,
    LinkTextMismatch,
    MessageSize,
    MimeTruncated,
    NameDomainMismatch,
    NotOf,
    SizePredicate,
)
from filterd.rules.lists import IpNetwork, NamedList, parse_network
from filterd.rules.matchers import (
    LookupKind,
    LookupMatch,
    Matcher,
    MatcherKind,
    PatternMatch,
    PatternTable,
    combined_source,
    compile_regex,
    regex_problem,
)
from filterd.rules.validate import (
    Problems,
    as_bool,
    as_map,
    as_seq,
    as_size,
    as_str,
    as_str_list,
    describe_type,
    header_name,
    suggestion,
    unknown_keys,
)
from filterd.yamlsrc import Pos, YamlMap

CONDITION_KEYS = (
    "all",
    "any",
    "not",
    "sender",
    "recipient",
    "client_ip",
    "helo",
    "size",
    "header",
    "from",
    "to",
    "subject",
    "body",
    "raw",
    "url",
    "attachment",
    "mime_truncated",
)
MATCHER_KEYS = tuple(kind.value for kind in MatcherKind)
CASE_VALUES = ("insensitive", "sensitive")
ENVELOPE_ADDRESS_PARTS = ("address", "domain")
HEADER_ADDRESS_PARTS = ("address", "domain", "name", "name_domain_mismatch")
URL_PARTS = ("domain", "link_text", "text_domain_mismatch")
ATTACHMENT_KEYS = ("filename", "content_type", "detected_type", "size", "archive")
ARCHIVE_KEYS = ("filename", "size")
SIZE_KEYS = ("gt", "lt")
MIME_LIMITS = (PARTS, DEPTH)  # the parser limits mime_truncated can name
_SHOWN = 50


def _shown(values: list[str]) -> str:
    text = values[0] if len(values) == 1 else "[" + ", ".join(values) + "]"
    return f'"{text}"' if len(text) <= _SHOWN else f'"{text[:_SHOWN]}..."'


class ConditionParser:
    """Parses the ``if:`` of every rule of one rule set into ``Condition`` trees."""

    def __init__(
        self, table: PatternTable, lists: Mapping[str, NamedList], problems: Problems
    ) -> None:
        self.table = table
        self.lists = lists
        self.problems = problems
        self.used_lists: set[str] = set()
        self._keys: dict[str, Callable[[Any, Pos], Condition | None]] = {
            "all": lambda v, p: self._combine(v, p, "all"),
            "any": lambda v, p: self._combine(v, p, "any"),
            "not": self._not,
            "sender": lambda v, p: self._address(v, p, "sender", ENVELOPE_ADDRESS_PARTS),
            "recipient": lambda v, p: self._address(v, p, "recipient", ENVELOPE_ADDRESS_PARTS),
            "from": lambda v, p: self._address(v, p, "from", HEADER_ADDRESS_PARTS),
            "to": lambda v, p: self._address(v, p, "to", HEADER_ADDRESS_PARTS),
            "client_ip": self._client_ip,
            "helo": lambda v, p: self._single(v, p, "helo", "helo", LookupKind.DOMAIN),
            "subject": lambda v, p: self._single(v, p, "header:subject", "subject"),
            "body": lambda v, p: self._single(v, p, "body", "body"),
            "raw": lambda v, p: self._single(v, p, "raw", "raw"),
            "size": self._size,
            "header": self._header,
            "url": self._url,
            "attachment": self._attachment,
            "mime_truncated": self._mime_truncated,
        }

    # -- structure ------------------------------------------------------------------------

    def parse(self, value: Any, pos: Pos) -> Condition | None:
        """A condition mapping; several keys in one mapping must all hold."""
        mapping = as_map(value, pos, self.problems, "a condition")
        if mapping is None:
            return None
        if not mapping:
            self.problems.add(pos, "empty condition: expected one of " + ", ".join(CONDITION_KEYS))
            return None
        parts: list[Condition] = []
        failed = False
        for key, item in mapping.items():
            handler = self._keys.get(key)
            if handler is None:
                self.problems.add(
                    mapping.key_at(key),
                    f"unknown condition '{key}'{suggestion(key, CONDITION_KEYS)}",
                )
                failed = True
                continue
            parsed = handler(item, mapping.at(key))
            if parsed is None:
                failed = True
            else:
                parts.append(parsed)
        if failed:
            return None
        return parts[0] if len(parts) == 1 else AllOf(parts)

    def _combine(self, value: Any, pos: Pos, kind: str) -> Condition | None:
        seq = as_seq(value, pos, self.problems, f"'{kind}:'")
        if seq is None:
            return None
        if kind == "any" and not seq:
            self.problems.add(pos, "'any:' needs at least one condition")
            return None
        children = [self.parse(item, seq.at(index)) for index, item in enumerate(seq)]
        if any(child is None for child in children):
            return None
        valid = [child for child in children if child is not None]
        return AllOf(valid) if kind == "all" else AnyOf(valid)

    def _not(self, value: Any, pos: Pos) -> Condition | None:
        child = self.parse(value, pos)
        return None if child is None else NotOf(child)

    # -- string matchers --------------------------------------------------------------------

    def matcher(
        self, value: Any, pos: Pos, field: str, what: str, lookup: LookupKind = LookupKind.EXACT
    ) -> Matcher | None:
        """A string matcher ``M`` applied to ``field``; ``what`` names it in messages/traces."""
        if isinstance(value, str):
            self.problems.add(
                pos,
                f'{what}: expected a matcher such as {{contains: "{value}"}}'
                f" or {{equals: ...}}, got a plain string",
            )
            return None
        mapping = as_map(value, pos, self.problems, f"{what} matcher")
        if mapping is None:
            return None
        unknown_keys(mapping, (*MATCHER_KEYS, "case"), self.problems, f"{what} matcher")
        kinds = [key for key in mapping if key in MATCHER_KEYS]
        if len(kinds) != 1:
            self.problems.add(
                pos,
                f"{what} matcher needs exactly one of "
                f"{', '.join(MATCHER_KEYS)}"
                + (f" (got {', '.join(kinds)}; combine them with all:/any:)" if kinds else ""),
            )
            return None
        case_sensitive = False
        if "case" in mapping:
            case = as_str(mapping["case"], mapping.at("case"), self.problems, "case")
            if case is not None and case not in CASE_VALUES:
                self.problems.add(
                    mapping.at("case"),
                    f"case must be 'sensitive' or "
                    f"'insensitive', got '{case}'{suggestion(case, CASE_VALUES)}",
                )
            case_sensitive = case == "sensitive"
        kind = MatcherKind(kinds[0])
        argument, arg_pos = mapping[kind.value], mapping.at(kind.value)
        if kind is MatcherKind.IN_LIST:
            named = self._list(argument, arg_pos)
            if named is None:
                return None
            return LookupMatch(
                field,
                named.values(case_sensitive),
                lookup,
                case_sensitive,
                f"{what} in_list {named.name}",
            )
        values = as_str_list(
            argument,
            arg_pos,
            self.problems,
            f"{what} {kind.value}",
            allow_empty=kind is MatcherKind.EQUALS,
        )
        if values is None:
            return None
        texts = [text for text, _ in values]
        if kind is MatcherKind.IN:
            entries = frozenset(t if case_sensitive else t.casefold() for t in texts)
            return LookupMatch(field, entries, lookup, case_sensitive, f"{what} in {_shown(texts)}")
        if kind is MatcherKind.REGEX:
            bad = [
                (problem, at) for text, at in values if (problem := regex_problem(text)) is not None
            ]
            for problem, at in bad:
                self.problems.add(at, problem)
            if bad:
                return None
        source = combined_source(kind, texts, case_sensitive)
        problem = regex_problem(source)
        if problem is not None:  # only reachable through a pattern RE2 accepts alone
            self.problems.add(arg_pos, problem)
            return None
        index = self.table.add(field, source, arg_pos)
        return PatternMatch(
            field, index, compile_regex(source), f"{what} {kind.value} {_shown(texts)}"
        )

    def _list(self, value: Any, pos: Pos) -> NamedList | None:
        name = as_str(value, pos, self.problems, "in_list")
        if name is None:
            return None
        named = self.lists.get(name)
        if named is None:
            known = sorted(self.lists)
            hint = suggestion(name, known) or (
                f" (known lists: {', '.join(known)})" if known else " (no lists are declared)"
            )
            self.problems.add(pos, f"unknown list '{name}'{hint}")
            return None
        self.used_lists.add(name)
        return named

    # -- leaves -----------------------------------------------------------------------------

    def _single(
        self, value: Any, pos: Pos, field: str, what: str, lookup: LookupKind = LookupKind.EXACT
    ) -> Condition | None:
        found = self.matcher(value, pos, field, what, lookup)
        return None if found is None else ItemCondition(_group(field), [found], found.label)

    def _parts(self, mapping: YamlMap, parts: tuple[str, ...], what: str) -> bool:
        """Whether ``mapping`` is a parts form (``{domain: M, ...}``) rather than a matcher."""
        return any(key in parts for key in mapping) or not any(
            key in (*MATCHER_KEYS, "case") for key in mapping
        )

    def _address(
        self, value: Any, pos: Pos, group: str, parts: tuple[str, ...]
    ) -> Condition | None:
        whole_lookup = LookupKind.ADDRESS
        if not isinstance(value, YamlMap) or not value or not self._parts(value, parts, group):
            return self._single(value, pos, group, group, whole_lookup)
        if "name" in value and group in ("sender", "recipient"):
            self.problems.add(
                value.key_at("name"),
                f"the envelope {group} has no display name;"
                " use from: {name: ...} for the From header's",
            )
            return None
        if not unknown_keys(value, parts, self.problems, f"'{group}:'"):
            return None
        predicates: list[ItemPredicate] = []
        failed = False
        for key, item in value.items():
            at = value.at(key)
            found: ItemPredicate | None
            if key == "name_domain_mismatch":
                found = NameDomainMismatch(group) if self._true(item, at, key) else None
            elif key == "address":
                found = self.matcher(item, at, group, f"{group} address", whole_lookup)
            elif key == "domain":
                found = self.matcher(
                    item, at, f"{group}.domain", f"{group} domain", LookupKind.DOMAIN
                )
            else:
                found = self.matcher(item, at, f"{group}.name", f"{group} name")
            failed = failed or found is None
            if found is not None:
                predicates.append(found)
        return None if failed else ItemCondition(group, predicates, _label(group, predicates))

    def _true(self, value: Any, pos: Pos, key: str) -> bool:
        flag = as_bool(value, pos, self.problems, key)
        if flag is False:
            self.problems.add(pos, f"{key} only takes true; wrap the condition in not: to negate")
        return flag is True

    def _header(self, value: Any, pos: Pos) -> Condition | None:
        mapping = as_map(value, pos, self.problems, "'header:'")
        if mapping is None:
            return None
        unknown_keys(mapping, ("name", "exists", *MATCHER_KEYS, "case"), self.problems, "'header:'")
        if "name" not in mapping:
            self.problems.add(pos, "'header:' needs a name (e.g. {name: X-Mailer, contains: ...})")
            return None
        name = header_name(mapping["name"], mapping.at("name"), self.problems, "header name")
        rest = YamlMap({k: v for k, v in mapping.items() if k in (*MATCHER_KEYS, "case")})
        rest.pos, rest.key_pos, rest.value_pos = mapping.pos, mapping.key_pos, mapping.value_pos
        if "exists" in mapping:
            if rest:
                self.problems.add(
                    mapping.key_at("exists"), "'header:' takes either exists or a matcher, not both"
                )
                return None
            flag = as_bool(mapping["exists"], mapping.at("exists"), self.problems, "exists")
            return None if flag is None or name is None else HeaderExists(name, flag)
        if name is None:
            return None
        found = self.matcher(rest, pos, f"header:{name.lower()}", f"header {name}")
        return (
            None if found is None else ItemCondition(f"header:{name.lower()}", [found], found.label)
        )

    def _client_ip(self, value: Any, pos: Pos) -> Condition | None:
        mapping = as_map(value, pos, self.problems, "'client_ip:'")
        if mapping is None:
            return None
        if not unknown_keys(mapping, ("in", "in_list"), self.problems, "'client_ip:'"):
            return None
        if len(mapping) != 1:
            self.problems.add(pos, "'client_ip:' needs exactly one of in (CIDRs) or in_list")
            return None
        networks: list[IpNetwork] = []
        if "in_list" in mapping:
            named = self._list(mapping["in_list"], mapping.at("in_list"))
            if named is None:
                return None
            networks.extend(named.networks(self.problems.items))
            return ClientIp(networks, f"client_ip in_list {named.name}")
        entries = as_str_list(mapping["in"], mapping.at("in"), self.problems, "client_ip in")
        if entries is None:
            return None
        failed = False
        for text, at in entries:
            network = parse_network(text)
            if network is None:
                self.problems.add(at, f"bad CIDR '{text}' (expected e.g. 10.0.0.0/8 or fd00::/8)")
                failed = True
            else:
                networks.append(network)
        if failed:
            return None
        return ClientIp(networks, f"client_ip in {_shown([text for text, _ in entries])}")

    def _bounds(self, value: Any, pos: Pos, what: str) -> tuple[int | None, int | None] | None:
        mapping = as_map(value, pos, self.problems, what)
        if mapping is None or not unknown_keys(mapping, SIZE_KEYS, self.problems, what):
            return None
        if not mapping:
            self.problems.add(pos, f"{what} needs gt and/or lt")
            return None
        gt, lt = (
            as_size(mapping[key], mapping.at(key), self.problems, key) if key in mapping else None
            for key in SIZE_KEYS
        )
        if ("gt" in mapping and gt is None) or ("lt" in mapping and lt is None):
            return None
        return gt, lt

    def _size(self, value: Any, pos: Pos) -> Condition | None:
        bounds = self._bounds(value, pos, "'size:'")
        return None if bounds is None else MessageSize(*bounds)

    def _mime_truncated(self, value: Any, pos: Pos) -> Condition | None:
        if value is True:
            return MimeTruncated(None)
        if isinstance(value, str) and value in MIME_LIMITS:
            return MimeTruncated(value)
        if value is False:
            got = "false; wrap the condition in not: to negate"
        elif isinstance(value, str):
            got = f"'{value}'{suggestion(value, MIME_LIMITS)}"
        else:
            got = describe_type(value)
        self.problems.add(
            pos, f"mime_truncated takes true (either limit), {' or '.join(MIME_LIMITS)}; got {got}"
        )
        return None

    def _url(self, value: Any, pos: Pos) -> Condition | None:
        if not isinstance(value, YamlMap) or not value or not self._parts(value, URL_PARTS, "url"):
            return self._single(value, pos, "url", "url")
        if not unknown_keys(value, URL_PARTS, self.problems, "'url:'"):
            return None
        predicates: list[ItemPredicate] = []
        failed = False
        for key, item in value.items():
            at = value.at(key)
            found: ItemPredicate | None
            if key == "text_domain_mismatch":
                found = LinkTextMismatch() if self._true(item, at, key) else None
            elif key == "domain":
                found = self.matcher(item, at, "url.domain", "url domain", LookupKind.DOMAIN)
            else:
                found = self.matcher(item, at, "url.link_text", "url link_text")
            failed = failed or found is None
            if found is not None:
                predicates.append(found)
        return None if failed else ItemCondition("url", predicates, _label("url", predicates))

    def _attachment(self, value: Any, pos: Pos) -> Condition | None:
        mapping = as_map(value, pos, self.problems, "'attachment:'")
        if mapping is None or not unknown_keys(
            mapping, ATTACHMENT_KEYS, self.problems, "'attachment:'"
        ):
            return None
        if not mapping:
            self.problems.add(
                pos, "'attachment:' needs at least one of " + ", ".join(ATTACHMENT_KEYS)
            )
            return None
        predicates = self._attachment_predicates(mapping, "attachment")
        if predicates is None:
            return None
        return ItemCondition("attachment", predicates, _label("attachment", predicates))

    def _attachment_predicates(self, mapping: YamlMap, group: str) -> list[ItemPredicate] | None:
        predicates: list[ItemPredicate] = []
        failed = False
        for key, item in mapping.items():
            at = value_pos = mapping.at(key)
            found: ItemPredicate | None = None
            if key == "size":
                bounds = self._bounds(item, at, f"'{group} size:'")
                found = None if bounds is None else SizePredicate(group, *bounds)
            elif key == "archive":
                inner = as_map(item, value_pos, self.problems, "'archive:'")
                if inner is not None and unknown_keys(
                    inner, ARCHIVE_KEYS, self.problems, "'archive:'"
                ):
                    if not inner:
                        self.problems.add(at, "'archive:' needs filename and/or size")
                    else:
                        members = self._attachment_predicates(inner, "archive")
                        found = None if members is None else ArchivePredicate(members)
            else:
                found = self.matcher(item, at, f"{group}.{key}", f"{group} {key}")
            failed = failed or found is None
            if found is not None:
                predicates.append(found)
        return None if failed else predicates


def _group(field: str) -> str:
    return field if field.startswith("header:") else field.partition(".")[0]


def _label(group: str, predicates: list[ItemPredicate]) -> str:
    names = [getattr(p, "label", None) or type(p).__name__ for p in predicates]
    return f"{group}(" + ", ".join(names) + ")"


__all__ = ["CONDITION_KEYS", "MATCHER_KEYS", "ConditionParser", "describe_type"]
