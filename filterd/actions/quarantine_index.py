"""Quarantine entries: their metadata (``Entry``, as each entry's ``.json`` holds it) and the
index, an SQLite cache (WAL mode) of that metadata for fast listing.

The ``.json`` files of the store are the truth; this index only makes ``list``, ``count`` and
``purge`` fast with 100,000 entries. Each row keeps the entry's metadata without its trace
(which can be large). A row is flagged ``pending`` while its ``.json`` is being rewritten, so
that after a crash the store knows which rows to re-read without reading (or even stat'ing)
every file: only the set of names in the folder and the pending rows need checking.

Thread-safe: one connection, one lock (the daemon stores from worker threads). Several processes
(daemon and ``filterd quarantine`` commands) may share the file; SQLite's WAL mode and a busy
timeout serialise them.

Also who owns what root creates in a quarantine folder (``folder_owner``, ``give_to``): the
daemon runs as its own user, and a file an admin's root shell leaves behind as root's, mode
0600, is one the daemon can no longer open. So root hands every file it creates in a folder
that belongs to another user to that user, and the index files of such a folder too.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sqlite3
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filterd.folders import Owner, folder_owner, give_to
from filterd.mime_headers import without_surrogates
from filterd.model import Action, RuleTrace

__all__ = [
    "INDEX_NAME",
    "Entry",
    "EntryStatus",
    "IndexCorruptError",
    "QuarantineIndex",
    "iso_utc",
]

INDEX_NAME = "index.sqlite3"
_SCHEMA_VERSION = 3
_BUSY_TIMEOUT_MS = 10_000
_FILE_MODE = 0o600
_FORMAT = 1  # of the .json files
# The database and the files SQLite keeps beside it.
_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _adopt(path: Path, owner: Owner) -> None:
    """Give an existing regular file at ``path`` to ``owner`` if it is not already theirs:
    an index that an earlier version run as root left root's is repaired by root's next
    open, rather than failing every quarantined message until chowned by hand."""
    try:
        # O_NOFOLLOW: a symlink planted by the folder's owner must not make root chown its
        # target; O_NONBLOCK: a FIFO there must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # missing, or not a plain file: nothing to hand over
    try:
        found = os.fstat(fd)
        if stat.S_ISREG(found.st_mode) and (found.st_uid, found.st_gid) != owner:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)


# Plain columns rather than one JSON document: listing 100,000 rows then costs a row fetch each,
# not a JSON parse each. List-valued fields (addresses, rule names: no line breaks in either,
# SMTP is line-based) are stored one item per line.
_TEXT_COLUMNS = (
    "sender",
    "subject",
    "rule",
    "reason",
    "action",
    "client_ip",
    "client_name",
    "helo",
    "queue_id",
    "message_id",
    "sha256",
    "released_at",
)
_LIST_COLUMNS = ("recipients", "rules", "released_to")


def _storable(value: Any) -> Any:
    """``value`` as SQLite can store it. A sender's bytes that were not UTF-8 reach the entry
    as lone surrogates (the ``.json``, the truth, keeps them escaped); SQLite refuses them, and
    the resync of every later open would fail on that entry for good. The index, a listing
    aid, holds U+FFFD in their place."""
    return without_surrogates(value) if isinstance(value, str) else value


_COLUMNS = ("id", "date", "status", "size", "score", *_TEXT_COLUMNS, *_LIST_COLUMNS)
_SELECT = ", ".join(_COLUMNS)
# S608: every interpolated name below is one of the constant column names above.
_UPSERT = (
    f"INSERT OR REPLACE INTO entries ({_SELECT}, pending)"  # noqa: S608
    f" VALUES ({', '.join('?' for _ in _COLUMNS)}, 0)"
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    date TEXT NOT NULL,      -- ISO 8601 UTC with a Z: sorts as time
    status TEXT NOT NULL,
    size INTEGER NOT NULL,
    score REAL NOT NULL,
    {", ".join(f"{c} TEXT" for c in (*_TEXT_COLUMNS, *_LIST_COLUMNS))},
    pending INTEGER NOT NULL -- 1 while the .json is rewritten: re-read the row after a crash
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_date ON entries(date);
"""

Row = dict[str, Any]


class EntryStatus(enum.Enum):
    """Where an entry is in its life."""

    QUARANTINED = "quarantined"
    RELEASED = "released"


