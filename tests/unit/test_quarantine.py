"""Quarantine store, index and commands: durability, permissions, disk full, crash safety, release.

Failures are produced for real: a full tmpfs (in a private mount namespace), a read-only
remount, a file-size limit, SIGKILL in the middle of writes, and a real SMTP next hop (aiosmtpd)
for release.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller

from filterd.actions.quarantine import (
    ENTRY_ID_RE,
    EntryNotFoundError,
    EntryStatus,
    QuarantineStore,
    run_retention,
    track_size,
)
from filterd.actions.quarantine_commands import (
    delete_entry,
    list_entries,
    parse_age,
    purge_entries,
    release_entry,
    show_entry,
)
from filterd.actions.quarantine_index import QuarantineIndex
from filterd.errors import QuarantineError, RelayError
from filterd.model import Action, Envelope, Message, RuleTrace, Verdict

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "corpus"
NOW = datetime(2026, 11, 30, 12, 26, 43, tzinfo=UTC)

VERDICT = Verdict(
    action=Action.QUARANTINE,
    score=11.5,
    rules=("executable-attachment", "lottery-words"),
    deciding_rule="executable-attachment",
    reason="executable attachment",
    trace=(
        RuleTrace(
            "executable-attachment",
            True,
            0.0,
            detail="attachment invoice.exe",
            action=Action.QUARANTINE,
        ),
        RuleTrace("lottery-words", True, 4.5, detail="subject: lottery"),
        RuleTrace("gtube", False),
    ),
)


def _message(n: int = 0, *, body: bytes = b"", sender: str = "alice@example.org") -> Message:
    raw = (
        f"From: Alice <{sender or 'mailer-daemon@example.org'}>\r\n"
        f"To: bob@example.net\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe_{n}?=\r\n"
        f"Message-ID: <m{n}@example.org>\r\nX-Spam-Flag: NO\r\n\r\n"
    ).encode() + (body or f"Hello {n}.\r\n".encode())
    envelope = Envelope(
        sender=sender,
        recipients=("bob@example.net", "carol@example.net"),
        client_ip="192.0.2.7",
        client_name="mx.example.org",
        helo="mx.example.org",
        queue_id=f"4Q{n:05d}",
    )
    return Message(envelope, raw)


def _store(store: QuarantineStore, n: int = 0, *, now: datetime | None = None, **kw: Any) -> str:
    return store.store(
        _message(n, **kw),
        VERDICT,
        rule="executable-attachment",
        reason="executable attachment",
        now=now,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QuarantineStore]:
    with QuarantineStore(tmp_path / "quarantine") as opened:
        yield opened


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- store / get / list -------------------------------------------------------------------------


def test_store_writes_the_message_and_its_metadata(store: QuarantineStore) -> None:
    message = _message(1)
    entry_id = store.store(
        message, VERDICT, rule="executable-attachment", reason="executable attachment", now=NOW
    )
    assert ENTRY_ID_RE.fullmatch(entry_id)
    assert entry_id.startswith("20261130T122643Z-")
    assert (store.path / f"{entry_id}.eml").read_bytes() == message.raw
    meta = json.loads((store.path / f"{entry_id}.json").read_text())
    assert meta["sender"] == "alice@example.org"
    assert meta["recipients"] == ["bob@example.net", "carol@example.net"]
    assert (meta["client_ip"], meta["helo"], meta["queue_id"]) == (
        "192.0.2.7",
        "mx.example.org",
        "4Q00001",
    )
    assert meta["date"] == "2026-11-30T12:26:43Z"
    assert meta["status"] == "quarantined"
    assert meta["trace"][0] == {
        "rule": "executable-attachment",
        "matched": True,
        "score": 0.0,
        "shadow": False,
        "detail": "attachment invoice.exe",
        "action": "quarantine",
    }
    entry = store.get(entry_id)
    assert entry.subject == "Grüße 1"
    assert entry.message_id == "<m1@example.org>"
    assert entry.size == len(message.raw)
    assert (entry.rule, entry.reason, entry.action, entry.score) == (
        "executable-attachment",
        "executable attachment",
        "quarantine",
        11.5,
    )
    assert entry.trace == VERDICT.trace
    assert entry.date == NOW
    assert store.read_message(entry_id) == message.raw


def test_null_sender_and_headerless_message(store: QuarantineStore) -> None:
    message = Message(Envelope("", ("postmaster@example.net",)), b"no header at all")
    entry_id = store.store(message, Verdict(action=Action.QUARANTINE), rule="", reason="")
    entry = store.get(entry_id)
    assert (entry.sender, entry.subject, entry.rule) == ("", "", "")
    assert store.read_message(entry_id) == b"no header at all"


def test_list_is_newest_first_with_paging_count_and_status(store: QuarantineStore) -> None:
    ids = [_store(store, n, now=NOW + timedelta(minutes=n)) for n in range(5)]
    listed = store.list()
    assert [e.id for e in listed] == ids[::-1]
    assert all(e.trace == () for e in listed)  # the index keeps no trace; get() has it
    assert [e.id for e in store.list(limit=2, offset=1)] == [ids[3], ids[2]]
    assert store.count() == 5
    store.mark_released(ids[0], ["bob@example.net"])
    assert store.count(EntryStatus.RELEASED) == 1
    assert [e.id for e in store.list(status=EntryStatus.QUARANTINED)] == ids[:0:-1]


def test_concurrent_stores_from_threads(store: QuarantineStore) -> None:
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda n: _store(store, n), range(40)))
    assert len(set(ids)) == 40
    assert {e.id for e in store.list()} == set(ids)
    for n, entry_id in enumerate(ids):
        assert store.read_message(entry_id) == _message(n).raw


@pytest.mark.parametrize(
    "bad_id",
    [
        "../../etc/passwd",
        "20261130T122643Z-0123abcd/../../x",
        "20261130T122643Z-0123ABCD",
        "20261130T122643Z-0123abcd.json",
        "",
        "..",
        "index",
    ],
)
def test_invalid_ids_never_reach_the_filesystem(store: QuarantineStore, bad_id: str) -> None:
    for operation in (store.get, store.read_message, store.delete):
        with pytest.raises(EntryNotFoundError):
            operation(bad_id)
    with pytest.raises(EntryNotFoundError):
        store.mark_released(bad_id, ["x@example.org"])


def test_unknown_id(store: QuarantineStore) -> None:
    with pytest.raises(EntryNotFoundError):
        store.get("20261130T122643Z-0123abcd")


def test_tampered_message_is_detected(store: QuarantineStore) -> None:
    entry_id = _store(store)
    path = store.path / f"{entry_id}.eml"
    path.write_bytes(path.read_bytes().replace(b"Hello", b"Hullo"))
    with pytest.raises(QuarantineError, match="digest"):
        store.read_message(entry_id)


# --- delete / release / purge -------------------------------------------------------------------


def test_delete_removes_files_and_row(store: QuarantineStore) -> None:
    keep, gone = _store(store, 1), _store(store, 2)
    store.delete(gone)
    assert not (store.path / f"{gone}.eml").exists()
    assert not (store.path / f"{gone}.json").exists()
    assert [e.id for e in store.list()] == [keep]
    with pytest.raises(EntryNotFoundError):
        store.delete(gone)


def test_mark_released_rewrites_the_metadata(store: QuarantineStore) -> None:
    entry_id = _store(store)
    store.mark_released(entry_id, ["admin@example.net"], now=NOW)
    entry = store.get(entry_id)
    assert entry.status is EntryStatus.RELEASED
    assert entry.released_to == ("admin@example.net",)
    assert entry.released_at == NOW
    assert store.list()[0].status is EntryStatus.RELEASED
    assert store.read_message(entry_id) == _message().raw


def test_purge_deletes_only_older_entries(store: QuarantineStore) -> None:
    old = [_store(store, n, now=NOW - timedelta(days=31 + n)) for n in range(3)]
    young = [_store(store, n, now=NOW - timedelta(days=29, hours=23)) for n in range(2)]
    assert store.purge(timedelta(days=30), now=NOW) == 3
    assert sorted(e.id for e in store.list()) == sorted(young)
    for entry_id in old:
        assert not (store.path / f"{entry_id}.eml").exists()
    assert store.purge(timedelta(days=30), now=NOW) == 0


def test_retention_task_purges_on_its_own(store: QuarantineStore) -> None:
    old = _store(store, 1, now=datetime.now(UTC) - timedelta(days=40))
    young = _store(store, 2)

    async def run() -> None:
        task = asyncio.create_task(run_retention(lambda: store, timedelta(days=30), interval=0.05))
        for _ in range(200):
            await asyncio.sleep(0.02)
            if not (store.path / f"{old}.json").exists():
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert [e.id for e in store.list()] == [young]


def test_retention_waits_for_a_quarantine_that_comes_up_late(tmp_path: Path) -> None:
    # The folder is unusable when the daemon starts (here a file stands where it goes, as a
    # mount that is not up yet would): retention tries again at each pass, and does not die.
    folder = tmp_path / "quarantine"
    folder.write_text("not a folder yet")
    purged_counts: list[int] = []

    async def run() -> None:
        task = asyncio.create_task(
            run_retention(
                lambda: QuarantineStore(folder),
                timedelta(days=30),
                interval=0.05,
                on_count=purged_counts.append,
            )
        )
        await asyncio.sleep(0.2)
        assert purged_counts == []
        assert not task.done()
        folder.unlink()
        with QuarantineStore(folder) as late:
            _store(late, 1, now=datetime.now(UTC) - timedelta(days=40))
        for _ in range(200):
            await asyncio.sleep(0.02)
            if purged_counts:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert purged_counts[:1] == [0]  # the old entry purged, none left


def test_the_size_count_follows_changes_made_outside_the_daemon(
    store: QuarantineStore, tmp_path: Path
) -> None:
    """Entries deleted or purged by another process (the CLI) reach the gauge at the next
    count, not only when something is quarantined again."""
    old = _store(store, 1, now=datetime.now(UTC) - timedelta(days=40))
    first, _ = _store(store, 2), _store(store, 3)
    counts: list[int] = []

    async def until(expected: int) -> None:
        for _ in range(200):
            if counts and counts[-1] == expected:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the count stayed at {counts[-1:]} instead of {expected}")

    async def run() -> None:
        task = asyncio.create_task(
            track_size(lambda: QuarantineStore(store.path), counts.append, interval=0.05)
        )
        try:
            await until(3)
            with QuarantineStore(store.path) as other:  # as `filterd quarantine delete` does
                assert delete_entry(other, first, io.StringIO()) == 0
            await until(2)
            with QuarantineStore(store.path) as other:
                assert purge_entries(other, "30d", io.StringIO()) == 0
            await until(1)
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(run())
    assert old not in [e.id for e in store.list()]


def test_the_size_count_waits_for_a_quarantine_that_comes_up_late(tmp_path: Path) -> None:
    folder = tmp_path / "quarantine"
    folder.write_text("not a folder yet")
    counts: list[int] = []

    async def run() -> None:
        task = asyncio.create_task(
            track_size(lambda: QuarantineStore(folder), counts.append, interval=0.05)
        )
        await asyncio.sleep(0.2)
        assert counts == []
        assert not task.done()
        folder.unlink()
        with QuarantineStore(folder) as late:
            _store(late, 1)
        for _ in range(200):
            await asyncio.sleep(0.02)
            if counts:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert counts[:1] == [1]


def test_a_sender_that_was_not_utf8_is_stored_and_listed(
    store: QuarantineStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # MAIL FROM:<a\xff@...> reaches the entry as a lone surrogate. SQLite refused it: a 451
    # (and a second copy at each retry), then every later open of the store failed.
    envelope = Envelope(sender="a\udcff@example.org", recipients=("bob@example.net",))
    message = Message(envelope, b"Subject: hi\r\n\r\nbody\r\n")
    entry_id = store.store(message, VERDICT, rule="r", reason="test")
    assert store.count() == 1
    with QuarantineStore(store.path) as reopened:  # a later process, resyncing from the files
        assert [e.id for e in reopened.list()] == [entry_id]
        assert reopened.get(entry_id).sender == "a\udcff@example.org"  # the .json keeps it
    out = io.StringIO()
    assert list_entries(store, as_json=False, out=out) == 0
    assert "a\ufffd@example.org" in out.getvalue()
    shown = io.StringIO()
    assert show_entry(store, entry_id, shown) == 0
    shown.getvalue().encode("utf-8")  # printable on a UTF-8 terminal


def test_a_store_follows_an_index_another_process_rebuilt(tmp_path: Path) -> None:
    # The rebuild removes the index file and makes a new one; a process that kept the old one
    # open wrote to a file nobody reads, and its purges missed the entries others stored.
    folder = tmp_path / "quarantine"
    with QuarantineStore(folder) as first, QuarantineStore(folder) as second:
        _store(first, 1)
        first.rebuild_index()
        stored_after = _store(second, 2)
        assert stored_after in {e.id for e in first.list()}
        old = _store(first, 3, now=datetime.now(UTC) - timedelta(days=40))
        assert second.purge(timedelta(days=30)) == 1
        assert old not in {e.id for e in first.list()}


# --- the index is a cache -----------------------------------------------------------------------


def test_lost_index_is_rebuilt_from_the_files(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    with QuarantineStore(folder) as first:
        ids = {_store(first, n) for n in range(6)}
        first.mark_released(sorted(ids)[0], ["x@example.org"])
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"):
        (folder / name).unlink(missing_ok=True)
    with QuarantineStore(folder) as second:
        assert {e.id for e in second.list()} == ids
        assert second.get(sorted(ids)[0]).status is EntryStatus.RELEASED
        assert second.list(status=EntryStatus.RELEASED)[0].id == sorted(ids)[0]


@pytest.mark.parametrize(
    "garbage", [b"this is not a database", b"SQLite format 3\x00" + b"\xff" * 4000, b""]
)
def test_corrupt_index_is_rebuilt(tmp_path: Path, garbage: bytes) -> None:
    folder = tmp_path / "q"
    with QuarantineStore(folder) as first:
        ids = {_store(first, n) for n in range(3)}
    for name in ("index.sqlite3-wal", "index.sqlite3-shm"):
        (folder / name).unlink(missing_ok=True)
    (folder / "index.sqlite3").write_bytes(garbage)
    with QuarantineStore(folder) as second:
        assert {e.id for e in second.list()} == ids
    assert stat.S_IMODE((folder / "index.sqlite3").stat().st_mode) == 0o600


def test_rebuild_index_on_demand(store: QuarantineStore) -> None:
    ids = {_store(store, n) for n in range(3)}
    assert store.rebuild_index() == 3
    assert {e.id for e in store.list()} == ids


def test_stale_rows_are_resynchronised_on_open(tmp_path: Path) -> None:
    """Crashes between a file and its index row: a row missing, one left over, one pending."""
    folder = tmp_path / "q"
    with QuarantineStore(folder) as first:
        a, b, c, d = (_store(first, n) for n in range(4))
    phantom = json.loads((folder / f"{a}.json").read_text()) | {"id": "20200101T000000Z-00000000"}
    index = QuarantineIndex(folder)
    index.remove(a)  # stored, crashed before its row was written
    index.upsert(phantom)  # deleted, crashed before its row was removed
    index.set_pending(b)  # released, crashed between the .json rewrite and the row update
    index.close()
    meta_path = folder / f"{b}.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"status": "released"}))
    (folder / f"{c}.json").unlink()  # deleted, crashed before the .eml went: an orphan remains
    with QuarantineStore(folder) as second:
        listed = {e.id: e.status for e in second.list()}
    assert listed == {
        a: EntryStatus.QUARANTINED,
        b: EntryStatus.RELEASED,
        d: EntryStatus.QUARANTINED,
    }


def test_unfinished_writes_are_ignored_then_cleaned(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    with QuarantineStore(folder) as first:
        kept = _store(first)
    fresh_eml = folder / "20261130T000000Z-0000aaaa.eml"
    old_eml = folder / "20261130T000000Z-0000bbbb.eml"
    old_tmp = folder / ".20261130T000000Z-0000cccc.eml.1234abcd.tmp"
    no_eml = folder / "20261130T000000Z-0000dddd.json"
    for path in (fresh_eml, old_eml, old_tmp):
        path.write_bytes(b"partial")
    no_eml.write_text((folder / f"{kept}.json").read_text())
    two_hours_ago = time.time() - 7200
    for path in (old_eml, old_tmp):
        os.utime(path, (two_hours_ago, two_hours_ago))
    with QuarantineStore(folder) as second:
        assert [e.id for e in second.list()] == [kept]
    assert fresh_eml.exists()  # may be a concurrent writer's: never raced
    assert not old_eml.exists()
    assert not old_tmp.exists()


# --- permissions and failures -------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_folders_0700_and_files_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        folder = tmp_path / "var" / "lib" / "quarantine"
        with QuarantineStore(folder) as opened:
            entry_id = _store(opened)
            opened.mark_released(entry_id, ["x@example.org"])
            opened.list()
    finally:
        os.umask(previous)
    for created in (tmp_path / "var", tmp_path / "var" / "lib", folder):
        assert stat.S_IMODE(created.stat().st_mode) == 0o700, created
    files = list(folder.iterdir())
    assert {p.suffix for p in files} >= {".eml", ".json", ".sqlite3"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_folder_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(QuarantineError):
        QuarantineStore(tmp_path / "file" / "quarantine")


def test_unwritable_folder_raises_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    with QuarantineStore(folder) as opened:
        kept = _store(opened)
        with _unwritable(folder), pytest.raises(QuarantineError):
            _store(opened, 2)
    assert sorted(p.name for p in folder.glob("*.eml")) == [f"{kept}.eml"]
    assert not list(folder.glob(".*.tmp"))


@contextlib.contextmanager
def _unwritable(folder: Path) -> Iterator[None]:
    """Make ``folder`` refuse new files for real, for root too (permission bits do not stop
    root, so the folder is taken away and a regular file put in its place)."""
    if os.geteuid() == 0:
        moved = folder.with_name(folder.name + ".moved")
        folder.rename(moved)
        folder.write_text("not a folder any more")
    else:
        folder.chmod(0o500)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            folder.unlink()
            moved.rename(folder)
        else:
            folder.chmod(0o700)


def test_failed_status_update_leaves_the_row_pending(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    with QuarantineStore(folder) as opened:
        entry_id = _store(opened)
        with _unwritable(folder), pytest.raises(QuarantineError):
            opened.mark_released(entry_id, ["x@example.org"])
        # Until the next open re-reads it, the row says it may not match its file.
        assert QuarantineIndex(folder).snapshot() == {entry_id: True}
    with QuarantineStore(folder) as reopened:
        assert reopened.list()[0].status is EntryStatus.QUARANTINED
        assert QuarantineIndex(folder).snapshot() == {entry_id: False}


def _run_child(
    script: str,
    folder: Path,
    *,
    prefix: Sequence[str] = (),
    timeout: float = 60,
    preexec: Any = None,
) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    code = textwrap.dedent(_CHILD_PRELUDE) + textwrap.dedent(script)
    return subprocess.run(  # noqa: PLW1510 - the caller checks the result
        [*prefix, sys.executable, "-c", code, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        preexec_fn=preexec,
    )


_CHILD_PRELUDE = """
    import hashlib, json, os, sys
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from filterd.actions.quarantine import QuarantineStore
    from filterd.errors import QuarantineError
    from filterd.model import Action, Envelope, Message, Verdict
    FOLDER = sys.argv[1]
    VERDICT = Verdict(action=Action.QUARANTINE, score=10.0, rules=("r",))
    def message(n, size):
        raw = (f"Subject: child {n}\\r\\n\\r\\n".encode() + bytes([65 + n % 26]) * size)
        return Message(Envelope("a@example.org", ("b@example.net",)), raw)
    def check(store):
        names = os.listdir(FOLDER)
        ids = {e.id for e in store.list()}
        for entry_id in ids:
            store.read_message(entry_id)
        return {
            "ids": sorted(ids),
            "json": sorted(n[:-5] for n in names if n.endswith(".json")),
            "eml": sorted(n[:-4] for n in names if n.endswith(".eml")),
            "tmp": [n for n in names if n.endswith(".tmp")],
        }
