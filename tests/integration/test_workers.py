"""Several worker processes under a supervisor: shared sockets, restart, signal fan-out, metrics."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.nexthop import NextHop

PLAIN = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def worker_pids(supervisor_pid: int) -> list[int]:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def wait_workers(daemon: Daemon, count: int, timeout: float = 15.0) -> list[int]:
    assert daemon.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(daemon.proc.pid)
        if len(pids) == count and len(daemon.events("daemon_started")) >= count:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"expected {count} workers, have {worker_pids(daemon.proc.pid)}")


def send(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        for _ in range(count):
            assert smtp.sendmail("a@example.org", ["b@example.net"], PLAIN) == {}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def counter(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{([^}}]*)\}} (\S+)$", line)
        if match and all(part in match.group(1).split(",") for part in wanted.split(",") if part):
            total += float(match.group(2))
    return total


def test_workers_share_the_load_and_metrics_merge(tmp_path: Path, nexthop: NextHop) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    with Daemon(tmp_path, nexthop.port, rules=rules, extra={"workers": 2}, metrics=True) as daemon:
        wait_workers(daemon, 2)
        for _ in range(6):
            send(daemon.port, 5)
        assert len(nexthop.wait_for(30)) == 30
        assert daemon.metrics_port is not None
        text = scrape(daemon.metrics_port)
        assert counter(text, "filterd_messages_total", action="accept") == 30
        served_by = {line["pid"] for line in daemon.events("daemon_started")}
        assert len(served_by) == 2


def test_a_dead_worker_is_restarted_and_mail_keeps_flowing(
    tmp_path: Path, nexthop: NextHop
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    with Daemon(tmp_path, nexthop.port, rules=rules, extra={"workers": 2}) as daemon:
        first, second = wait_workers(daemon, 2)
        os.kill(first, signal.SIGKILL)
        send(daemon.port, 3)  # the other worker serves meanwhile
        assert daemon.wait_event("worker_died")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and first in worker_pids(daemon.proc.pid):  # type: ignore[union-attr]
            time.sleep(0.1)
        pids = wait_workers(daemon, 2)
        assert first not in pids
        assert second in pids
        send(daemon.port, 3)
        assert len(nexthop.wait_for(6)) == 6


def test_sighup_is_validated_once_and_fanned_out(tmp_path: Path, nexthop: NextHop) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    with Daemon(tmp_path, nexthop.port, rules=rules, extra={"workers": 2}, metrics=True) as daemon:
        wait_workers(daemon, 2)
        rules.write_text(
            "rules:\n  - name: block\n    if: {subject: {contains: blockme}}\n"
            '    then: {action: reject, reply: "550 5.7.1 blocked here"}\n'
        )
        daemon.signal(signal.SIGHUP)
        assert len(daemon.wait_event("config_reloaded", 2)) == 2
        for _ in range(4):  # whichever worker takes the connection has the new rules
            with (
                smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp,
                pytest.raises(smtplib.SMTPDataError) as error,
            ):
                smtp.sendmail("a@example.org", ["b@example.net"], b"Subject: blockme\r\n\r\nx\r\n")
            assert error.value.smtp_code == 550
        rules.write_text("rules: [this is: not valid\n")
        daemon.signal(signal.SIGHUP)
        assert daemon.wait_event("reload_failed")
        assert daemon.metrics_port is not None
        text = scrape(daemon.metrics_port)
        assert counter(text, "filterd_config_reloads_total", result="success") == 1
        assert counter(text, "filterd_config_reloads_total", result="failure") == 1


def test_sigterm_stops_every_worker_and_exits_0(tmp_path: Path, nexthop: NextHop) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    daemon = Daemon(tmp_path, nexthop.port, rules=rules, extra={"workers": 2}).start()
    pids = wait_workers(daemon, 2)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
