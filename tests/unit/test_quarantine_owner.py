"""Root working in the daemon user's quarantine: what it creates there stays usable by that user.

The daemon runs as ``_filterd``; an admin runs ``filterd quarantine ...`` from a root shell. Each
test gives a quarantine folder to an unprivileged uid, works in it as root, and checks that every
file is that uid's and that a process running as that uid (forked, then dropped to the uid, as
the daemon runs) can still open the store, store in it and read from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from filterd.actions.quarantine import QuarantineStore
from filterd.actions.quarantine_index import INDEX_NAME
from filterd.app import prepare_state
from filterd.config import QuarantineConfig, default_config
from filterd.errors import QuarantineError
from filterd.model import Action, Envelope, Message, Verdict
from filterd.spool import SpoolFile

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving files to another user, and becoming that user, needs root"
)

# nobody/nogroup on Debian; any unprivileged ids do, they need no passwd entry.
OWNER = (65534, 65534)
VERDICT = Verdict(action=Action.QUARANTINE, score=10.0, rules=("r",))
CHILD_TIMEOUT_S = 30


def _message(n: int) -> Message:
    raw = f"Subject: owner {n}\r\nMessage-ID: <o{n}@example.org>\r\n\r\nHello {n}.\r\n".encode()
    return Message(Envelope("alice@example.org", ("bob@example.net",)), raw)


def _store(store: QuarantineStore, n: int) -> str:
    return store.store(_message(n), VERDICT, rule="r", reason="test")


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned folder OWNER may pass through, as /var/lib is (pytest's tmp_path lies in
    a 0700 folder of root's, where SQLite, resolving the full path, fails for other users)."""
    made = Path(tempfile.mkdtemp(prefix="filterd-owner-"))
    made.chmod(0o711)
    yield made
    shutil.rmtree(made)


@pytest.fixture
def folder(base: Path) -> Path:
    """A quarantine folder as systemd-tmpfiles makes it: 0700, the service user's."""
    made = base / "quarantine"
    made.mkdir(mode=0o700)
    os.chown(made, *OWNER)
    return made


def _owners(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every name in ``folder`` -> (uid, gid, permission bits), symlinks not followed."""
    found = {}
    for path in folder.iterdir():
        st = path.lstat()
        found[path.name] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return found


def _all_owned(folder: Path) -> None:
    owners = _owners(folder)
    assert owners, "the store made no files"
    assert {name: (uid, gid) for name, (uid, gid, _) in owners.items()} == dict.fromkeys(
        owners, OWNER
    )
    assert {mode for _, _, mode in owners.values()} == {0o600}


def _as_owner(folder: Path, work: Callable[[Path], Any]) -> Any:
    """``work(folder)`` run in a forked child as OWNER, like the daemon: its JSON result, or
    an AssertionError with the child's error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        outcome: dict[str, Any]
        try:
            os.close(read_end)
            signal.alarm(CHILD_TIMEOUT_S)  # a hung child dies instead of hanging the suite
            os.setgroups([])
            os.setgid(OWNER[1])
            os.setuid(OWNER[0])
            outcome = {"result": work(folder)}
        except BaseException as exc:  # reported to the parent, which fails the test
            outcome = {"error": repr(exc)}
        with os.fdopen(write_end, "w") as pipe:
            json.dump(outcome, pipe)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    outcome = json.loads(text)
    assert "error" not in outcome, outcome["error"]
    return outcome["result"]


def _daemon_work(folder: Path) -> dict[str, Any]:
    """What the daemon does with the store: open it, store, list, read every entry back."""
    with QuarantineStore(folder) as store:
        new_id = _store(store, 99)
        listed = [entry.id for entry in store.list()]
        read = [len(store.read_message(entry_id)) for entry_id in listed]
        return {"new": new_id, "listed": listed, "read": read}


def test_index_root_creates_is_the_folder_owners(folder: Path) -> None:
    with QuarantineStore(folder) as opened:
        kept = _store(opened, 1)
        # With the store open the WAL files exist too: SQLite makes them, root's or not.
        assert {INDEX_NAME, f"{INDEX_NAME}-wal", f"{INDEX_NAME}-shm"} <= set(_owners(folder))
        _all_owned(folder)
        # The daemon's user works in the store while root has it open (CLI beside the daemon) ...
        during = _as_owner(folder, _daemon_work)
    assert kept in during["listed"]
    # ... and after root closed it.
    after = _as_owner(folder, _daemon_work)
    assert set(after["listed"]) == {kept, during["new"], after["new"]}
    _all_owned(folder)


def test_entries_root_writes_are_the_folder_owners(folder: Path) -> None:
    with QuarantineStore(folder) as opened:
        released = _store(opened, 1)
        opened.mark_released(released, ["x@example.org"])  # rewrites the .json
        assert opened.rebuild_index() == 1  # a new index file
        _all_owned(folder)
    result = _as_owner(folder, _daemon_work)
    assert released in result["listed"]
    _all_owned(folder)


def test_index_left_roots_by_an_earlier_run_is_given_back(base: Path) -> None:
    folder = base / "quarantine"
    with QuarantineStore(folder) as opened:
        _store(opened, 1)
    # The daemon's folder and entries, root's index: what running the CLI as root used to leave.
    for path in (folder, *folder.glob("*.eml"), *folder.glob("*.json")):
        os.chown(path, *OWNER)
    assert _owners(folder)[INDEX_NAME][:2] == (0, 0)
    with QuarantineStore(folder):
        assert _owners(folder)[INDEX_NAME][:2] == OWNER
    assert len(_as_owner(folder, _daemon_work)["listed"]) == 2


def test_folder_root_creates_under_the_owners_folder_is_theirs(base: Path) -> None:
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, *OWNER)
    with QuarantineStore(state / "quarantine") as opened:
        _store(opened, 1)
    assert _owners(state)["quarantine"] == (*OWNER, 0o700)
    _all_owned(state / "quarantine")


