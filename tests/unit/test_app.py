"""The daemon's process set-up (filterd/app.py) that the other tests do not reach."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Allocates and frees a 20 MB buffer three times in a thread, as the rules of a spooled message
# do, and prints how much of it the process still holds (MB of RSS).
_HELD_AFTER = """
import sys, threading
from filterd.app import return_large_buffers_to_the_system

def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024

if sys.argv[1] == "tuned":
    return_large_buffers_to_the_system()

def work():
    for _ in range(3):
        buffer = b"x" * (20 << 20)
        del buffer

before = rss_mb()
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(rss_mb() - before)
"""


def _held_mb(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _HELD_AFTER, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return int(done.stdout)


def test_a_freed_large_buffer_leaves_the_process() -> None:
    """glibc raises its mmap threshold to the size of a freed large buffer, so the next one
    comes from the heap and stays in RSS once freed; each serving process keeps the threshold
    where it starts (``return_large_buffers_to_the_system``)."""
    assert _held_mb("plain") >= 15  # what the default does: the reason for the setting
    assert _held_mb("tuned") < 5