def iso_utc(moment: datetime) -> str:
    """The one date form of the store: ISO 8601 UTC with a Z, which sorts as time."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Entry:
    """One quarantined message's metadata. ``trace`` is read from the entry's file: entries
    that come from ``list`` carry an empty trace (the index does not keep it); ``get`` has it."""

    id: str
    date: datetime
    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    subject: str
    size: int
    rule: str
    reason: str
    action: str
    score: float
    status: EntryStatus
    client_ip: str | None = None
    client_name: str | None = None
    helo: str | None = None
    queue_id: str | None = None
    message_id: str = ""
    rules: tuple[str, ...] = ()
    trace: tuple[RuleTrace, ...] = ()
    sha256: str = ""
    released_at: datetime | None = None
    released_to: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> Entry:
        released_at = meta.get("released_at")
        return cls(
            id=str(meta["id"]),
            date=datetime.fromisoformat(str(meta["date"])),
            sender=str(meta.get("sender", "")),
            recipients=tuple(str(r) for r in meta.get("recipients", ())),
            subject=str(meta.get("subject", "")),
            size=int(meta.get("size", 0)),
            rule=str(meta.get("rule", "")),
            reason=str(meta.get("reason", "")),
            action=str(meta.get("action", "quarantine")),
            score=float(meta.get("score", 0.0)),
            status=EntryStatus(meta.get("status", "quarantined")),
            client_ip=meta.get("client_ip"),
            client_name=meta.get("client_name"),
            helo=meta.get("helo"),
            queue_id=meta.get("queue_id"),
            message_id=str(meta.get("message_id", "")),
            rules=tuple(str(r) for r in meta.get("rules", ())),
            trace=tuple(_trace_from_dict(t) for t in meta.get("trace", ())),
            sha256=str(meta.get("sha256", "")),
            released_at=datetime.fromisoformat(released_at) if released_at else None,
            released_to=tuple(str(r) for r in meta.get("released_to", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the ``.json`` file and ``quarantine list --json``)."""
        return {
            "format": _FORMAT,
            "id": self.id,
            "date": iso_utc(self.date),
            "status": self.status.value,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "client_ip": self.client_ip,
            "client_name": self.client_name,
            "helo": self.helo,
            "queue_id": self.queue_id,
            "message_id": self.message_id,
            "subject": self.subject,
            "size": self.size,
            "sha256": self.sha256,
            "rule": self.rule,
            "reason": self.reason,
            "action": self.action,
            "score": self.score,
            "rules": list(self.rules),
            "trace": [_trace_to_dict(t) for t in self.trace],
            "released_at": iso_utc(self.released_at) if self.released_at else None,
            "released_to": list(self.released_to),
        }


def _trace_to_dict(trace: RuleTrace) -> dict[str, Any]:
    return {
        "rule": trace.rule,
        "matched": trace.matched,
        "score": trace.score,
        "shadow": trace.shadow,
        "detail": trace.detail,
        "action": trace.action.value if trace.action else None,
    }


def _trace_from_dict(item: Mapping[str, Any]) -> RuleTrace:
    action = item.get("action")
    return RuleTrace(
        rule=str(item.get("rule", "")),
        matched=bool(item.get("matched", False)),
        score=float(item.get("score", 0.0)),
        shadow=bool(item.get("shadow", False)),
        detail=str(item.get("detail", "")),
        action=Action(action) if action else None,
    )


class IndexCorruptError(Exception):
    """The index file is not a usable database; the store deletes and rebuilds it."""


def _is_corruption(exc: sqlite3.Error) -> bool:
    # OperationalError covers "locked", "disk full", "read-only": real conditions to report.
    # Other DatabaseErrors ("file is not a database", "malformed") mean the cache is damaged.
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)