def test_a_symlinked_index_never_hands_its_target_over(folder: Path, tmp_path: Path) -> None:
    """The folder's owner may plant symlinks there: root must not chown what they point to."""
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    (folder / INDEX_NAME).symlink_to(victim)
    with QuarantineStore(folder) as opened:  # not a database: rebuilt in the link's place
        _store(opened, 1)
    assert victim.stat().st_uid == 0
    assert victim.read_text() == "root's own file\n"
    _all_owned(folder)


def test_a_dangling_index_symlink_creates_nothing_outside(folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (folder / INDEX_NAME).symlink_to(target)
    with pytest.raises(QuarantineError, match="cannot open quarantine"):
        QuarantineStore(folder)
    assert not target.exists()


def test_a_folder_swapped_for_a_symlink_never_changes_its_target(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between root's mkdir of a new folder and setting its mode and owner, the parent's owner
    can rename the new folder and put a symlink in its place: root must not chmod or chown
    what the link points to."""
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, *OWNER)
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    victim.chmod(0o644)
    real_mkdir = os.mkdir

    def mkdir_then_swap(path: Any, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        os.rename(path, f"{path}.moved")  # what the parent's owner can do meanwhile
        os.symlink(victim, path)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    with pytest.raises(QuarantineError):
        QuarantineStore(state / "quarantine")
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert victim.stat().st_uid == 0


def test_state_folders_root_creates_in_the_owners_state_dir_are_theirs(base: Path) -> None:
    """``filterd serve`` run once as root (to try it) in the service user's state folder must
    not leave the spool or the quarantine root's: the service could spool or hold no mail."""
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, *OWNER)
    config = dataclasses.replace(
        default_config(),
        state_dir=str(state),
        quarantine=QuarantineConfig(path=str(state / "quarantine")),
    )
    prepare_state(config)
    owners = _owners(state)
    assert owners["spool"] == (*OWNER, 0o700)
    assert owners["quarantine"] == (*OWNER, 0o700)


def test_a_spool_folder_made_while_running_as_root_is_the_owners(base: Path) -> None:
    """The spool folder, removed while the daemon runs, is made again for the next large
    message: by root, in the service user's state folder, it must be that user's."""
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, *OWNER)
    SpoolFile(str(state / "spool")).discard()
    assert _owners(state)["spool"] == (*OWNER, 0o700)
