"""iter_lines_blocks: the relay streams a spool file in blocks that must each end at a line end.
discard: removing a spool file never fails the message it held."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd.spool import discard, iter_lines_blocks

SAMPLES = [
    b"",
    b"one line without end",
    b"a\r\nb\r\n",
    b"short\r\n" + b"x" * 5000 + b"\r\nafter\r\n.dot\r\n",  # a line longer than any block
    b"x" * 3000,  # one long line, no line end at all
    b"bare\rcr\nand lf\r\n\r\n" * 50 + b"tail",
]


@pytest.mark.parametrize("data", SAMPLES)
@pytest.mark.parametrize("block_size", [1, 7, 64, 1000, 1 << 20])
@pytest.mark.parametrize("offset", [0, 3])
def test_blocks_end_at_line_ends_and_rebuild_the_file(
    tmp_path: Path, data: bytes, block_size: int, offset: int
) -> None:
    path = tmp_path / "msg.eml"
    path.write_bytes(data)
    blocks = list(iter_lines_blocks(str(path), offset, block_size))
    assert b"".join(blocks) == data[offset:]
    assert all(blocks)
    for block in blocks[:-1]:
        assert block.endswith(b"\n")


def test_a_spool_file_that_will_not_go_away_is_left_without_an_error(tmp_path: Path) -> None:
    # By the time a spool file is removed its message is answered for: an error here would turn
    # a relayed message's 250 into a 451, and the MTA would send it again.
    stuck = tmp_path / "msg-stuck.eml"
    stuck.mkdir()  # unlink() fails on it (EISDIR), as on a file system gone read-only
    discard(str(stuck))
    discard(str(tmp_path / "gone.eml"))  # already removed: nothing to do
    assert stuck.exists()
