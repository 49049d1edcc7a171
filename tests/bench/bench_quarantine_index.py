"""Benchmark: the quarantine index with 100,000 entries (not collected by pytest).

Rows are inserted straight into the index (no message files), then the operations the CLI and
the daemon use are timed: count, a page of the newest entries, the whole listing, the purge
query and the resync snapshot. ``--files N`` also writes N real entries through the store and
times opening it (the resync scan every ``filterd quarantine`` command does).

    python tests/bench/bench_quarantine_index.py [--entries 100000] [--files 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from filterd.actions.quarantine import Entry, EntryStatus, QuarantineStore
from filterd.actions.quarantine_index import QuarantineIndex
from filterd.model import Action, Envelope, Message, Verdict


def _timed(label: str, fn: Callable[[], Any], repeat: int = 3) -> Any:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    print(f"{label:<40} {best * 1000:9.1f} ms")
    return result


def _meta(n: int, start: datetime) -> dict[str, Any]:
    moment = start + timedelta(seconds=n * 26)
    return Entry(
        id=f"{moment:%Y%m%dT%H%M%SZ}-{n:08x}",
        date=moment,
        sender=f"sender{n}@example.org",
        recipients=(f"rcpt{n}@example.net",),
        subject=f"Subject number {n} of the bench",
        size=5000 + n % 9000,
        rule="executable-attachment",
        reason="executable attachment",
        action="quarantine",
        score=12.5,
        status=EntryStatus.QUARANTINED,
        client_ip="192.0.2.1",
        helo="mx.example.org",
        queue_id=f"Q{n}",
    ).to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        index = QuarantineIndex(folder)
        start = datetime(2026, 1, 1, tzinfo=UTC)
        rows = [_meta(n, start) for n in range(args.entries)]
        _timed(f"insert {args.entries} rows (one txn)", lambda: index.replace(rows, []), 1)
        _timed("count()", index.count)
        _timed("count(status)", lambda: index.count("quarantined"))
        _timed("page(limit=50) newest", lambda: index.page(50))
        _timed("page(limit=50, offset=50000)", lambda: index.page(50, 50_000))
        _timed("page() all entries", index.page, 1)
        cutoff = f"{start + timedelta(days=15):%Y-%m-%dT%H:%M:%SZ}"
        _timed("ids_before(day 15)", lambda: index.ids_before(cutoff))
        _timed("snapshot() (resync on open)", index.snapshot)
        _timed("upsert one row", lambda: index.upsert(rows[0]), 20)
        index.close()
    if args.files:
        with tempfile.TemporaryDirectory() as tmp:
            store = QuarantineStore(tmp)
            verdict = Verdict(action=Action.QUARANTINE, score=12.0)
            envelope = Envelope("a@example.org", ("b@example.net",))
            raw = b"Subject: bench\r\n\r\n" + b"x" * 2000
            _timed(
                f"store() x {args.files} (fsync'ed)",
                lambda: [
                    store.store(Message(envelope, raw), verdict, rule="r", reason="")
                    for _ in range(args.files)
                ],
                1,
            )
            store.close()
            _timed(f"open store with {args.files} entries", lambda: QuarantineStore(tmp).close())


if __name__ == "__main__":
    main()
