"""A quarantine folder that cannot take the message: full, too small for it, read-only, replaced
by a file, deleted under the running daemon.

A quarantined message is acknowledged only once its copy is on disk, so each of these must
answer ``451 4.3.0`` (the MTA keeps the message and retries), leave no half-written entry, keep
relaying other mail, and store again as soon as the folder is healed.

The tests run as root, where permission bits do not stop writes; a small tmpfs is the real
thing (ENOSPC, EROFS). Without the right to mount, those tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.accounting import delta, message, messages_by_action, quarantined_tokens, token_of
from tests.faults.conftest import RELAY_TIMEOUT, assert_still_serving, new_token, write_rules
from tests.support.daemon import REPO, Daemon
from tests.support.faultclient import RawClient, Reply, scrape
from tests.support.nexthop import NextHop

TMPFS_SIZE = 512 * 1024


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mount_point = tmp_path_factory.mktemp("qfs")
    done = _run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); "
                    "the full/read-only quarantine cases need one")
    try:
        yield mount_point
    finally:
        _run("umount", "-l", str(mount_point))


@pytest.fixture(scope="module")
def qd(tmp_path_factory: pytest.TempPathFactory, hop: NextHop, tmpfs: Path) -> Iterator[Daemon]:
    """filterd whose quarantine lives on the small tmpfs."""
    work = tmp_path_factory.mktemp("filterd-q")
    extra = {"limits": {"relay_timeout": RELAY_TIMEOUT}, "quarantine": {"path": str(tmpfs / "q")}}
    with Daemon(work, hop.port, rules=write_rules(work), metrics=True, extra=extra) as daemon:
        yield daemon


def _folder(daemon: Daemon) -> Path:
    config = daemon.config_path.read_text()
    for line in config.splitlines():
        if line.strip().startswith("path:"):
            return Path(line.split(":", 1)[1].strip())
    raise AssertionError("no quarantine path in the config")


def _send(daemon: Daemon, token: str, subject: str, size: int = 0) -> Reply:
    body = b"".join(b"%07d padding padding padding padding padding padding padding\r\n" % i
                    for i in range(size // 64)) if size else b""
    with RawClient(daemon.port) as client:
        client.ehlo()
        reply = client.sendmail("sender@example.org", ["rcpt@example.net"], message(token, subject, body))
        client.quit()
    return reply


def _fill(folder: Path) -> Path:
    """Take every free byte of the file system holding ``folder``."""
    filler = folder.parent / f"filler-{uuid.uuid4().hex}"
    out = open(filler, "wb", buffering=0)  # noqa: SIM115 - closed below; unbuffered: no flush at close
    try:
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 4096)
    finally:
        out.close()
    return filler


def _assert_refused_safely(daemon: Daemon, hop: NextHop, token: str, reply: Reply) -> None:
    assert (reply.code, reply.last[:5]) == (451, "4.3.0"), f"quarantine write failed but the client got {reply}"
    assert token not in quarantined_tokens(_folder(daemon))
    assert all(token_of(m.data) != token for m in hop.messages), "a message to quarantine was relayed"
    [line] = [e for e in daemon.events("message_processed") if e.get("message_id") == f"<{token}@faults.test>"]
    assert line["action"] == "tempfail"
    assert "quarantine" in str(line.get("error"))
    folder = _folder(daemon)
    if folder.is_dir():
        leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [], f"half-written files left behind: {leftovers}"


def _assert_stores_again(daemon: Daemon, hop: NextHop) -> None:
    token = new_token("healed")
    reply = _send(daemon, token, "quarantine-me")
    assert reply.code == 250, f"after healing, quarantine got {reply}"
    assert quarantined_tokens(_folder(daemon))[token] == 1
    assert_still_serving(daemon, hop)


def test_a_full_quarantine_file_system_gives_451_and_mail_keeps_flowing(qd: Daemon, hop: NextHop) -> None:
    assert qd.metrics_port is not None
    before = messages_by_action(scrape(qd.metrics_port))
    filler = _fill(_folder(qd))
    try:
        token = new_token("full")
        _assert_refused_safely(qd, hop, token, _send(qd, token, "quarantine-me"))
        assert_still_serving(qd, hop)  # relaying needs no disk
    finally:
        filler.unlink()
    _assert_stores_again(qd, hop)
    counted = delta(messages_by_action(scrape(qd.metrics_port)), before)
    assert dict(counted) == {"tempfail": 1, "accept": 2, "quarantine": 1}


def test_a_message_larger_than_the_free_space_gives_451_and_leaves_no_partial_entry(
    qd: Daemon, hop: NextHop
) -> None:
    token = new_token("huge")
    reply = _send(qd, token, "quarantine-me", size=TMPFS_SIZE + 64 * 1024)
    _assert_refused_safely(qd, hop, token, reply)
    _assert_stores_again(qd, hop)


def test_a_read_only_quarantine_gives_451(qd: Daemon, hop: NextHop) -> None:
    # A read-only bind mount over the folder: what the daemon sees when the file system was
    # remounted read-only after an error (the daemon's open index stays writable, as then).
    folder = str(_folder(qd))
    done = _run("mount", "--bind", folder, folder)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        done = _run("mount", "-o", "remount,bind,ro", folder)
        assert done.returncode == 0, done.stderr
        token = new_token("ro")
        _assert_refused_safely(qd, hop, token, _send(qd, token, "quarantine-me"))
        assert_still_serving(qd, hop)
    finally:
        _run("umount", folder)
    _assert_stores_again(qd, hop)


@pytest.mark.parametrize("replacement", ["file", "nothing"])
def test_a_quarantine_folder_replaced_under_the_daemon_gives_451(
    qd: Daemon, hop: NextHop, replacement: str
) -> None:
    folder = _folder(qd)
    away = folder.with_name(folder.name + ".away")
    folder.rename(away)
    try:
        if replacement == "file":
            folder.write_bytes(b"not a folder\n")  # writes under it fail with ENOTDIR
        token = new_token(f"gone-{replacement}")
        reply = _send(qd, token, "quarantine-me")
        if reply.code == 250:  # recreating the folder is fine, as long as the copy is there
            assert replacement == "nothing"
            assert quarantined_tokens(folder)[token] == 1
        else:
            _assert_refused_safely(qd, hop, token, reply)
    finally:
        if folder.is_dir():
            for item in folder.iterdir():
                item.rename(away / item.name)
            folder.rmdir()
        elif folder.exists():
            folder.unlink()
        away.rename(folder)
    _assert_stores_again(qd, hop)


def test_after_all_faults_the_quarantine_index_agrees_with_the_files(qd: Daemon, hop: NextHop) -> None:
    _assert_stores_again(qd, hop)
    listed = subprocess.run(
        [sys.executable, "-m", "filterd", "quarantine", "list", "-c", str(qd.config_path), "--json"],
        capture_output=True, text=True, cwd=REPO, check=False, env=dict(os.environ),
    )
    assert listed.returncode == 0, listed.stderr
    ids = sorted(entry["id"] for entry in json.loads(listed.stdout))
    on_disk = sorted(p.stem for p in _folder(qd).glob("*.json"))
    assert ids == on_disk
