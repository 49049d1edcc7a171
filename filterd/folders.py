"""Private state folders, and who owns what root creates in them.

The daemon runs as its own user (``_filterd``); an admin may run ``filterd`` as root, in the
same state folder: a file or folder root leaves there, root's and private, is one the daemon
can no longer use. So root hands what it creates in a folder of another user's to that user,
by descriptor, never by name (that user could swap a name for a symlink to have root change
a file of their choosing). Used by the spool, the quarantine and the start-up of the daemon.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

Owner = tuple[int, int]
"""A (uid, gid) pair."""

PRIVATE_FOLDER_MODE = 0o700


def folder_owner(folder: Path) -> Owner | None:
    """Who the files this process creates in ``folder`` must belong to: the folder's owner
    when this process is root and the folder is another user's (an admin running the CLI
    as root, the daemon running as ``_filterd``); None when the creator may keep them."""
    if os.geteuid() != 0:
        return None  # only root can give files away, and only root's files are the problem
    found = os.stat(folder)
    return None if found.st_uid == 0 else (found.st_uid, found.st_gid)


def give_to(fd: int, owner: Owner | None) -> None:
    """Hand the file open as ``fd``, just created, to ``owner`` (see ``folder_owner``).
    By descriptor, never by name: the folder's owner could swap a name for a symlink."""
    if owner is not None:
        os.fchown(fd, *owner)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_folder(path: Path) -> None:
    """Create ``path`` and any missing parents 0700 whatever the umask, each owned as
    ``folder_owner`` of its parent says."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process got there first
            os.mkdir(folder, PRIVATE_FOLDER_MODE)
            _settle_new_folder(folder)
            fsync_dir(folder.parent)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")


def _settle_new_folder(folder: Path) -> None:
    """Give a folder just made its mode (the umask may have taken bits) and its owner."""
    try:
        # On the folder as opened, never through its name: the parent's owner may have
        # swapped the name for a symlink meanwhile, to have root chmod or chown a file of
        # their choosing.
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except PermissionError:
        if os.geteuid() == 0:
            raise
        # A umask without the owner's read bit: the folder cannot be opened to fix it. Not
        # root, this process gives nothing away, and only its own folders' names could be
        # swapped: the name will do.
        os.chmod(folder, PRIVATE_FOLDER_MODE)
        return
    try:
        os.fchmod(fd, PRIVATE_FOLDER_MODE)
        give_to(fd, folder_owner(folder.parent))
    finally:
        os.close(fd)
