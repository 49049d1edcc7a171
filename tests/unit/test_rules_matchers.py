"""The matcher building blocks: glob translation, RE2 checks, lookups, the multi-pattern engine."""

from __future__ import annotations

import fnmatch
import random

import pytest
import re2

from filterd.errors import Problem
from filterd.rules.lists import parse_list_text, parse_network
from filterd.rules.matchers import (
    MAX_DOMAIN_LENGTH,
    LookupKind,
    LookupMatch,
    MatcherKind,
    PatternTable,
    combined_source,
    domain_candidates,
    glob_to_regex,
    regex_problem,
)
from filterd.yamlsrc import Pos

HERE = Pos("rules.yaml", 1, 1)


@pytest.mark.parametrize(
    "glob",
    [
        "*.exe",
        "invoice-??.pdf",
        "[a-c]*.txt",
        "[!x]*",
        "a[b",
        "*.*",
        "report (1).doc",
        "x+y^z$.js",
        "[]]x",
        "*\\*",
    ],
)
@pytest.mark.parametrize(
    "name",
    [
        "setup.exe",
        "invoice-12.pdf",
        "b.txt",
        "xray",
        "a[b",
        "report (1).doc",
        "x+y^z$.js",
        "]x",
        "a\\b*",
        "setup.exe.txt",
    ],
)
def test_glob_agrees_with_fnmatch(glob: str, name: str) -> None:
    """fnmatchcase is the oracle for case-sensitive globs over a whole name."""
    expected = fnmatch.fnmatchcase(name, glob)
    assert (re2.search(glob_to_regex(glob), name) is not None) is expected


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("plain", None),
        (r"\bfree\b", None),
        ("(?i)caf\u00e9", None),
        ("(?P<name>x)", None),
        ("a{1001}", "invalid regex"),
        ("(?=x)", "lookaround"),
        ("(?<!x)y", "lookaround"),
        (r"(a)\1", "backreferences"),
        (r"end\Z", r"use \z"),
        ("[z-a]", "invalid character class range"),
    ],
)
def test_regex_problem(pattern: str, problem: str | None) -> None:
    found = regex_problem(pattern)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


@pytest.mark.parametrize(
    ("kind", "values", "case_sensitive", "text", "expected"),
    [
        (MatcherKind.EQUALS, ["a.b"], False, "A.B", True),
        (MatcherKind.EQUALS, ["a.b"], False, "axb", False),  # escaped, not a regex
        (MatcherKind.EQUALS, ["a"], False, "a\n", False),  # $ is the very end
        (MatcherKind.EQUALS, [""], False, "", True),
        (MatcherKind.CONTAINS, ["(x)"], False, "a (X) b", True),
        (MatcherKind.CONTAINS, ["x", "y"], True, "Y", False),
        (MatcherKind.REGEX, ["^a|b$"], False, "cB", True),  # alternation kept inside its group
        (MatcherKind.REGEX, ["^a", "b$"], False, "ca", False),
        (MatcherKind.GLOB, ["*.EXE"], False, "x.exe", True),
        (MatcherKind.GLOB, ["*.EXE"], True, "x.exe", False),
    ],
)
def test_combined_source(
    kind: MatcherKind, values: list[str], case_sensitive: bool, text: str, expected: bool
) -> None:
    source = combined_source(kind, values, case_sensitive)
    assert (re2.search(source, text) is not None) is expected


def test_domain_candidates() -> None:
    assert domain_candidates("a.b.example.com") == [
        "a.b.example.com",
        ".b.example.com",
        ".example.com",
        ".com",
    ]
    assert domain_candidates("localhost") == ["localhost"]


def _every_suffix(domain: str) -> list[str]:
    """The candidates by definition: the domain and every non-empty ``.suffix`` of it."""
    return [domain] + ["." + domain[i + 1 :] for i, c in enumerate(domain[:-1]) if c == "."]


def test_domain_candidates_of_real_names_are_every_suffix() -> None:
    rng = random.Random(7)
    for _ in range(300):
        count = rng.randint(1, 6)
        labels = [rng.choice(["a", "mail", "x" * 63, "", "example"]) for _ in range(count)]
        host = ".".join(labels)[:MAX_DOMAIN_LENGTH]
        assert domain_candidates(host) == _every_suffix(host)


def test_domain_candidates_of_a_hostile_host_stay_few_and_short() -> None:
    """Every suffix of a 5,000-label host would be 5,000 strings of up to 10,000 characters
    (quadratic); only the suffixes a real name can have are built."""
    host = ".".join(["a"] * 5000) + ".evil.example"
    candidates = domain_candidates(host)
    assert candidates[0] == host
    assert len(candidates) <= MAX_DOMAIN_LENGTH // 2 + 2
    assert all(len(candidate) <= MAX_DOMAIN_LENGTH + 1 for candidate in candidates[1:])
    assert candidates[-2:] == [".evil.example", ".example"]