"""

_FILL_UNTIL_FULL = """
    store = QuarantineStore(FOLDER)
    stored, error = [], None
    for n in range(1000):
        try:
            stored.append(store.store(message(n, 60_000), VERDICT, rule="r", reason="full"))
        except QuarantineError as exc:
            error = str(exc)
            break
    result = {"stored": stored, "error": error, "after_error": check(store)}
    store.delete(stored[0])
    store.delete(stored[1])
    result["stored_again"] = store.store(message(99, 60_000), VERDICT, rule="r", reason="")
    result["final"] = check(QuarantineStore(FOLDER))
    print(json.dumps(result))
"""


def _private_tmpfs(folder: Path, options: str) -> list[str] | None:
    """A command prefix running the child in its own mount namespace with a tmpfs on folder."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(  # noqa: PLW1510
        [unshare, "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs '{folder}'"],
        capture_output=True,
        timeout=10,
    )
    if probe.returncode != 0:
        return None
    return [
        unshare,
        "-m",
        "sh",
        "-c",
        f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"',
        str(folder),
    ]


def _assert_consistent(state: dict[str, Any]) -> None:
    assert state["tmp"] == []
    assert state["ids"] == state["json"] == state["eml"]


def test_disk_full_on_a_real_tmpfs(tmp_path: Path) -> None:
    folder = tmp_path / "small"
    prefix = _private_tmpfs(folder, "size=1m,mode=0700")
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs here (needs unshare and mount rights)")
    done = _run_child(_FILL_UNTIL_FULL, folder, prefix=prefix)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["error"] is not None
    assert "No space left" in result["error"]
    assert len(result["stored"]) >= 2
    # Nothing half-written is left; every acknowledged entry is listed and readable.
    _assert_consistent(result["after_error"])
    assert result["after_error"]["ids"] == sorted(result["stored"])
    _assert_consistent(result["final"])
    assert result["stored_again"] in result["final"]["ids"]


