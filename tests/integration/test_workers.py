"""Several worker processes under a supervisor: shared sockets, restart, signal fan-out, metrics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.faultclient import RawClient
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


def assert_replaced(daemon: Daemon, *, gone: int, kept: int) -> None:
    """Two workers again: ``gone`` replaced by a new one, ``kept`` still serving."""
    pids = wait_workers(daemon, 2)
    assert gone not in pids
    assert kept in pids


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


def test_session_ids_are_unique_across_workers(tmp_path: Path, nexthop: NextHop) -> None:
    """Each worker counts its sessions from 1; the id's worker pid keeps a relay_failed or
    message_failed line tied to the one message_processed line of its session."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    with Daemon(tmp_path, nexthop.port, rules=rules, extra={"workers": 2}) as daemon:
        pids = {str(pid) for pid in wait_workers(daemon, 2)}
        # Sessions open at once, so both workers take some.
        clients = [smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) for _ in range(8)]
        for client in clients:
            assert client.sendmail("a@example.org", ["b@example.net"], PLAIN) == {}
        for client in clients:
            client.quit()
        lines = daemon.wait_event("message_processed", 8)
    ids = [line["session"] for line in lines]
    assert len(set(ids)) == len(ids), ids
    for session in ids:
        pid, _, number = session.partition("-")
        assert pid in pids, f"{session}: not prefixed by a worker's pid {sorted(pids)}"
        assert re.fullmatch(r"[0-9a-f]+", number), session


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
        assert_replaced(daemon, gone=first, kept=second)
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
        # the initial load and the good reload, each counted once for all the workers
        assert counter(text, "filterd_config_reloads_total", result="success") == 2
        assert counter(text, "filterd_config_reloads_total", result="failure") == 1
        # every worker reported its load: merged, the stalest one's time, not a worker's 0
        stamp = re.search(
            r"^filterd_config_last_reload_success_timestamp_seconds (\S+)$", text, re.MULTILINE
        )
        assert stamp is not None
        assert float(stamp.group(1)) > 1e9


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


def test_reloads_apply_in_the_order_of_their_signals(tmp_path: Path, nexthop: NextHop) -> None:
    """A slow reload (a big rule set) started first must not finish last and put the older
    rules back over a quick one signalled after it."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    big = "rules:\n" + "".join(
        f"  - {{name: r{n}, if: {{subject: {{regex: 'w{n}[a-z]+x'}}}}, then: {{score: 1}}}}\n"
        for n in range(4000)
    )
    blocking = (
        "rules:\n  - name: block\n    if: {subject: {contains: blockme}}\n"
        '    then: {action: reject, reply: "550 5.7.1 blocked here"}\n'
    )
    # One process: with workers, each reload a worker runs reads the files as they are when
    # the supervisor's SIGHUP reaches it, which hides the race this is about.
    with Daemon(tmp_path, nexthop.port, rules=rules) as daemon:
        daemon.wait_event("daemon_started")
        rules.write_text(big)
        daemon.signal(signal.SIGHUP)
        time.sleep(0.1)  # the big set is loading now
        rules.write_text(blocking)
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("config_reloaded", 2, timeout=60)
        for _ in range(2):
            with (
                smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp,
                pytest.raises(smtplib.SMTPDataError) as error,
            ):
                smtp.sendmail("a@example.org", ["b@example.net"], b"Subject: blockme\r\n\r\nx\r\n")
            assert error.value.smtp_code == 550


def test_a_worker_that_keeps_failing_is_restarted_ever_less_often(
    tmp_path: Path, nexthop: NextHop
) -> None:
    """With the config file broken (an edit half done), a restarted worker exits 78 at once:
    restarting it every second for ever would only burn CPU."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    with Daemon(tmp_path, nexthop.port, rules=rules, extra={"workers": 2}) as daemon:
        first, _ = wait_workers(daemon, 2)
        rules.write_text("rules: [this is: not valid\n")
        os.kill(first, signal.SIGKILL)
        deaths = daemon.wait_event("worker_died", 3, timeout=20)
        assert [death["restart_in_seconds"] for death in deaths[:3]] == [1.0, 2.0, 4.0]
        assert [death["code"] for death in deaths[1:3]] == [78, 78]
        send(daemon.port, 2)  # the other worker serves all along


