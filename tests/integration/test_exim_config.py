"""docs/exim.md's Exim configuration, parsed and routed by Debian's real Exim.

Exim cannot be installed beside Postfix, so the test fetches ``exim4-daemon-light`` with
``apt-get download`` and unpacks it into a temp dir (tests/e2e/exim.py); it skips, saying why,
when that is not possible (no apt, no package lists, no network to the Debian mirror).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from filterd.config import Limits, parse_size
from tests.e2e.exim import (
    DOC,
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


# How Debian's exim4-config applies the macro (conf.d/main/02_exim4-config_options).
DEBIAN_SIZE_OPTION = """\
.ifdef MESSAGE_SIZE_LIMIT
message_size_limit = MESSAGE_SIZE_LIMIT
.endif
"""


def _with_room(exim_limit: int) -> int:
    """Exim announces SIZE= above its own count (a CR per line, size_addition): filterd's
    limit needs a tenth more than Exim's."""
    return exim_limit + exim_limit // 10


def _exim_size_limit(exim: EximBinary, tmp_path: Path, macros: str) -> int:
    config = tmp_path / "size.conf"
    config.write_text(f"{macros}{DEBIAN_SIZE_OPTION}spool_directory = {tmp_path}/spool\n")
    result = exim.run(config, "-bP", "message_size_limit")
    assert result.returncode == 0, result.stdout + result.stderr
    return parse_size(result.stdout.strip().removeprefix("message_size_limit = "))


def test_documented_size_limits_leave_filterd_room(exim: EximBinary, tmp_path: Path) -> None:
    """Exim must never accept what filterd then refuses with 552 (a bounce after the queue)."""
    doc = DOC.read_text()
    macro = re.search(r"^echo '(MESSAGE_SIZE_LIMIT = \S+)' >> /etc/exim4/conf\.d/main/", doc, re.M)
    raised = re.search(r"`limits\.max_message_size: (\S+)`", doc)
    assert macro, "docs/exim.md should say how to lower Exim's size limit"
    assert raised, "docs/exim.md should say how to raise filterd's size limit instead"
    debian_default = _exim_size_limit(exim, tmp_path, "")
    lowered = _exim_size_limit(exim, tmp_path, macro.group(1) + "\n")
    assert _with_room(lowered) <= Limits.max_message_size < debian_default
    assert _with_room(debian_default) <= parse_size(raised.group(1))