_FILL_INODES = """
    store = QuarantineStore(FOLDER)
    stored, error = [], None
    for n in range(100):
        try:
            stored.append(store.store(message(n, 10), VERDICT, rule="r", reason="inodes"))
        except QuarantineError as exc:
            error = str(exc)
            break
    print(json.dumps({"stored": stored, "error": error, "after_error": check(store)}))
"""


@pytest.mark.parametrize("inodes", [9, 10])
def test_no_inode_left_for_the_json_or_the_eml(tmp_path: Path, inodes: int) -> None:
    """Out of inodes with the .eml written but no room for the .json (and the other way round):
    the .eml written for the failed entry must not stay behind."""
    folder = tmp_path / "small"
    prefix = _private_tmpfs(folder, f"size=1m,nr_inodes={inodes},mode=0700")
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs here (needs unshare and mount rights)")
    done = _run_child(_FILL_INODES, folder, prefix=prefix)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["error"] is not None
    assert result["stored"]
    _assert_consistent(result["after_error"])
    assert result["after_error"]["ids"] == sorted(result["stored"])


def test_file_size_limit_is_an_io_error_too(tmp_path: Path) -> None:
    """Works without mount rights: RLIMIT_FSIZE makes a large write fail with EFBIG."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    script = """
        store = QuarantineStore(FOLDER)
        small = store.store(message(1, 1000), VERDICT, rule="r", reason="")
        try:
            store.store(message(2, 3_000_000), VERDICT, rule="r", reason="")
            error = None
        except QuarantineError as exc:
            error = str(exc)
        print(json.dumps({"small": small, "error": error, "state": check(store)}))
    """
    done = _run_child(script, tmp_path / "q", preexec=limit)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["error"] is not None
    assert "too large" in result["error"]
    _assert_consistent(result["state"])
    assert result["state"]["ids"] == [result["small"]]


def test_read_only_filesystem_refuses_to_store(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    prefix = _private_tmpfs(folder, "size=1m,mode=0700")
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs here (needs unshare and mount rights)")
    script = f"""
        store = QuarantineStore(FOLDER)
        kept = store.store(message(1, 100), VERDICT, rule="r", reason="")
        store.close()
        os.system("mount -o remount,ro '{folder}'")
        try:
            QuarantineStore(FOLDER).store(message(2, 100), VERDICT, rule="r", reason="")
            error = None
        except QuarantineError as exc:
            error = str(exc)
        names = sorted(os.listdir(FOLDER))
        print(json.dumps({{"kept": kept, "error": error, "names": names}}))
    """
    done = _run_child(script, folder, prefix=prefix)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["error"] is not None  # refused at open or at store: either way a 451
    assert [n for n in result["names"] if n.endswith((".eml", ".json"))] == [
        f"{result['kept']}.eml",
        f"{result['kept']}.json",
    ]


# --- crash safety -------------------------------------------------------------------------------

_STORE_FOREVER = """
    import random
    store = QuarantineStore(FOLDER)
    n = int(sys.argv[2])
    while True:
        msg = message(n, random.randint(1_000, 400_000))
        entry_id = store.store(msg, VERDICT, rule="r", reason="crash")
        print(entry_id, hashlib.sha256(msg.raw).hexdigest(), flush=True)
        n += 1
