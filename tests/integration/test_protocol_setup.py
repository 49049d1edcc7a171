"""Each connection's protocol is set up without aiosmtpd's own ``SMTP.__init__``, which
introspects the handler and the class on every connection (``FilterdSMTP._init_fast``
instead). That copy must leave a protocol in the state aiosmtpd's ``__init__`` would: an
aiosmtpd release that adds state to it must fail here, not in a running daemon. (The same
kind of drift let command-line limits grow: aiosmtpd's ``__init__`` also resets a dict shared
by all sessions, which the copy skipped.)"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from filterd.app import Daemon
from filterd.config import HostPort, QuarantineConfig, default_config
from filterd.smtp_protocol import FilterdSMTP

PLAIN = (str, bytes, int, float, bool, type(None), tuple, frozenset, list, dict, set)


def _first_and_later(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config = dataclasses.replace(
        default_config(),
        relay=HostPort("127.0.0.1", 9),
        state_dir=str(tmp_path / "state"),
        quarantine=QuarantineConfig(path=str(tmp_path / "state" / "quarantine")),
        metrics_listen=None,
        workers=1,
    )

    async def build() -> tuple[dict[str, Any], dict[str, Any]]:
        daemon = Daemon(config, None, {})
        handler = daemon.handler
        saved = dict(FilterdSMTP._shared)
        FilterdSMTP._shared.clear()
        try:
            first = FilterdSMTP(handler, handler.policy)  # aiosmtpd's own __init__
            later = FilterdSMTP(handler, handler.policy)  # filterd's copy of it
        finally:
            FilterdSMTP._shared.clear()
            FilterdSMTP._shared.update(saved)
        return vars(first), vars(later)

    return asyncio.run(build())


def test_a_later_connection_starts_in_the_state_aiosmtpd_would_give_it(tmp_path: Path) -> None:
    first, later = _first_and_later(tmp_path)
    assert sorted(first) == sorted(later)
    for name, value in first.items():
        assert type(later[name]) is type(value), name
        if isinstance(value, PLAIN):
            assert later[name] == value, name
