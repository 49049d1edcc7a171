"""The quarantine store: one ``.eml`` (the original bytes) and one ``.json`` (envelope, verdict,
trace, status) per entry under ``quarantine.path``, plus an SQLite index to list them fast.

Durability is the contract: ``store`` returns only once both files are written to a temporary
name, fsync'ed, renamed into place and the folder fsync'ed, the ``.eml`` before the ``.json``. The
``.json`` marks an entry complete; an ``.eml`` without one is a write that never finished (it is
ignored, and removed once older than an hour, so a concurrent writer is never raced). Any
``OSError`` becomes ``QuarantineError``, which the daemon answers with ``451 4.3.0``: nothing is
acknowledged that is not on disk. Folders are created 0700 and files 0600 whatever the umask;
what root creates in a folder of another user's (the CLI run as root) goes to that user, so the
daemon, running as that user, can still read and replace it.

The index is a cache of the ``.json`` files: it is created, resynchronised or rebuilt from them
when it is missing, stale (a crash between a file and its index row) or corrupt. Opening a
store compares the names in the folder with the index; a ``.json`` edited by hand is only seen
after ``rebuild_index``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import structlog

from filterd.actions.quarantine_index import (
    Entry,
    EntryStatus,
    IndexCorruptError,
    QuarantineIndex,
    iso_utc,
)
from filterd.errors import QuarantineError
from filterd.folders import Owner, folder_owner, fsync_dir, give_to, make_private_folder
from filterd.model import Message, Verdict

__all__ = [
    "ENTRY_ID_RE",
    "Entry",
    "EntryNotFoundError",
    "EntryStatus",
    "QuarantineStore",
    "run_retention",
    "track_size",
]

log = structlog.stdlib.get_logger(__name__)

ENTRY_ID_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
_FILE_MODE = 0o600
_ORPHAN_GRACE = timedelta(hours=1)
_HEADER_SCAN_LIMIT = 65536
_SUBJECT_LIMIT = 998


class EntryNotFoundError(QuarantineError):
    """No entry has this id (or the id is not a valid entry id)."""


def _headers_of(raw: bytes) -> tuple[str, str]:
    """Subject and Message-ID, decoded, from the header block only (the body is never parsed)."""
    head = raw[:_HEADER_SCAN_LIMIT]
    match = re.search(rb"\r?\n\r?\n", head)
    if match:
        head = head[: match.end()]
    try:
        parsed = BytesHeaderParser(policy=default_policy).parsebytes(head)
        subject = str(parsed.get("Subject", "") or "")
        message_id = str(parsed.get("Message-ID", "") or "")
    except Exception:  # cosmetic metadata must never stop a message from being stored
        return "", ""
    return subject[:_SUBJECT_LIMIT], message_id.strip()[:_SUBJECT_LIMIT]


def _write_atomic(folder: Path, name: str, data: bytes, owner: Owner | None) -> None:
    """Write ``folder/name`` via a fsync'ed temporary file and a rename; the file goes to
    ``owner`` when one is given (see ``folder_owner``)."""
    tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, _FILE_MODE)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)  # the umask may have taken bits from the open() mode
            give_to(fd, owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class QuarantineStore:
    """The quarantine folder. Synchronous: the daemon calls it through ``asyncio.to_thread``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stale = False
        # Resyncs and rebuilds swap or bulk-edit the index: one at a time per process.
        self._sync_lock = threading.RLock()
        try:
            make_private_folder(self.path)
            self._owner = folder_owner(self.path)
            self._index = self._open_index()
        except (OSError, sqlite3.Error, IndexCorruptError) as exc:
            raise QuarantineError(f"cannot open quarantine {self.path}: {exc}") from exc

    # --- index upkeep -------------------------------------------------------------------------

    def _open_index(self) -> QuarantineIndex:
        try:
            self._index = QuarantineIndex(self.path)
            self._sync(full=self._index.created)
        except IndexCorruptError as exc:
            log.warning("quarantine_index_corrupt", path=str(self.path), error=str(exc))
            if hasattr(self, "_index"):
                self._index.close()
            QuarantineIndex.remove_files(self.path)
            self._index = QuarantineIndex(self.path)
            self._sync(full=True)
        return self._index

    def _scan(self) -> set[str]:
        """Ids of the complete entries on disk (names only: no stat per entry, so opening a
        store of 100,000 entries stays cheap); unfinished writes older than an hour removed."""
        jsons: set[str] = set()
        emls: set[str] = set()
        temps: list[Path] = []
        with os.scandir(self.path) as it:
            for item in it:
                stem, dot, ext = item.name.partition(".")
                if not dot:
                    continue
                if not stem and item.name.endswith(".tmp"):
                    temps.append(Path(item.path))
                elif ext == "json" and ENTRY_ID_RE.fullmatch(stem):
                    jsons.add(stem)
                elif ext == "eml" and ENTRY_ID_RE.fullmatch(stem):
                    emls.add(stem)
        leftovers = temps + [self.path / f"{i}.eml" for i in emls - jsons]
        cutoff = time.time() - _ORPHAN_GRACE.total_seconds()
        for orphan in leftovers:
            with contextlib.suppress(FileNotFoundError):
                if orphan.stat().st_mtime < cutoff:
                    orphan.unlink()
                    log.info("quarantine_orphan_removed", file=orphan.name)
        return jsons & emls

    def _sync(self, *, full: bool = False) -> int:
        """Bring the index in line with the folder: add what is missing, drop what is gone,
        re-read rows left pending by a crash (or every entry when ``full``)."""
        on_disk = self._scan()
        indexed = {} if full else self._index.snapshot()
        upserts = []
        for entry_id in sorted(on_disk):
            if indexed.get(entry_id, True):  # missing (None -> True) or pending
                meta = self._try_load_meta(entry_id)
                if meta is not None:
                    upserts.append(meta)
        removals = [i for i in indexed if i not in on_disk]
        if full or upserts or removals:
            self._index.replace(upserts, removals, clear=full)
            log.info(
                "quarantine_index_synced",
                path=str(self.path),
                rebuilt=full,
                updated=len(upserts),
                removed=len(removals),
                entries=len(on_disk),
            )
        self._stale = False
        return len(on_disk)

    def _follow_rebuild(self) -> None:
        """Reopen the index if another process rebuilt it, and resync from the files."""
        if self._index.replaced():
            with self._sync_lock:
                self._index.close()
                self._index = QuarantineIndex(self.path)
                self._stale = True

    def _indexed(self) -> QuarantineIndex:
        """The index, resynchronised first if a write to it failed or it turned out corrupt."""
        try:
            self._follow_rebuild()
            if self._stale:
                with self._sync_lock:
                    self._sync()
        except IndexCorruptError:
            self.rebuild_index()
        except (OSError, sqlite3.Error) as exc:
            raise QuarantineError(f"quarantine index {self._index.path}: {exc}") from exc
        return self._index

    def rebuild_index(self) -> int:
        """Recreate the index from the ``.json`` files; returns the number of entries."""
        try:
            with self._sync_lock:
                self._index.close()
                QuarantineIndex.remove_files(self.path)
                self._index = QuarantineIndex(self.path)
                return self._sync(full=True)
        except (OSError, sqlite3.Error, IndexCorruptError) as exc:
            raise QuarantineError(f"cannot rebuild quarantine index: {exc}") from exc

    def _index_call(self, name: str, *args: Any) -> None:
        """A write to the index after the files are safe: a failure only makes the index stale."""
        try:
            self._follow_rebuild()
            getattr(self._index, name)(*args)
        except (sqlite3.Error, IndexCorruptError) as exc:
            log.warning("quarantine_index_failed", path=str(self.path), error=str(exc))
            self._stale = True

    def _read(self, fn: str, *args: Any) -> Any:
        index = self._indexed()
        try:
            return getattr(index, fn)(*args)
        except IndexCorruptError:
            self.rebuild_index()
            return getattr(self._index, fn)(*args)
        except sqlite3.Error as exc:
            raise QuarantineError(f"quarantine index {index.path}: {exc}") from exc

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> QuarantineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- files ----------------------------------------------------------------------------------

    def _file(self, entry_id: str, ext: str) -> Path:
        if not isinstance(entry_id, str) or not ENTRY_ID_RE.fullmatch(entry_id):
            raise EntryNotFoundError(f"invalid quarantine id {entry_id!r}")
        return self.path / f"{entry_id}.{ext}"

    def _load_meta(self, entry_id: str) -> dict[str, Any]:
        """The entry's ``.json``; ``EntryNotFoundError`` or ``QuarantineError`` otherwise."""
        try:
            data = self._file(entry_id, "json").read_bytes()
        except FileNotFoundError:
            raise EntryNotFoundError(f"no quarantine entry {entry_id}") from None
        except OSError as exc:
            raise QuarantineError(f"cannot read quarantine entry {entry_id}: {exc}") from exc
        try:
            meta = dict(json.loads(data))
            Entry.from_dict(meta)  # validates the fields we rely on
        except (ValueError, KeyError, TypeError) as exc:
            raise QuarantineError(f"quarantine entry {entry_id} is unreadable: {exc}") from exc
        return meta

    def _try_load_meta(self, entry_id: str) -> dict[str, Any] | None:
        """For resyncs: an entry that vanished or cannot be read is skipped (and logged)."""
        try:
            return self._load_meta(entry_id)
        except EntryNotFoundError:
            return None
        except QuarantineError as exc:
            log.warning("quarantine_entry_unreadable", id=entry_id, error=str(exc))
            return None

    def _new_id(self, now: datetime) -> str:
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        while True:
            entry_id = f"{stamp}-{secrets.token_hex(4)}"
            if not (self.path / f"{entry_id}.eml").exists():
                return entry_id

    # --- operations ----------------------------------------------------------------------------

    def store(
        self,
        message: Message,
        verdict: Verdict,
        *,
        rule: str,
        reason: str,
        now: datetime | None = None,
    ) -> str:
        """Write an entry durably and return its id; ``QuarantineError`` if it is not on disk."""
        now = now or datetime.now(UTC)
        env = message.envelope
        subject, message_id = _headers_of(message.raw)
        entry = Entry(
            id="",
            date=now,
            sender=env.sender,
            recipients=env.recipients,
            subject=subject,
            size=message.size,
            rule=rule,
            reason=reason,
            action=verdict.action.value,
            score=verdict.score,
            status=EntryStatus.QUARANTINED,
            client_ip=env.client_ip,
            client_name=env.client_name,
            helo=env.helo,
            queue_id=env.queue_id,
            message_id=message_id,
            rules=verdict.rules,
            trace=tuple(verdict.trace),
            sha256=hashlib.sha256(message.raw).hexdigest(),
        )
        written: list[Path] = []
        try:
            entry_id = self._new_id(now)
            meta = entry.to_dict() | {"id": entry_id}
            data = json.dumps(meta, indent=2).encode("ascii")
            _write_atomic(self.path, f"{entry_id}.eml", message.raw, self._owner)
            written.append(self.path / f"{entry_id}.eml")
            fsync_dir(self.path)  # the message is on disk before anything says it is complete
            written.append(self.path / f"{entry_id}.json")
            _write_atomic(self.path, f"{entry_id}.json", data, self._owner)
            fsync_dir(self.path)
        except (OSError, ValueError) as exc:
            for path in reversed(written):  # leave no half entry behind
                with contextlib.suppress(OSError):
                    path.unlink()
            log.error(
                "quarantine_store_failed",
                path=str(self.path),
                queue_id=env.queue_id,
                error=str(exc),
            )
            raise QuarantineError(f"cannot write quarantine entry in {self.path}: {exc}") from exc
        self._index_call("upsert", meta)
        log.info(
            "quarantine_stored",
            id=entry_id,
            queue_id=env.queue_id,
            rule=rule,
            size=message.size,
        )
        return entry_id

    def list(
        self, limit: int | None = None, offset: int = 0, *, status: EntryStatus | None = None
    ) -> list[Entry]:
        """Entries, newest first, without their trace."""
        rows = self._read("page", limit, offset, status.value if status else None)
        return [Entry.from_dict(row) for row in rows]

    def count(self, status: EntryStatus | None = None) -> int:
        return int(self._read("count", status.value if status else None))

    def get(self, entry_id: str) -> Entry:
        """The entry with its trace, read from its ``.json`` (the truth, not the index)."""
        self._file(entry_id, "json")
        if not self._file(entry_id, "eml").exists():
            raise EntryNotFoundError(f"no quarantine entry {entry_id}")
        return Entry.from_dict(self._load_meta(entry_id))

    def read_message(self, entry_id: str) -> bytes:
        """The original message bytes, checked against the digest taken when it was stored."""
        entry = self.get(entry_id)
        try:
            raw = self._file(entry_id, "eml").read_bytes()
        except FileNotFoundError:
            raise EntryNotFoundError(f"no quarantine entry {entry_id}") from None
        except OSError as exc:
            raise QuarantineError(f"cannot read quarantine entry {entry_id}: {exc}") from exc
        if entry.sha256 and hashlib.sha256(raw).hexdigest() != entry.sha256:
            raise QuarantineError(f"quarantine entry {entry_id}: message does not match its digest")
        return raw

    def mark_released(
        self, entry_id: str, to: Sequence[str], *, now: datetime | None = None
    ) -> None:
        """Record a successful release (atomically rewrites the ``.json``)."""
        self._file(entry_id, "json")  # a valid id before it reaches the index
        self._index_call("set_pending", entry_id)  # a crash from here on: the row is re-read
        meta = self._load_meta(entry_id)
        moment = now or datetime.now(UTC)
        meta |= {
            "status": EntryStatus.RELEASED.value,
            "released_at": iso_utc(moment),
            "released_to": list(to),
        }
        try:
            data = json.dumps(meta, indent=2).encode("ascii")
            _write_atomic(self.path, f"{entry_id}.json", data, self._owner)
            fsync_dir(self.path)
        except OSError as exc:
            raise QuarantineError(f"cannot update quarantine entry {entry_id}: {exc}") from exc
        self._index_call("upsert", meta)
        log.info("quarantine_released", id=entry_id, recipients=len(to))

    def _unlink_entry(self, entry_id: str) -> None:
        """The ``.json`` first, so a crash leaves an orphan ``.eml``, never a half entry."""
        try:
            self._file(entry_id, "json").unlink()
        except FileNotFoundError:
            raise EntryNotFoundError(f"no quarantine entry {entry_id}") from None
        except OSError as exc:
            raise QuarantineError(f"cannot delete quarantine entry {entry_id}: {exc}") from exc
        try:
            self._file(entry_id, "eml").unlink(missing_ok=True)
        except OSError as exc:  # the entry is gone; the orphan .eml goes with a later resync
            log.warning("quarantine_delete_incomplete", id=entry_id, error=str(exc))

    def delete(self, entry_id: str) -> None:
        """Remove an entry (both files and its index row)."""
        self._unlink_entry(entry_id)
        with contextlib.suppress(OSError):  # durability of a deletion is a nicety, not a promise
            fsync_dir(self.path)
        self._index_call("remove", entry_id)
        log.info("quarantine_deleted", id=entry_id)

    def purge(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Delete the entries stored more than ``older_than`` ago; returns how many.

        One folder fsync and one index transaction for the lot, not one per entry: a crash
        mid-purge at worst brings back entries that the next purge removes again.
        """
        cutoff = (now or datetime.now(UTC)) - older_than
        purged: list[str] = []
        for entry_id in self._read("ids_before", iso_utc(cutoff)):
            with contextlib.suppress(EntryNotFoundError):  # deleted meanwhile by someone else
                self._unlink_entry(entry_id)
                purged.append(entry_id)
        if purged:
            with contextlib.suppress(OSError):
                fsync_dir(self.path)
            self._index_call("replace", [], purged)
        log.info(
            "quarantine_purged",
            count=len(purged),
            older_than_s=int(older_than.total_seconds()),
            cutoff=iso_utc(cutoff),
        )
        return len(purged)


async def run_retention(
    open_store: Callable[[], QuarantineStore],
    retention: timedelta,
    *,
    interval: float = 3600.0,
    on_count: Callable[[int], None] | None = None,
) -> None:
    """Purge entries past ``retention`` now and every ``interval`` seconds until cancelled;
    after each pass ``on_count`` gets the number of entries left (for the size gauge). The
    store is opened (``open_store``) at the first pass that can.

    A failing pass is logged and tried again at the next interval: retention is housekeeping,
    never stops the daemon, and never stops for good either.
    """
    store: QuarantineStore | None = None
    while True:
        try:
            if store is None:  # an unusable folder (a mount not up yet) is tried again
                store = await asyncio.to_thread(open_store)
            await asyncio.to_thread(store.purge, retention)
            if on_count is not None:
                on_count(await asyncio.to_thread(store.count))
        except Exception as exc:  # housekeeping: whatever fails, the next pass tries again
            log.error("quarantine_purge_failed", error=repr(exc), exc_info=exc)
        await asyncio.sleep(interval)


async def track_size(
    open_store: Callable[[], QuarantineStore],
    on_count: Callable[[int], None],
    *,
    interval: float,
) -> None:
    """Count the entries now and every ``interval`` seconds until cancelled, and hand the
    number to ``on_count`` (the size gauge).

    Entries also go away outside the daemon (the CLI's delete, purge and release), and the
    process that stored the last one may have been restarted since: only counting the store
    itself keeps the gauge true. A count is one query on the index, cheap at any size.
    A failing count is logged once until one succeeds again; the gauge keeps its value.
    """
    store: QuarantineStore | None = None
    failing = False
    while True:
        try:
            if store is None:  # an unusable folder (a mount not up yet) is tried again
                store = await asyncio.to_thread(open_store)
            on_count(await asyncio.to_thread(store.count))
            failing = False
        except Exception as exc:  # the gauge only: the next pass tries again
            if not failing:
                log.warning("quarantine_count_failed", error=repr(exc))
            failing = True
        await asyncio.sleep(interval)
