"""Shape checks shared by the rule-file parsers: types, keys, sizes, all as located problems.

Every helper reports into a ``Problems`` collector and returns None (or a neutral value) on
error instead of raising, so a file's parser keeps going and the admin sees every problem of
the file in one run.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from typing import Any

from filterd.errors import Problem
from filterd.yamlsrc import Pos, YamlMap, YamlSeq

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
HEADER_NAME_RE = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'


class Problems:
    """Collects located problems while a whole rule set is parsed."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, pos: Pos, message: str) -> None:
        self.items.append(pos.problem(message))

    def __bool__(self) -> bool:
        return bool(self.items)


def describe_type(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def suggestion(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_keys(mapping: YamlMap, allowed: Iterable[str], problems: Problems, where: str) -> bool:
    """Report every key of ``mapping`` not in ``allowed``; True when all keys are known."""
    allowed_list = list(allowed)
    ok = True
    for key in mapping:
        if key not in allowed_list:
            ok = False
            problems.add(
                mapping.key_at(key),
                f"unknown key '{key}' in {where}{suggestion(key, allowed_list)}",
            )
    return ok


def as_map(value: Any, pos: Pos, problems: Problems, what: str) -> YamlMap | None:
    if isinstance(value, YamlMap):
        return value
    problems.add(pos, f"{what} must be a mapping, got {describe_type(value)}")
    return None


def as_seq(value: Any, pos: Pos, problems: Problems, what: str) -> YamlSeq | None:
    if isinstance(value, YamlSeq):
        return value
    problems.add(pos, f"{what} must be a list, got {describe_type(value)}")
    return None


def as_str(
    value: Any, pos: Pos, problems: Problems, what: str, *, allow_empty: bool = False
) -> str | None:
    if not isinstance(value, str):
        problems.add(pos, f"{what} must be a string, got {describe_type(value)}")
        return None
    if not allow_empty and value == "":
        problems.add(pos, f"{what} must not be empty")
        return None
    return value


def as_bool(value: Any, pos: Pos, problems: Problems, what: str) -> bool | None:
    if isinstance(value, bool):
        return value
    problems.add(pos, f"{what} must be true or false, got {describe_type(value)}")
    return None


def as_number(value: Any, pos: Pos, problems: Problems, what: str) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.add(pos, f"{what} must be a number, got {describe_type(value)}")
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        problems.add(pos, f"{what} must be a finite number")
        return None
    return number


def as_str_list(
    value: Any, pos: Pos, problems: Problems, what: str, *, allow_empty: bool = False
) -> list[tuple[str, Pos]] | None:
    """A string or a list of strings, each with its own position."""
    if isinstance(value, str):
        checked = as_str(value, pos, problems, what, allow_empty=allow_empty)
        return None if checked is None else [(checked, pos)]
    if not isinstance(value, YamlSeq):
        problems.add(
            pos, f"{what} must be a string or a list of strings, got {describe_type(value)}"
        )
        return None
    if not value:
        problems.add(pos, f"{what} must not be an empty list")
        return None
    out: list[tuple[str, Pos]] = []
    ok = True
    for index, item in enumerate(value):
        checked = as_str(
            item, value.at(index), problems, f"each entry of {what}", allow_empty=allow_empty
        )
        if checked is None:
            ok = False
        else:
            out.append((checked, value.at(index)))
    return out if ok else None


def as_size(value: Any, pos: Pos, problems: Problems, what: str) -> int | None:
    """Bytes: an integer, or a number with a K / M / G suffix (1K = 1024)."""
    if isinstance(value, bool):
        problems.add(pos, f"{what} must be a size such as 500K or 10M, got true/false")
        return None
    if isinstance(value, int):
        if value < 0:
            problems.add(pos, f"{what} must not be negative")
            return None
        return value
    if isinstance(value, str):
        found = _SIZE_RE.match(value)
        size = float(found.group(1)) * _UNITS[found.group(2).lower()] if found else math.nan
        if math.isfinite(size):
            return int(size)
        if found:
            problems.add(pos, f"{what}: size '{value[:40]}' is too large")
            return None
        problems.add(pos, f"{what}: bad size '{value}' (use bytes or a K / M / G suffix, e.g. 10M)")
        return None
    problems.add(pos, f"{what} must be a size such as 500K or 10M, got {describe_type(value)}")
    return None


def header_name(value: Any, pos: Pos, problems: Problems, what: str) -> str | None:
    text = as_str(value, pos, problems, what)
    if text is None:
        return None
    if not HEADER_NAME_RE.fullmatch(text):
        problems.add(
            pos,
            f"{what}: '{text}' is not a valid header name (printable ASCII without spaces or ':')",
        )
        return None
    return text
