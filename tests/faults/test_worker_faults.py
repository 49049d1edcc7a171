"""Worker processes dying under the supervisor (``workers: 2``): the daemon must stay
stoppable. (The kill -9 under load and its accounting is in test_accounting_soak.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.conftest import assert_still_serving, write_rules
from tests.support.daemon import Daemon
from tests.support.faultclient import wait_until
from tests.support.nexthop import NextHop


def _workers(daemon: Daemon) -> list[int]:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize(
    "delay", [0.2, 2.5], ids=["during-the-restart-backoff", "after-the-restart"]
)
def test_sigterm_after_a_worker_was_killed_still_drains_and_exits_0(
    tmp_path: Path, hop: NextHop, delay: float
) -> None:
    daemon = Daemon(tmp_path, hop.port, rules=write_rules(tmp_path), extra={"workers": 2}).start()
    try:
        assert wait_until(
            lambda: len(_workers(daemon)) == 2 and len(daemon.events("daemon_started")) == 2,
            timeout=20,
        )
        assert_still_serving(daemon, hop)
        os.kill(_workers(daemon)[0], signal.SIGKILL)
        time.sleep(delay)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=8)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, (
            f"SIGTERM {delay}s after a worker died: still running after "
            f"{time.monotonic() - started:.0f}s (events: "
            f"{[e.get('event') for e in daemon.logs()][-8:]})"
        )
    finally:
        daemon.stop(timeout=5)
