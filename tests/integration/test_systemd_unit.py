"""The shipped systemd files, checked by systemd's own tools.

`systemd-analyze verify` on the unit (with ExecStart's binary pointed at a temporary executable,
as /opt/filterd is not installed here; nothing else changed), `systemd-analyze security
--offline=true` for the exposure score, and systemd-sysusers / systemd-tmpfiles run against a
scratch root to prove the snippets create the user and directories the unit relies on.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "filterd.service"
INSTALLED_BINARY = "/opt/filterd/bin/filterd"
# systemd's bands (src/analyze/analyze-security.c): OK is below 5.0, SAFE below 1.0.
OK_BAND_LIMIT = 5.0
GOOD_BANDS = {"OK", "SAFE", "PERFECT"}

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)


def _unit_with_binary(tmp_path: Path, text: str | None = None) -> Path:
    """Copy the unit into tmp_path with the /opt binary swapped for an executable that exists."""
    fake = tmp_path / "bin" / "filterd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    source = UNIT.read_text() if text is None else text
    assert source.count(INSTALLED_BINARY) == 1, "ExecStart should name the venv binary once"
    unit = tmp_path / "filterd.service"
    unit.write_text(source.replace(INSTALLED_BINARY, str(fake)))
    return unit


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit_with_binary(tmp_path)
    result = _run("systemd-analyze", "verify", str(unit), cwd=tmp_path)
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if unit.name in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints == []


@needs_analyze
@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("\nWatchdogSec=30\n", "\nWatchdogSecs=30\n"), "Unknown key"),
        (("\nType=notify\n", "\nType=notifyy\n"), "Failed to parse service type"),
    ],
)
def test_verify_catches_a_broken_unit(
    tmp_path: Path, change: tuple[str, str], complaint: str
) -> None:
    """The check above can fail: a misspelt key or bad value is reported."""
    old, new = change
    text = UNIT.read_text()
    assert old in text
    unit = _unit_with_binary(tmp_path, text.replace(old, new, 1))
    result = _run("systemd-analyze", "verify", str(unit), cwd=tmp_path)
    assert complaint in result.stdout + result.stderr


@needs_analyze
def test_unit_security_exposure_is_ok_or_better(tmp_path: Path) -> None:
    unit = _unit_with_binary(tmp_path)
    result = _run("systemd-analyze", "security", "--offline=true", "--no-pager", str(unit))
    assert result.returncode == 0, result.stderr
    match = re.search(
        r"Overall exposure level for filterd\.service:\s*([0-9]+(?:\.[0-9]+)?)\s+([A-Z]+)",
        result.stdout,
    )
    assert match, result.stdout[-2000:]
    score, band = float(match.group(1)), match.group(2)
    print(f"systemd-analyze security: filterd.service exposure {score} {band}")
    assert score < OK_BAND_LIMIT
    assert band in GOOD_BANDS


def test_unit_declares_the_contract() -> None:
    """What the daemon and the docs rely on; a silent edit of these breaks deployment."""
    d = _directives(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "ExecStart": [f"{INSTALLED_BINARY} serve -c /etc/filterd/filterd.yaml"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["78"],
        "User": ["_filterd"],
        "StateDirectory": ["filterd"],
        "ConfigurationDirectory": ["filterd"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "PrivateDevices": ["yes"],
        "CapabilityBoundingSet": [""],
        "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    }
    for key, values in expected.items():
        assert d.get(key) == values, key
    assert "@system-service" in d["SystemCallFilter"]
    # The stop timeout must outlast the drain bound of the shipped config, with a margin.
    shipped = yaml.safe_load((REPO / "filterd.yaml").read_text())
    drain = float(shipped.get("limits", {}).get("drain_timeout", 30))
    assert int(d["TimeoutStopSec"][0]) >= drain + 15


def test_unit_starts_before_and_stops_after_the_mta_daemons() -> None:
    """Ordered against the units that run the MTA daemons, not only against Debian's
    postfix.service, a oneshot that runs /bin/true: Postfix itself is postfix@-.service."""
    d = _directives(UNIT.read_text())
    before = {name for value in d.get("Before", []) for name in value.split()}
    assert {"postfix.service", "postfix@-.service", "exim4.service"} <= before
    assert "network.target" in {name for value in d.get("After", []) for name in value.split()}


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_snippet_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    target = tmp_path / "usr/lib/sysusers.d/filterd.conf"
    target.parent.mkdir(parents=True)
    shutil.copy(SYSTEMD_DIR / "filterd.sysusers.conf", target)
    result = _run("systemd-sysusers", f"--root={tmp_path}", "filterd.conf")
    assert result.returncode == 0, result.stderr
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    assert "_filterd" in users
    _name, _, uid, gid, _, home, shell = users["_filterd"]
    assert int(uid) < 1000  # a system user
    assert home == "/var/lib/filterd"
    assert shell == "/usr/sbin/nologin"
    groups = {
        line.split(":")[0]: line.split(":")[2]
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    assert groups["_filterd"] == gid


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles missing",
)
def test_tmpfiles_snippet_creates_private_state_dirs(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for kind, name in (
        ("sysusers.d", "filterd.sysusers.conf"),
        ("tmpfiles.d", "filterd.tmpfiles.conf"),
    ):
        target = tmp_path / "usr/lib" / kind / "filterd.conf"
        target.parent.mkdir(parents=True)
        shutil.copy(SYSTEMD_DIR / name, target)
    assert _run("systemd-sysusers", f"--root={tmp_path}", "filterd.conf").returncode == 0
    result = _run("systemd-tmpfiles", f"--root={tmp_path}", "--create", "filterd.conf")
    assert result.returncode == 0, result.stderr
    uid = next(
        int(line.split(":")[2])
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
        if line.startswith("_filterd:")
    )
    for sub in ("var/lib/filterd", "var/lib/filterd/quarantine"):
        st = (tmp_path / sub).stat()
        assert stat.S_ISDIR(st.st_mode)
        assert st.st_uid == uid
        assert stat.S_IMODE(st.st_mode) == 0o700
