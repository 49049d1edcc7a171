"""docs/postfix.md shows exactly the master.cf entries the end-to-end tests run.

No Postfix needed: the harness renders its entries with the production ports (filterd on 10024,
re-injection on 10025, the public listener named ``smtp``) and each must appear verbatim as a
code block of the page.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .postfix import Mode, filter_master_cf

DOC = Path(__file__).resolve().parents[2] / "docs" / "postfix.md"


def _code_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.DOTALL)]


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_doc_shows_the_tested_master_cf(mode: Mode) -> None:
    rendered = filter_master_cf(mode, smtp_service="smtp", filter_port=10024, reinject_port=10025)
    assert rendered.strip() in _code_blocks(DOC.read_text())


def test_doc_names_the_settings_filterd_relies_on() -> None:
    text = DOC.read_text()
    for needle in (
        "smtp_send_xforward_command=yes",
        "smtpd_authorized_xforward_hosts=127.0.0.0/8",
        "postsuper -r ALL incoming active deferred",
        "max_connections_per_client",
        "smtpd_proxy_timeout",
        "relay_timeout",
    ):
        assert needle in text, needle