def test_ctrl_c_lets_the_workers_finish_what_they_deliver(tmp_path: Path, nexthop: NextHop) -> None:
    """Ctrl-C reaches the whole process group: each worker must drain once, not take the
    supervisor's SIGTERM that follows for a second signal and drop the message it relays."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    nexthop.behaviour.delay = {"dot": 1.5}  # the message is in flight when Ctrl-C comes
    with Daemon(tmp_path, nexthop.port, rules=rules, extra={"workers": 2}) as daemon:
        wait_workers(daemon, 2)
        assert daemon.proc is not None
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp:
            smtp.ehlo()
            smtp.mail("a@example.org")
            smtp.rcpt("b@example.net")
            smtp.putcmd("data")
            assert smtp.getreply()[0] == 354
            smtp.send(PLAIN + b".\r\n")
            time.sleep(0.5)
            for pid in [daemon.proc.pid, *worker_pids(daemon.proc.pid)]:
                os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the group
            code, _ = smtp.getreply()
        assert code == 250
        assert daemon.wait() == 0
    assert len(nexthop.messages) == 1


def test_a_reload_while_the_workers_start_does_not_kill_them(
    tmp_path: Path, nexthop: NextHop
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    daemon = Daemon(tmp_path, nexthop.port, rules=rules, extra={"workers": 2})
    with daemon:
        assert daemon.proc is not None
        daemon.signal(signal.SIGHUP)  # right after the supervisor listens: workers are starting
        wait_workers(daemon, 2)
        time.sleep(1.0)
        assert daemon.events("worker_died") == []


def test_a_worker_whose_loop_stops_is_killed_and_replaced(tmp_path: Path, nexthop: NextHop) -> None:
    """systemd's watchdog hears only the supervisor: a worker wedged in a loop that never
    yields would keep its share of the connections and answer none, for good."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    extra = {"workers": 2, "limits": {"worker_stall_timeout": 2}}
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        stuck, other = wait_workers(daemon, 2)
        os.kill(stuck, signal.SIGSTOP)  # as good as a loop that never yields
        try:
            [stalled] = daemon.wait_event("worker_stalled", timeout=15)
            assert stalled["pid"] == stuck
            assert daemon.wait_event("worker_died", timeout=15)[0]["pid"] == stuck
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGCONT)
        assert_replaced(daemon, gone=stuck, kept=other)
        send(daemon.port, 4)
        assert len(nexthop.wait_for(4)) == 4


def test_a_killed_workers_spool_files_are_removed(tmp_path: Path, nexthop: NextHop) -> None:
    """A worker killed in the middle of a large message leaves its spool file: nobody will
    relay it (the MTA sends the message again), and only a full restart cleaned them up."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    extra = {"workers": 2, "limits": {"spool_threshold": "64K"}}
    spool = tmp_path / "state" / "spool"
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        wait_workers(daemon, 2)
        client = RawClient(daemon.port)
        client.ehlo()
        client.command("MAIL FROM:<a@example.org>")
        client.command("RCPT TO:<b@example.net>")
        assert client.command("DATA").code == 354
        client.send(b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 4000)  # 312 KB, no end
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not list(spool.glob("msg-*.eml")):
            time.sleep(0.05)
        [left] = list(spool.glob("msg-*.eml"))
        writer = int(left.name.split("-")[1])
        os.kill(writer, signal.SIGKILL)
        assert daemon.wait_event("worker_died")[0]["pid"] == writer
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and left.exists():
            time.sleep(0.05)
        assert not left.exists()
        client.abort()
