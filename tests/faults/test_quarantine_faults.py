"""A quarantine folder that cannot take the message: full, too small for it, read-only, replaced
by a file, deleted under the running daemon; and a full spool (where large messages are kept
while they are read).

A quarantined message is acknowledged only once its copy is on disk, so each of these must
answer ``451 4.3.0`` (the MTA keeps the message and retries), leave no half-written entry, keep
relaying other mail, and store again as soon as the folder is healed.

The tests run as root, where permission bits do not stop writes; a small tmpfs is the real
thing (ENOSPC, EROFS). Without the right to mount, those tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.accounting import delta, message, messages_by_action, quarantined_tokens, token_of
from tests.faults.conftest import RELAY_TIMEOUT, assert_still_serving, new_token, write_rules
from tests.support.daemon import Daemon
from tests.support.faultclient import RawClient, Reply, scrape, stuff
from tests.support.nexthop import NextHop

TMPFS_SIZE = 512 * 1024
SPOOLFS_SIZE = 2 * 1024 * 1024
SPOOL_THRESHOLD = 64 * 1024  # messages above this are spooled to <state_dir>/spool


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


def _mount_tmpfs(folder: Path, size: int) -> None:
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder))
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); "
            "the full/read-only quarantine and spool cases need one"
        )


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small file system for the quarantine."""
    mount_point = tmp_path_factory.mktemp("qfs")
    _mount_tmpfs(mount_point, TMPFS_SIZE)
    try:
        yield mount_point
    finally:
        _run("umount", "-l", str(mount_point))


@pytest.fixture(scope="module")
def spoolfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Another one for the state directory, where large messages are spooled."""
    mount_point = tmp_path_factory.mktemp("spoolfs")
    _mount_tmpfs(mount_point, SPOOLFS_SIZE)
    try:
        yield mount_point
    finally:
        _run("umount", "-l", str(mount_point))


@pytest.fixture(scope="module")
def qd(
    tmp_path_factory: pytest.TempPathFactory, hop: NextHop, tmpfs: Path, spoolfs: Path
) -> Iterator[Daemon]:
    """filterd whose quarantine and spool live on the small file systems."""
    work = tmp_path_factory.mktemp("filterd-q")
    extra = {
        "limits": {"relay_timeout": RELAY_TIMEOUT, "spool_threshold": SPOOL_THRESHOLD},
        "quarantine": {"path": str(tmpfs / "q")},
        "state_dir": str(spoolfs / "state"),
    }
    with Daemon(work, hop.port, rules=write_rules(work), metrics=True, extra=extra) as daemon:
        yield daemon


def _folder(daemon: Daemon) -> Path:
    config = daemon.config_path.read_text()
    for line in config.splitlines():
        if line.strip().startswith("path:"):
            return Path(line.split(":", 1)[1].strip())
    raise AssertionError("no quarantine path in the config")


def _send(daemon: Daemon, token: str, subject: str, size: int = 0) -> Reply:
    body = (
        b"".join(
            b"%07d padding padding padding padding padding padding padding\r\n" % i
            for i in range(size // 64)
        )
        if size
        else b""
    )
    with RawClient(daemon.port) as client:
        client.ehlo()
        reply = client.sendmail(
            "sender@example.org", ["rcpt@example.net"], message(token, subject, body)
        )
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
    assert (reply.code, reply.last[:5]) == (451, "4.3.0"), (
        f"quarantine write failed but the client got {reply}"
    )
    assert token not in quarantined_tokens(_folder(daemon))
    assert all(token_of(m.data) != token for m in hop.messages), (
        "a message to quarantine was relayed"
    )
    [line] = [
        e
        for e in daemon.events("message_processed")
        if e.get("message_id") == f"<{token}@faults.test>"
    ]
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


def test_a_full_quarantine_file_system_gives_451_and_mail_keeps_flowing(
    qd: Daemon, hop: NextHop
) -> None:
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


def test_a_full_spool_gives_451_and_the_rest_of_the_data_is_never_read_as_commands(
    qd: Daemon, hop: NextHop, spoolfs: Path
) -> None:
    # A message larger than spool_threshold goes to <state_dir>/spool while it is read. If that
    # write fails, the rest of the data must still be read (and dropped) up to the end marker:
    # read as commands, a body of NOOP lines followed by RCPT and DATA would deliver a message
    # built from the body, to recipients from the body.
    token = new_token("spool")
    smuggled = new_token("spool-smuggled")
    body = (
        b"NOOP\r\n" * ((SPOOL_THRESHOLD * 3) // 6)
        + b"RCPT TO:<victim@example.net>\r\nDATA\r\n"
        + message(smuggled, "smuggled")
    )
    filler = _fill(spoolfs / "state")
    try:
        with RawClient(qd.port) as client:
            client.ehlo()
            assert client.command("MAIL FROM:<sender@example.org>").code == 250
            assert client.command("RCPT TO:<rcpt@example.net>").code == 250
            assert client.command("DATA").code == 354
            client.send(stuff(message(token, "big", body)))
            reply = client.read_reply()
            unasked = client.unasked_replies(quiet=1.5)  # the session may also just be closed
        time.sleep(0.3)
        delivered = [m.recipients for m in hop.messages if token_of(m.data) in (token, smuggled)]
        assert 400 <= reply.code < 500, f"the spool write failed, yet the client got {reply}"
        assert delivered == [], f"a message built from the body was delivered to {delivered}"
        assert unasked == [], (
            f"the rest of the data was read as {len(unasked)} commands: "
            f"{sorted({str(r) for r in unasked})}"
        )
    finally:
        filler.unlink()
    assert_still_serving(qd, hop)
    with RawClient(qd.port) as client:  # large messages go through again once there is room
        client.ehlo()
        big = new_token("spool-ok")
        reply = client.sendmail(
            "sender@example.org",
            ["rcpt@example.net"],
            message(big, "big", b"x" * 100 + b"\r\n" * (SPOOL_THRESHOLD // 2)),
        )
        assert reply.code == 250, str(reply)
    assert [len(m.data) > SPOOL_THRESHOLD for m in hop.messages if token_of(m.data) == big] == [
        True
    ]


def test_after_all_faults_the_quarantine_index_agrees_with_the_files(
    qd: Daemon, hop: NextHop
) -> None:
    _assert_stores_again(qd, hop)
    listed = qd.quarantine("list", "--json")
    assert listed.returncode == 0, listed.stderr
    ids = sorted(entry["id"] for entry in json.loads(listed.stdout))
    on_disk = sorted(p.stem for p in _folder(qd).glob("*.json"))
    assert ids == on_disk
