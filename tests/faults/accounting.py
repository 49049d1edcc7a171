"""The accounting invariant of the fault tests: what the client was told about each message
against where the message went.

Every test message carries a token in its Message-ID (``<token@faults.test>``). The client side
keeps a ``Ledger`` of every attempt's reply; ``census`` finds each token at the next hop, in the
quarantine folder and in the discard log lines; ``balance`` compares them:

- lost: the client got 250 and the message is nowhere (must never happen);
- duplicated: more than one outcome for one token;
- explained duplicates: a 4xx attempt that the next hop delivered anyway (its final reply came
  after filterd gave up, the unavoidable SMTP race of RFC 1047) and a retry that delivered again;
- unacknowledged outcomes: delivered though the client never got a 250 (same race, no retry).
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.faultclient import Samples, by_label
from tests.support.nexthop import NextHop

DOMAIN = "faults.test"
_TOKEN = re.compile(
    rb"^Message-ID:[ \t]*<([A-Za-z0-9._-]+)@faults\.test>", re.IGNORECASE | re.MULTILINE
)
ACTIONS = ("accept", "tag", "redirect", "quarantine", "discard", "reject", "tempfail")


def message(
    token: str, subject: str = "fault test", body: bytes = b"", extra_headers: bytes = b""
) -> bytes:
    """A small CRLF message whose Message-ID carries ``token``."""
    return (
        f"From: Sender <sender@example.org>\r\nTo: rcpt@example.net\r\nSubject: {subject}\r\n"
        f"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{token}@{DOMAIN}>\r\n".encode()
        + extra_headers
        + b"\r\n"
        + (body or f"body of {token}\r\n".encode())
    )


def token_of(raw: bytes) -> str | None:
    match = _TOKEN.search(raw[: 65536 + 4096])
    return match.group(1).decode() if match else None


@dataclass(frozen=True)
class Attempt:
    """One try at sending a message: the stage the transaction ended at and the reply code
    (0 when the connection broke without a reply)."""

    stage: str  # "connect", "mail", "rcpt", "data", "final"
    code: int

    @property
    def acknowledged(self) -> bool:
        return self.stage == "final" and self.code == 250


@dataclass
class Ledger:
    """The client's side of the books, safe to share between client threads."""

    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    kinds: dict[str, str] = field(
        default_factory=dict
    )  # token -> "relay" / "quarantine" / "discard"
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, token: str, kind: str = "relay") -> None:
        with self._lock:
            self.kinds[token] = kind
            self.attempts.setdefault(token, [])

    def record(self, token: str, stage: str, code: int) -> None:
        with self._lock:
            self.attempts.setdefault(token, []).append(Attempt(stage, code))

    def acknowledged(self) -> set[str]:
        with self._lock:
            return {t for t, tries in self.attempts.items() if any(a.acknowledged for a in tries)}

    def final_replies(self) -> Counter[int]:
        """Replies to the end of data, by code: these are what filterd's metrics count."""
        with self._lock:
            return Counter(
                a.code for tries in self.attempts.values() for a in tries if a.stage == "final"
            )

    def tried_after_4xx(self, token: str) -> bool:
        with self._lock:
            return any(400 <= a.code < 500 or a.code == 0 for a in self.attempts.get(token, []))

    def vanished_after_data(self, token: str) -> int:
        """Attempts whose connection died after the data was sent (the outcome is unknown)."""
        with self._lock:
            return sum(
                1 for a in self.attempts.get(token, []) if a.stage == "final" and a.code == 0
            )

    def acknowledged_by_kind(self) -> Counter[str]:
        acked = self.acknowledged()
        with self._lock:
            return Counter(self.kinds.get(t, "relay") for t in acked)


@dataclass(frozen=True)
class Census:
    """Where the tokens ended up."""

    delivered: Counter[str]  # at the next hop
    late: Counter[str]  # of those, delivered by a transaction whose final reply came too late
    quarantined: Counter[str]
    discarded: Counter[str]

    def outcomes(self, token: str) -> int:
        return self.delivered[token] + self.quarantined[token] + self.discarded[token]


def quarantined_tokens(folder: Path) -> Counter[str]:
    """Tokens of the complete entries: an ``.eml`` without its ``.json`` is a write that never
    finished (the daemon died in between) and was never acknowledged."""
    found: Counter[str] = Counter()
    if folder.is_dir():
        for eml in folder.glob("*.eml"):
            if not eml.with_suffix(".json").exists():
                continue
            token = token_of(eml.read_bytes())
            if token:
                found[token] += 1
    return found


def discarded_tokens(log_lines: Iterable[dict[str, Any]]) -> Counter[str]:
    found: Counter[str] = Counter()
    for line in log_lines:
        if line.get("event") == "message_processed" and line.get("action") == "discard":
            match = re.fullmatch(
                r"<([A-Za-z0-9._-]+)@faults\.test>", str(line.get("message_id") or "")
            )
            if match:
                found[match.group(1)] += 1
    return found


