"""Large messages spool to disk past ``limits.spool_threshold`` and still arrive byte for byte."""

from __future__ import annotations

import smtplib
from pathlib import Path

from tests.support.daemon import Daemon
from tests.support.nexthop import NextHop


def big_message(size: int) -> bytes:
    lines = [
        b"From: a@example.org",
        b"To: b@example.net",
        b"Subject: big",
        b"X-Spam-Flag: YES",
        b"",
    ]
    n = 0
    while sum(len(line) + 2 for line in lines) < size:
        # lines that start with dots exercise the stuffing across block boundaries
        lines.append(b"." * (n % 3) + b"line %d " % n + b"x" * (n % 997))
        n += 1
    return b"\r\n".join(lines) + b"\r\n"


def test_a_large_message_is_spooled_and_relayed_intact(tmp_path: Path, nexthop: NextHop) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    raw = big_message(3_000_000)
    extra = {"limits": {"spool_threshold": "256K", "max_message_size": "20M"}}
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as smtp:
            assert smtp.sendmail("a@example.org", ["b@example.net"], raw) == {}
        [received] = nexthop.wait_for(1)
        # identical apart from the forged X-Spam-Flag that filterd always strips
        assert received.data == raw.replace(b"X-Spam-Flag: YES\r\n", b"")
        [line] = daemon.wait_event("message_processed")
        assert line["size"] == len(raw)
    assert list((tmp_path / "state" / "spool").iterdir()) == []


def test_a_spooled_message_can_be_quarantined_whole(tmp_path: Path, nexthop: NextHop) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: big-one\n    if: {size: {gt: 1M}}\n    then: {action: quarantine}\n"
    )
    raw = big_message(2_000_000)
    extra = {"limits": {"spool_threshold": "256K", "max_message_size": "20M"}}
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as smtp:
            assert smtp.sendmail("a@example.org", ["b@example.net"], raw) == {}
        [line] = daemon.wait_event("message_processed")
        assert line["action"] == "quarantine"
    stored = list((tmp_path / "state" / "quarantine").glob("*.eml"))
    assert len(stored) == 1
    assert stored[0].read_bytes() == raw
    assert nexthop.messages == []


def test_an_oversized_spooled_message_gets_552_and_leaves_nothing(
    tmp_path: Path, nexthop: NextHop
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    extra = {"limits": {"spool_threshold": "256K", "max_message_size": "1M"}}
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@example.org")[0] == 250
            assert smtp.rcpt("b@example.net")[0] == 250
            code, _ = smtp.data(big_message(3_000_000))
            assert code == 552
    assert list((tmp_path / "state" / "spool").iterdir()) == []
    assert nexthop.messages == []
