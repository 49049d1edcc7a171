"""Exception types shared by every layer; they import nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass


class FilterdError(Exception):
    """Base of every error filterd raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One located problem in a config or rule file (1-based line and column)."""

    source: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.col}: {self.message}"


class ConfigError(FilterdError):
    """Invalid configuration or rules: carries every problem found, each with a location."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, source: str, line: int, col: int, message: str) -> ConfigError:
        return cls([Problem(source, line, col, message)])


class StartupError(FilterdError):
    """The daemon cannot start as configured: a listening port is taken, a state folder cannot
    be made. The message says which step failed and why, in one line; ``transient`` when a
    later try may succeed (an address not configured yet at boot)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class RelayError(FilterdError):
    """The next hop could not take the message; ``reason`` is a bounded metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class QuarantineError(FilterdError):
    """The quarantine store could not write or read an entry."""