def census(hop: NextHop, quarantine: Path, log_lines: Iterable[dict[str, Any]]) -> Census:
    delivered: Counter[str] = Counter()
    late: Counter[str] = Counter()
    for received in list(hop.messages):
        token = token_of(received.data)
        if token is None:
            continue
        delivered[token] += 1
        if received.fault is not None and received.fault.kind == "late":
            late[token] += 1
    return Census(delivered, late, quarantined_tokens(quarantine), discarded_tokens(log_lines))


class CensusWatch:
    """An incremental census for a long-running daemon: each ``update`` reads only the log lines,
    next-hop messages and quarantine files that are new since the last one (fuzz runs call it
    after every example, so a full re-read would grow with the square of the run)."""

    def __init__(self, hop: NextHop, quarantine: Path, log_path: Path) -> None:
        self.hop, self.quarantine, self.log_path = hop, quarantine, log_path
        self.census = Census(Counter(), Counter(), Counter(), Counter())
        self.internal_errors: list[dict[str, Any]] = []
        self._offset = 0
        self._hop_index = 0
        self._files: set[str] = set()

    def update(self) -> Census:
        messages = list(self.hop.messages)
        for received in messages[self._hop_index :]:
            token = token_of(received.data)
            if token:
                self.census.delivered[token] += 1
                if received.fault is not None and received.fault.kind == "late":
                    self.census.late[token] += 1
        self._hop_index = len(messages)
        if self.quarantine.is_dir():
            for eml in self.quarantine.glob("*.eml"):
                if eml.name not in self._files and eml.with_suffix(".json").exists():
                    self._files.add(eml.name)
                    token = token_of(eml.read_bytes())
                    if token:
                        self.census.quarantined[token] += 1
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        lines = []
        for raw in complete.splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        self.census.discarded.update(discarded_tokens(lines))
        self.internal_errors += [
            line for line in lines if line.get("event") in ("session_error", "message_failed")
        ]
        return self.census


@dataclass(frozen=True)
class Balance:
    acknowledged: int
    lost: tuple[str, ...]
    unexplained_duplicates: tuple[str, ...]
    explained_duplicates: tuple[str, ...]
    unacknowledged_outcomes: tuple[str, ...]  # delivered late, client never got a 250
    unexplained_outcomes: tuple[str, ...]  # an outcome for a message the client was refused

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexplained_duplicates or self.unexplained_outcomes)

    def __str__(self) -> str:
        return (
            f"acknowledged={self.acknowledged} lost={len(self.lost)} {list(self.lost)[:5]} "
            f"unexplained duplicates={list(self.unexplained_duplicates)[:5]} "
            f"explained duplicates={len(self.explained_duplicates)} "
            f"late, unacknowledged={len(self.unacknowledged_outcomes)} "
            f"unexplained outcomes={list(self.unexplained_outcomes)[:5]}"
        )


def balance(
    ledger: Ledger, seen: Census, tokens: Iterable[str] | None = None, *, crash: bool = False
) -> Balance:
    """Check the invariant for ``tokens`` (default: every token in the ledger).

    Extra copies are explained only by a late final reply (the next hop's fault), or, with
    ``crash``, by an attempt whose connection died after its data was sent (a killed process).
    """
    acked = ledger.acknowledged()
    lost: list[str] = []
    dup_bad: list[str] = []
    dup_ok: list[str] = []
    unacked: list[str] = []
    bad: list[str] = []
    for token in sorted(tokens if tokens is not None else ledger.attempts):
        outcomes = seen.outcomes(token)
        unknown = seen.late[token] + (ledger.vanished_after_data(token) if crash else 0)
        if token in acked:
            if outcomes == 0:
                lost.append(token)
            elif outcomes > 1:
                # Only a copy whose acknowledgement never reached the client, followed by the
                # client's retry, may deliver a message twice (RFC 1047).
                (
                    dup_ok if unknown >= outcomes - 1 and ledger.tried_after_4xx(token) else dup_bad
                ).append(token)
        elif outcomes:
            (unacked if unknown >= outcomes else bad).append(token)
    return Balance(
        len(acked), tuple(lost), tuple(dup_bad), tuple(dup_ok), tuple(unacked), tuple(bad)
    )


def messages_by_action(samples: Samples) -> Counter[str]:
    counts = by_label(samples, "filterd_messages_total", "action")
    return Counter({action: int(counts.get(action, 0.0)) for action in ACTIONS})


def delta(after: Counter[str], before: Counter[str]) -> Counter[str]:
    return Counter(
        {
            key: after[key] - before[key]
            for key in set(after) | set(before)
            if after[key] - before[key]
        }
    )