def test_a_hostile_host_is_still_covered_by_its_real_suffix() -> None:
    host = ".".join(["a"] * 5000) + ".evil.example"
    match = LookupMatch("url.domain", frozenset({".example"}), LookupKind.DOMAIN, False, "t")
    assert match.lookup(host) == ".example"
    whole = LookupMatch("url.domain", frozenset({host}), LookupKind.DOMAIN, False, "t")
    assert whole.lookup(host) == host


@pytest.mark.parametrize(
    ("kind", "entries", "value", "expected"),
    [
        (LookupKind.EXACT, {"example.com"}, "EXAMPLE.com", "example.com"),
        (LookupKind.EXACT, {"example.com"}, "mail.example.com", None),
        (LookupKind.DOMAIN, {".example.com"}, "mail.example.com", ".example.com"),
        (LookupKind.DOMAIN, {".example.com"}, "example.com", None),
        (LookupKind.ADDRESS, {"example.com"}, "Bob@Example.com", "example.com"),
        (LookupKind.ADDRESS, {"bob@example.com"}, "bob@example.com", "bob@example.com"),
        (LookupKind.ADDRESS, {".example.com"}, "bob@eu.example.com", ".example.com"),
        (LookupKind.ADDRESS, {"example.com"}, "", None),
        (LookupKind.ADDRESS, {"example.com"}, "bob@", None),
    ],
)
def test_lookup(kind: LookupKind, entries: set[str], value: str, expected: str | None) -> None:
    match = LookupMatch("sender", frozenset(entries), kind, case_sensitive=False, label="t")
    assert match.lookup(value) == expected


def test_identical_patterns_share_one_index() -> None:
    table = PatternTable()
    first = table.add("body", "(?i:x)", HERE)
    assert table.add("body", "(?i:y)", HERE) == first + 1
    assert table.add("body", "(?i:x)", HERE) == first
    assert table.add("header:subject", "(?i:x)", HERE) == 0  # per field


def test_scanner_reports_every_pattern_found() -> None:
    table = PatternTable()
    indices = {
        word: table.add("body", combined_source(MatcherKind.CONTAINS, [word], False), HERE)
        for word in ("viagra", "lottery", "free", "absent")
    }
    scanner = table.compile([])["body"]
    found = scanner.scan(b"FREE lottery tickets, no Viagra")
    assert found == {indices["viagra"], indices["lottery"], indices["free"]}
    assert scanner.scan(b"nothing here") == frozenset()


def test_a_set_too_large_for_its_budget_is_split_not_refused() -> None:
    rng = random.Random(7)
    table = PatternTable()
    for _ in range(200):
        a = "".join(rng.choice("abcdefgh") for _ in range(6))
        b = "".join(rng.choice("abcdefgh") for _ in range(6))
        table.add("body", f"(?i:{a}.{{0,30}}{b}\\w+)", HERE)
    needle = table.add("body", "needle", HERE)
    problems: list[Problem] = []
    scanner = table.compile(problems, max_mem=64 << 10)["body"]
    assert problems == []
    assert len(scanner.chunks) > 1
    assert scanner.scan(b"hay needle hay") == {needle}
    assert scanner.chunks[0][1] == 0  # chunk offsets map local hits back to table indices


def test_list_text_parsing() -> None:
    text = "# comment\n\n  spam.example \nevil.example # why\nx#y\n\t# indented\n"
    entries = parse_list_text(text)
    assert [(e.value, e.line, e.col) for e in entries] == [
        ("spam.example", 3, 3),
        ("evil.example", 4, 1),
        ("x#y", 5, 1),
    ]


def test_list_lines_end_only_at_line_feeds() -> None:
    # str.splitlines() also breaks at a form feed, U+0085 or U+2028: the rest of a comment
    # became an entry, and the lines after it were numbered wrong.
    text = "# note\x85comment\r\nspam.example\n# page\x0cbreak\nevil.example\n"
    entries = parse_list_text(text)
    assert [(e.value, e.line) for e in entries] == [("spam.example", 2), ("evil.example", 4)]


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("10.0.0.0/8", True),
        ("10.1.2.3/8", True),
        ("192.0.2.1", True),
        ("fd00::/8", True),
        ("::1", True),
        ("10.0.0.0/33", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_parse_network(text: str, valid: bool) -> None:
    assert (parse_network(text) is not None) is valid
