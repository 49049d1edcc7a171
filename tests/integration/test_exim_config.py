"""docs/exim.md's Exim configuration, parsed and routed by Debian's real Exim.

Exim cannot be installed beside Postfix, so the test fetches ``exim4-daemon-light`` with
``apt-get download`` and unpacks it into a temp dir (tests/e2e/exim.py); it skips, saying why,
when that is not possible (no apt, no package lists, no network to the Debian mirror).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.exim import (
    EximBinary,
    EximPorts,
    EximUnavailable,
    doc_blocks,
    fetch_exim,
    render_config,
)

PORTS = EximPorts(smtp=2525, filter=10024, reinject=10025, sink=2526)


@pytest.fixture(scope="module")
def exim(tmp_path_factory: pytest.TempPathFactory) -> EximBinary:
    if os.geteuid() != 0:
        pytest.skip("unpacking and running Exim's setuid binary needs root")
    try:
        return fetch_exim(tmp_path_factory.mktemp("exim-pkg"))
    except EximUnavailable as exc:
        pytest.skip(f"Debian's exim4-daemon-light is not available: {exc}")


def _config(tmp_path: Path, exim: EximBinary, blocks: dict[str, str] | None = None) -> Path:
    config = tmp_path / "exim.conf"
    config.write_text(render_config(blocks or doc_blocks(), PORTS, tmp_path, exim.exim))
    return config


def test_exim_parses_the_documented_config(exim: EximBinary, tmp_path: Path) -> None:
    config = _config(tmp_path, exim)
    result = exim.run(config, "-bV")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Configuration file is {config}" in result.stdout
    assert "error" not in result.stderr.lower()


@pytest.mark.parametrize(
    ("interface", "router"),
    [
        (f"192.0.2.1.{PORTS.smtp}", "filterd"),  # mail from the Internet goes to filterd
        (f"127.0.0.1.{PORTS.reinject}", "to_sink"),  # mail filterd hands back is routed on
        (None, "to_sink"),  # locally made mail (bounces, sendmail) is not filtered
    ],
)
def test_exim_routes_as_documented(
    exim: EximBinary, tmp_path: Path, interface: str | None, router: str
) -> None:
    config = _config(tmp_path, exim)
    args = ["-oMi", interface] if interface else []
    result = exim.run(config, "-bt", *args, "bob@example.net")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"router = {router}, transport = {router}" in result.stdout


def test_a_broken_block_is_caught(exim: EximBinary, tmp_path: Path) -> None:
    """The -bV check can fail: a misspelt transport option is an error."""
    blocks = doc_blocks()
    assert "allow_localhost" in blocks["transports"]
    blocks["transports"] = blocks["transports"].replace("allow_localhost", "allow_localhosts")
    result = exim.run(_config(tmp_path, exim, blocks), "-bV")
    assert result.returncode != 0
    assert "allow_localhosts" in result.stdout + result.stderr
