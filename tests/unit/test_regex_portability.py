"""filterd's own regexes mean the same on every Python it supports.

Python before 3.11.5 matches possessive quantifiers (``x*+``, ``x++``, ``x?+``, ``x{m,n}+``)
wrongly when what they repeat can backtrack (CPython gh-100061, gh-106052), and Debian 12's
python3 is 3.11.2: there the header-section pattern read the first body line of a message
without a blank line as part of a header. The atomic group ``(?>x*)`` means the same and is
matched correctly everywhere, so filterd writes that instead.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest

import filterd


def possessive_quantifiers(pattern: str | bytes) -> list[int]:
    """Offsets of the possessive quantifiers in a pattern (escapes and classes skipped)."""
    text = pattern.decode("latin-1") if isinstance(pattern, bytes) else pattern
    found = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            i += 1
            if text[i : i + 1] == "^":
                i += 1
            if text[i : i + 1] == "]":
                i += 1
            while i < len(text) and text[i] != "]":
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        following = text[i + 1 : i + 2]
        if char in "*+?}" and following == "+" and not (char == "?" and text[i - 1] == "("):
            found.append(i)
        i += 1
    return found


def filterd_patterns() -> dict[str, re.Pattern[str] | re.Pattern[bytes]]:
    patterns = {}
    for module_info in pkgutil.walk_packages(filterd.__path__, "filterd."):
        if module_info.name == "filterd.__main__":
            continue  # importing it runs the command line
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if isinstance(value, re.Pattern):
                patterns[f"{module_info.name}.{name}"] = value
    return patterns


@pytest.mark.parametrize(
    ("pattern", "offsets"),
    [
        (r"a*+b", [1]),
        (rb"(?:x|y)++", [7]),
        (r"a{2,3}+", [5]),
        (r"\++", []),  # an escaped plus, repeated
        (r"[*+]+", []),  # a class holding quantifier characters
        (r"(?>a*)b", []),
        (r"(?:a)?+", [5]),
    ],
)
def test_the_scanner_finds_possessive_quantifiers(pattern: str, offsets: list[int]) -> None:
    assert possessive_quantifiers(pattern) == offsets


def test_no_filterd_regex_uses_a_possessive_quantifier() -> None:
    patterns = filterd_patterns()
    assert len(patterns) > 20  # the MIME parsers' patterns were found
    offenders = {
        name: pattern.pattern
        for name, pattern in patterns.items()
        if possessive_quantifiers(pattern.pattern)
    }
    assert offenders == {}


def test_a_body_line_after_headers_is_not_a_header() -> None:
    # The case Python 3.11.2 got wrong with the possessive form of the header-section pattern.
    from filterd.mime_headers import split_section

    raw = b"Subject: x\nthis line is not a header\nmore\n"
    fields, header_end, body_start = split_section(raw, 0, len(raw))
    assert fields == [("Subject", "x")]
    assert raw[:header_end] == b"Subject: x\n"
    assert body_start == header_end
