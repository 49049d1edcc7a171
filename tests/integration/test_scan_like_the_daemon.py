"""A spooled message: the daemon's rules see all of it, and ``filterd scan`` agrees."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest

from filterd.cli import main
from tests.support.inprocess import serve_in_process
from tests.support.nexthop import NextHop
from tests.unit.test_cli import EXE_RULES, exe_after

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
BODY_RULES = f"""\
rules:
  - name: gtube
    if: {{body: {{contains: "{GTUBE.decode()}"}}}}
    then: {{action: reject}}
"""


def _send(raw: bytes) -> object:
    def send(port: int) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            try:
                smtp.sendmail("a@x.example", ["b@y.example"], raw)
            except smtplib.SMTPDataError as refused:
                return refused.smtp_code
            return 250

    return send


def test_an_attachment_behind_the_spool_threshold_is_seen_by_the_daemon_and_by_scan(
    tmp_path: Path, nexthop: NextHop, capsys: pytest.CaptureFixture[str]
) -> None:
    # Padding a message past limits.spool_threshold must not hide what follows the padding.
    raw = exe_after(400_000)
    code, _ = serve_in_process(
        tmp_path,
        nexthop,
        _send(raw.replace(b"\n", b"\r\n")),
        limits={"spool_threshold": 128 * 1024},
        rules=EXE_RULES,
    )
    assert code == 554
    assert nexthop.messages == []

    (tmp_path / "r.yaml").write_text(EXE_RULES)
    config = tmp_path / "c.yaml"
    config.write_text("rules: r.yaml\nlimits: {spool_threshold: 128K}\n")
    (tmp_path / "m.eml").write_bytes(raw)
    capsys.readouterr()  # the daemon's log lines
    assert main(["scan", "-c", str(config), "--json", str(tmp_path / "m.eml")]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "reject"


def test_a_text_part_behind_the_spool_threshold_is_scanned(
    tmp_path: Path, nexthop: NextHop
) -> None:
    raw = (
        b"From: a@x.example\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n"
        b"--BB\r\nContent-Type: text/plain\r\n\r\n"
        + (b"harmless text " * 5 + b"\r\n") * 5000
        + b"--BB\r\nContent-Type: text/plain\r\n\r\n"
        + GTUBE
        + b"\r\n--BB--\r\n"
    )
    assert len(raw) > 256 * 1024
    code, _ = serve_in_process(
        tmp_path, nexthop, _send(raw), limits={"spool_threshold": 128 * 1024}, rules=BODY_RULES
    )
    assert code == 554
    assert nexthop.messages == []
