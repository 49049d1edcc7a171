"""``filterd scan`` gives a large message the verdict the daemon gives it over SMTP."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest

from filterd.cli import main
from tests.support.inprocess import serve_in_process
from tests.support.nexthop import NextHop
from tests.unit.test_cli import EXE_RULES, exe_after


def test_a_spooled_message_gets_the_same_verdict_from_scan_and_the_daemon(
    tmp_path: Path, nexthop: NextHop, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = exe_after(400_000)
    crlf = raw.replace(b"\n", b"\r\n")

    def send(port: int) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            return smtp.sendmail("a@x.example", ["b@y.example"], crlf)

    refused, _ = serve_in_process(
        tmp_path, nexthop, send, limits={"spool_threshold": 128 * 1024}, rules=EXE_RULES
    )
    assert refused == {}  # relayed: the daemon never saw the attachment past the threshold
    assert len(nexthop.wait_for(1)) == 1

    (tmp_path / "r.yaml").write_text(EXE_RULES)
    config = tmp_path / "c.yaml"
    config.write_text("rules: r.yaml\nlimits: {spool_threshold: 128K}\n")
    (tmp_path / "m.eml").write_bytes(raw)
    capsys.readouterr()  # the daemon's log lines
    assert main(["scan", "-c", str(config), "--json", str(tmp_path / "m.eml")]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "accept"
