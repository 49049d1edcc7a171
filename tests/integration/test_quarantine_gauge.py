"""filterd_quarantine_messages follows the store, not only the daemon's own writes: an entry
the CLI deletes or purges leaves the gauge within the count interval (shortened here), as
does any change a restarted worker can no longer report. The daemon runs in-process
(``app.Daemon.run``) against a real next hop, so the test can read its registry."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import smtplib
from pathlib import Path

import pytest

from filterd import app
from filterd.actions.quarantine import QuarantineStore
from filterd.actions.quarantine_commands import delete_entry
from filterd.config import HostPort
from tests.support.daemon import free_port
from tests.support.inprocess import inprocess_config
from tests.support.nexthop import NextHop

RULES = """\
rules:
  - {name: hold, if: {subject: {contains: hold}}, then: {action: quarantine}}
"""
COUNT_INTERVAL = 0.1


def _send_held(port: int, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        for i in range(n):
            message = f"From: a@example.org\r\nSubject: hold {i}\r\n\r\nbody\r\n"
            assert smtp.sendmail("a@example.org", ["b@example.net"], message) == {}


async def _gauge_reaches(daemon: app.Daemon, expected: float, timeout: float = 5.0) -> None:
    value = None
    for _ in range(int(timeout / 0.02)):
        value = daemon.registry.get_sample_value("filterd_quarantine_messages")
        if value == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"filterd_quarantine_messages stayed at {value}, not {expected}")


def test_the_quarantine_gauge_follows_changes_made_outside_the_daemon(
    tmp_path: Path, nexthop: NextHop, monkeypatch: pytest.MonkeyPatch
) -> None:
    # raising=False: without the periodic count there is no interval to shorten, and the
    # test must fail on the gauge, not here.
    monkeypatch.setattr(app, "QUARANTINE_COUNT_INTERVAL_SECONDS", COUNT_INTERVAL, raising=False)
    port = free_port()
    config = dataclasses.replace(
        inprocess_config(tmp_path, nexthop, rules=RULES), listen=(HostPort("127.0.0.1", port),)
    )
    folder = Path(config.quarantine.path)

    async def main() -> None:
        daemon = app.Daemon(config, None, {})
        running = asyncio.create_task(daemon.run())
        try:
            await asyncio.sleep(0.2)  # listening, upkeep started
            await asyncio.to_thread(_send_held, port, 3)
            await _gauge_reaches(daemon, 3)  # what the daemon itself stored

            with QuarantineStore(folder) as store:  # `filterd quarantine delete`, another process
                entry = store.list()[0].id
                assert delete_entry(store, entry, io.StringIO()) == 0
            await _gauge_reaches(daemon, 2)

            with QuarantineStore(folder) as store:  # the rest, as a later purge would
                for left in store.list():
                    assert delete_entry(store, left.id, io.StringIO()) == 0
            await _gauge_reaches(daemon, 0)
        finally:
            daemon.on_terminate()
            await asyncio.wait_for(running, 30)

    asyncio.run(main())
