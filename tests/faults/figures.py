"""The figures the fault suite reports at the end of a run (issue: faults exercised, messages
soaked, messages lost, fuzz cases run): tests ``record`` them, the conftest prints them."""

from __future__ import annotations

from collections import Counter
from typing import Any

FIGURES: dict[str, dict[str, Any]] = {}


def record(section: str, **values: Any) -> None:
    """Add ``values`` to ``section`` (numbers are summed over calls, anything else replaced)."""
    current = FIGURES.setdefault(section, {})
    for key, value in values.items():
        if isinstance(value, int | float) and isinstance(current.get(key), int | float):
            current[key] += value
        else:
            current[key] = value


def count(section: str, counter: Counter[str]) -> None:
    record(section, **dict(counter))
