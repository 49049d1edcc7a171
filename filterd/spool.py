"""Spooling of large message bodies to disk, so memory stays flat however big DATA gets.

The ingress keeps DATA in memory up to ``limits.spool_threshold``; past it, complete lines are
un-dot-stuffed and appended to a private file in ``<state_dir>/spool`` while the reader goes on.
The message then carries its first ``spool_threshold`` bytes (the header and the start of the
body: what ``raw:`` rules and the header edits see), its rules run on the whole of it read back
once (``read_all``, one message at a time in the daemon), and the relay streams it from disk.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from filterd.folders import make_private_folder
from filterd.logsetup import get_logger

log = get_logger("filterd.spool")
READ_BLOCK = 1 << 20


class SpoolFile:
    """An open spool file being written; ``close`` keeps it, ``discard`` removes it."""

    def __init__(self, folder: str) -> None:
        make_private_folder(Path(folder))  # (the service user's also when made by root)
        # The writer's pid in the name: when a worker dies, its supervisor removes the files
        # it left (see leftovers_of) while the other workers' stay in use.
        fd, self.path = tempfile.mkstemp(prefix=f"msg-{os.getpid()}-", suffix=".eml", dir=folder)
        self.file = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, block: bytes | bytearray | memoryview) -> None:
        self.file.write(block)
        self.size += len(block)

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        discard(self.path)


def leftovers_of(folder: str | Path, pid: int) -> list[Path]:
    """The spool files process ``pid`` wrote in ``folder`` (to remove once it has died: their
    messages were never acknowledged, and the MTA sends them again)."""
    return sorted(Path(folder).glob(f"msg-{pid}-*.eml"))


def discard(path: str) -> None:
    """Remove a spool file. A file that will not go away is left behind, never an error: by
    then the message is answered for, and failing here would turn a delivered message's 250
    into a 451 and have the MTA send it again."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("spool_discard_failed", path=path, error=str(exc))


def read_prefix(path: str, limit: int) -> bytes:
    """The first ``limit`` bytes of a spool file, cut as ``prefix_of`` cuts them."""
    with open(path, "rb") as handle:
        return prefix_of(handle, limit)


def prefix_of(handle: BinaryIO, limit: int) -> bytes:
    """The first ``limit`` bytes of a message read from ``handle``, cut back to a line end, and
    at least the whole header block, however long, so header rules and header edits (the
    removal of forged ``X-Spam-*`` fields) see every field."""
    data = handle.read(limit)
    searched = 0
    while b"\r\n\r\n" not in data[searched:] and not data.startswith(b"\r\n"):
        more = handle.read(READ_BLOCK)
        if not more:
            return data
        searched = max(0, len(data) - 3)
        data += more
    if not handle.read(1):  # the whole message: nothing to cut
        return data
    cut = data.rfind(b"\n")
    return data[: cut + 1] if cut >= 0 else data


def read_all(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def iter_lines_blocks(path: str, offset: int, block_size: int = READ_BLOCK) -> Iterator[bytes]:
    """The file from ``offset`` in blocks that each end at a line end (except maybe the last)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        # A line longer than a block grows ``carry`` block by block: appending to a bytearray
        # and searching only the new block keeps that linear when blocks are small.
        carry = bytearray()
        while True:
            data = handle.read(block_size)
            if not data:
                break
            cut = data.rfind(b"\n")
            if cut < 0:
                carry += data
                continue
            yield bytes(carry) + data[: cut + 1] if carry else data[: cut + 1]
            carry = bytearray(data[cut + 1 :])
        if carry:
            yield bytes(carry)