"""


def test_kill_9_while_storing_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    code = textwrap.dedent(_CHILD_PRELUDE) + textwrap.dedent(_STORE_FOREVER)
    acknowledged: dict[str, str] = {}
    rng = random.Random(4)
    for round_ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(folder), str(round_ * 10_000)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert child.stdout is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lines.extend, args=(child.stdout,))
        reader.start()
        deadline = time.monotonic() + 20
        while not lines and time.monotonic() < deadline:  # let it start and store once
            time.sleep(0.01)
        time.sleep(rng.uniform(0.01, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        reader.join(10)
        for line in lines:
            if line.endswith(b"\n"):
                entry_id, digest = line.decode().split()
                acknowledged[entry_id] = digest
    assert len(acknowledged) >= 6
    with QuarantineStore(folder) as after:
        listed = {e.id for e in after.list()}
        assert set(acknowledged) <= listed
        for entry_id, digest in acknowledged.items():
            assert hashlib.sha256(after.read_message(entry_id)).hexdigest() == digest
        for entry_id in listed:  # no half entry is listed: everything listed reads back whole
            after.read_message(entry_id)
        assert after.count() == len(listed)
    complete = {p.stem for p in folder.glob("*.json")}
    assert complete == listed


# --- commands -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        (" 7D ", timedelta(days=7)),
        ("0d", timedelta(0)),
    ],
)
def test_parse_age(text: str, expected: timedelta) -> None:
    assert parse_age(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "-1d", "1.5d", "30 days", "1y", "10d5h"])
def test_parse_age_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid age"):
        parse_age(text)


def test_list_json_has_the_contract_keys(store: QuarantineStore) -> None:
    first = _store(store, 1, now=NOW)
    second = _store(store, 2, now=NOW + timedelta(seconds=1), sender="")
    out = io.StringIO()
    assert list_entries(store, as_json=True, out=out) == 0
    items = json.loads(out.getvalue())
    assert [i["id"] for i in items] == [second, first]
    for key in ("id", "date", "sender", "recipients", "subject", "size", "rule", "reason"):
        assert key in items[0]
    assert items[1]["subject"] == "Grüße 1"
    assert items[1]["recipients"] == ["bob@example.net", "carol@example.net"]
    assert items[1]["size"] == len(_message(1).raw)
    assert items[0]["sender"] == ""
    assert "trace" not in items[0]


def test_list_table_is_aligned(store: QuarantineStore) -> None:
    ids = [_store(store, n, now=NOW + timedelta(seconds=n)) for n in (1, 22)]
    out = io.StringIO()
    assert list_entries(store, as_json=False, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "ID",
        "DATE",
        "STATUS",
        "SIZE",
        "SENDER",
        "RECIPIENTS",
        "RULE",
        "SUBJECT",
    ]
    assert [line.split()[0] for line in lines[1:]] == ids[::-1]
    column = lines[0].index("SENDER")
    assert all(line[column:].startswith("alice@example.org") for line in lines[1:])


def test_list_empty(store: QuarantineStore) -> None:
    out = io.StringIO()
    assert list_entries(store, as_json=False, out=out) == 0
    assert out.getvalue() == "quarantine is empty\n"
    out = io.StringIO()
    assert list_entries(store, as_json=True, out=out) == 0
    assert json.loads(out.getvalue()) == []


def test_show_keeps_a_decoded_newline_from_forging_lines(store: QuarantineStore) -> None:
    raw = b"Subject: =?utf-8?q?hello=0Astatus:_released?=\r\n\r\nbody\r\n"
    message = Message(Envelope("a@example.org", ("b@example.net",)), raw)
    entry_id = store.store(message, VERDICT, rule="r", reason="test")
    out = io.StringIO()
    assert show_entry(store, entry_id, out) == 0
    lines = out.getvalue().splitlines()
    assert [line for line in lines if line.startswith("status:")] == ["status:      quarantined"]
    assert "subject:     hello\\nstatus: released" in lines


def test_show_prints_metadata_trace_and_headers(store: QuarantineStore) -> None:
    entry_id = _store(store, 3)
    out = io.StringIO()
    assert show_entry(store, entry_id, out) == 0
    text = out.getvalue()
    assert f"id:          {entry_id}" in text
    assert "client ip:   192.0.2.7" in text
    assert "+ executable-attachment" in text
    assert "- gtube" in text
    assert "Message-ID: <m3@example.org>" in text
    assert "Hello 3." not in text  # headers only, never the body
    out = io.StringIO()
    assert show_entry(store, "20261130T122643Z-0123abcd", out) == 1
    assert out.getvalue().startswith("error:")


def test_terminal_escapes_in_a_message_never_reach_the_terminal(store: QuarantineStore) -> None:
    raw = (
        b"Subject: =?utf-8?q?evil_=1B]0;owned=07_=C2=9B31m?=\r\n"
        b"X-Evil: \x1b[2J\x1b[31mred\r\n\r\nbody\r\n"
    )
    message = Message(Envelope("a\x1b[5m@example.org", ("b@example.net",)), raw)
    entry_id = store.store(message, VERDICT, rule="r", reason="escapes")
    for command in (
        lambda out: list_entries(store, as_json=False, out=out),
        lambda out: list_entries(store, as_json=True, out=out),
        lambda out: show_entry(store, entry_id, out),
        lambda out: show_entry(store, entry_id, out, as_json=True),
    ):
        out = io.StringIO()
        assert command(out) == 0
        text = out.getvalue()
        assert "\x1b" not in text
        assert "\x9b" not in text
        assert "\x07" not in text
        assert "red" in text or "evil" in text
    out = io.StringIO()
    list_entries(store, as_json=True, out=out)
    assert json.loads(out.getvalue())[0]["subject"] == "evil \x1b]0;owned\x07 \x9b31m"


def test_delete_and_purge_commands(store: QuarantineStore) -> None:
    old = _store(store, 1, now=datetime.now(UTC) - timedelta(days=3))
    young = _store(store, 2)
    out = io.StringIO()
    assert purge_entries(store, "2x", out) == 2
    assert purge_entries(store, "2d", out) == 0
    assert "purged 1 entry" in out.getvalue()
    assert [e.id for e in store.list()] == [young]
    assert delete_entry(store, young, out) == 0
    assert delete_entry(store, young, out) == 1
    assert delete_entry(store, old, out) == 1
    assert store.count() == 0


# --- release through a real next hop ------------------------------------------------------------


@dataclass
class _Hop:
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: queued"


class _Controller(Controller):  # type: ignore[misc]
    def _trigger_server(self) -> None:
        # Bound to port 0: connect to the port the kernel chose, not to 0.
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@pytest.fixture
def hop() -> Iterator[tuple[_Hop, int]]:
    handler = _Hop()
    controller = _Controller(handler, hostname="127.0.0.1", port=0)
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def _sender_to(port: int) -> Any:
    async def send(sender: str, recipients: Sequence[str], raw: bytes) -> None:
        try:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=False, timeout=10
            ) as smtp:
                refused, _ = await smtp.sendmail(sender, list(recipients), raw)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise RelayError("refused", str(exc)) from exc
        if refused:
            raise RelayError("refused", str(refused))

    return send


def test_release_sends_the_original_with_its_envelope(
    store: QuarantineStore, hop: tuple[_Hop, int]
) -> None:
    handler, port = hop
    entry_id = _store(store, 5)
    out = io.StringIO()
    assert release_entry(store, entry_id, to=None, send=_sender_to(port), out=out) == 0
    assert len(handler.received) == 1
    sender, recipients, data = handler.received[0]
    assert sender == "alice@example.org"
    assert recipients == ["bob@example.net", "carol@example.net"]
    # the original bytes, minus the sender's own X-Spam-* (no forged verdict gets through)
    assert data == _message(5).raw.replace(b"X-Spam-Flag: NO\r\n", b"")
    entry = store.get(entry_id)
    assert entry.status is EntryStatus.RELEASED
    assert entry.released_to == ("bob@example.net", "carol@example.net")
    # a second release needs an explicit --to
    assert release_entry(store, entry_id, to=None, send=_sender_to(port), out=out) == 1
    assert len(handler.received) == 1


def test_release_to_another_address_and_null_sender(
    store: QuarantineStore, hop: tuple[_Hop, int]
) -> None:
    handler, port = hop
    entry_id = _store(store, 6, sender="")
    out = io.StringIO()
    assert (
        release_entry(store, entry_id, to=["admin@example.net"], send=_sender_to(port), out=out)
        == 0
    )
    assert handler.received[0][:2] == ("<>", ["admin@example.net"])
    assert store.get(entry_id).released_to == ("admin@example.net",)
    assert f"released {entry_id} to admin@example.net" in out.getvalue()


def test_failed_release_changes_nothing(store: QuarantineStore, hop: tuple[_Hop, int]) -> None:
    handler, port = hop
    handler.refuse = {"bob@example.net", "carol@example.net"}
    entry_id = _store(store, 7)
    before = (store.path / f"{entry_id}.json").read_bytes()
    out = io.StringIO()
    assert release_entry(store, entry_id, to=None, send=_sender_to(port), out=out) == 1
    assert "entry unchanged" in out.getvalue()
    assert (store.path / f"{entry_id}.json").read_bytes() == before
    assert store.get(entry_id).status is EntryStatus.QUARANTINED
    assert handler.received == []


def test_release_with_the_next_hop_down_changes_nothing(store: QuarantineStore) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry_id = _store(store, 8)
    out, err = io.StringIO(), io.StringIO()
    assert release_entry(store, entry_id, to=None, send=_sender_to(port), out=out, err=err) == 1
    assert out.getvalue() == ""
    assert "failed" in err.getvalue()
    assert store.get(entry_id).status is EntryStatus.QUARANTINED


def test_release_of_unknown_entry(store: QuarantineStore, hop: tuple[_Hop, int]) -> None:
    _, port = hop
    out = io.StringIO()
    assert (
        release_entry(store, "20261130T122643Z-0123abcd", to=None, send=_sender_to(port), out=out)
        == 1
    )