class QuarantineIndex:
    """The file ``<folder>/index.sqlite3``. Raises ``sqlite3.Error`` or ``IndexCorruptError``."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / INDEX_NAME
        self._lock = threading.Lock()
        self._owner = folder_owner(folder)
        self._created = not self.path.exists()
        self._conn = self._open()
        found = os.stat(self.path)
        self._identity = (found.st_dev, found.st_ino)

    def replaced(self) -> bool:
        """Whether the file at ``path`` is no longer the one this index has open: another
        process rebuilt the index (removed the file and made a new one). Writes to the old,
        unlinked file would reach no one, and reads would miss what others stored."""
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell (the folder is unusable): the next step reports that
        return (found.st_dev, found.st_ino) != self._identity

    @property
    def created(self) -> bool:
        """True when this index was just created empty (so the store must fill it)."""
        return self._created

    def _create_file(self) -> None:
        """Create the database file 0600, owned as ``folder_owner`` says. SQLite gives its
        -wal and -shm files the database file's mode, and when it runs as root its owner
        too, so all three stay private and usable by the folder's owner, whatever the umask."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, _FILE_MODE)
        try:
            os.fchmod(fd, _FILE_MODE)
            give_to(fd, self._owner)
        finally:
            os.close(fd)

    def _open(self) -> sqlite3.Connection:
        if self._created:
            self._create_file()
        elif self._owner is not None:
            for suffix in _SUFFIXES:
                _adopt(self.path.with_name(f"{INDEX_NAME}{suffix}"), self._owner)
        conn = sqlite3.connect(
            self.path,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            # The index is a cache of fsync'ed files: losing its last commits costs a resync.
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                # A cache in an unknown layout is as good as a corrupt one: rebuild it.
                raise IndexCorruptError(  # noqa: TRY301 - handled with the sqlite errors below
                    f"index schema version {version} is not {_SCHEMA_VERSION}"
                )
            conn.executescript(_SCHEMA)
            if version == 0:
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                self._created = True
            conn.execute("SELECT count(*) FROM entries").fetchone()
        except sqlite3.Error as exc:
            conn.close()
            if _is_corruption(exc):
                raise IndexCorruptError(str(exc)) from exc
            raise
        except IndexCorruptError:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @staticmethod
    def remove_files(folder: Path) -> None:
        """Delete the index and its WAL files (after ``close``), to rebuild from scratch."""
        for suffix in _SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                (folder / f"{INDEX_NAME}{suffix}").unlink()

    def _run(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                if _is_corruption(exc):
                    raise IndexCorruptError(str(exc)) from exc
                raise

    @staticmethod
    def _values(meta: Mapping[str, Any]) -> tuple[Any, ...]:
        lists = tuple(_storable("\n".join(meta.get(c) or ())) for c in _LIST_COLUMNS)
        return (
            meta["id"],
            meta["date"],
            meta["status"],
            int(meta.get("size", 0)),
            float(meta.get("score", 0.0)),
            *(_storable(meta.get(c)) for c in _TEXT_COLUMNS),
            *lists,
        )

    @staticmethod
    def _row(values: tuple[Any, ...]) -> Row:
        row = dict(zip(_COLUMNS, values, strict=True))
        for column in _LIST_COLUMNS:
            row[column] = row[column].split("\n") if row[column] else []
        return row

    def upsert(self, meta: Mapping[str, Any]) -> None:
        self._run(_UPSERT, self._values(meta))

    def set_pending(self, entry_id: str) -> None:
        """Flag a row whose ``.json`` is about to be rewritten (cleared by the next upsert)."""
        self._run("UPDATE entries SET pending = 1 WHERE id = ?", (entry_id,))

    def remove(self, entry_id: str) -> None:
        self._run("DELETE FROM entries WHERE id = ?", (entry_id,))

    def replace(
        self,
        upserts: Iterable[Mapping[str, Any]],
        removals: Iterable[str],
        *,
        clear: bool = False,
    ) -> None:
        """Apply many changes in one transaction (a rebuild or a resync)."""
        rows = [self._values(meta) for meta in upserts]
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    if clear:
                        self._conn.execute("DELETE FROM entries")
                    self._conn.executemany(
                        "DELETE FROM entries WHERE id = ?", [(i,) for i in removals]
                    )
                    self._conn.executemany(_UPSERT, rows)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if _is_corruption(exc):
                    raise IndexCorruptError(str(exc)) from exc
                raise

    def snapshot(self) -> dict[str, bool]:
        """Every indexed id, with its pending flag."""
        return {str(i): bool(p) for i, p in self._run("SELECT id, pending FROM entries")}

    def get(self, entry_id: str) -> Row | None:
        query = f"SELECT {_SELECT} FROM entries WHERE id = ?"  # noqa: S608 - constant names
        rows = self._run(query, (entry_id,))
        return self._row(rows[0]) if rows else None

    def page(
        self, limit: int | None = None, offset: int = 0, status: str | None = None
    ) -> list[Row]:
        """Newest first."""
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        rows = self._run(
            f"SELECT {_SELECT} FROM entries {where} ORDER BY date DESC, id DESC"  # noqa: S608 - constant
            " LIMIT ? OFFSET ?",
            [*params, -1 if limit is None else limit, offset],
        )
        return [self._row(r) for r in rows]

    def count(self, status: str | None = None) -> int:
        if status:
            return int(self._run("SELECT count(*) FROM entries WHERE status = ?", (status,))[0][0])
        return int(self._run("SELECT count(*) FROM entries")[0][0])

    def ids_before(self, date: str) -> list[str]:
        """Ids of entries stored before ``date`` (same ISO form as the rows), oldest first."""
        rows = self._run("SELECT id FROM entries WHERE date < ? ORDER BY date, id", (date,))
        return [r[0] for r in rows]
