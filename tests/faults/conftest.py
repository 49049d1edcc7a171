"""Fixtures of the fault tier: one next hop and one filterd per test module (starting a daemon
per test would eat the time budget), reset between tests, and the check that the daemon still
serves after each fault."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.accounting import message, token_of
from tests.faults.figures import FIGURES
from tests.support.daemon import Daemon
from tests.support.faultclient import RawClient
from tests.support.nexthop import Behaviour, NextHop

# Small rule set: one rule per outcome the accounting must see.
RULES = """\
rules:
  - name: quarantine-marked
    if: {subject: {contains: quarantine-me}}
    then: {action: quarantine, reason: fault test}
  - name: discard-marked
    if: {subject: {contains: discard-me}}
    then: {action: discard}
"""
RELAY_TIMEOUT = 2.0
_tokens = itertools.count(1)


FAULT_MODULES = (
    "test_nexthop_faults",
    "test_client_faults",
    "test_quarantine_faults",
    "test_worker_faults",
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the suite's figures: fault scenarios run, messages soaked and lost, fuzz cases."""
    scenarios: Counter[str] = Counter()
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "") == "call" and any(
                m in report.nodeid for m in FAULT_MODULES
            ):
                scenarios[outcome] += 1
    if not scenarios and not FIGURES:
        return
    terminalreporter.section("fault suite figures")
    if scenarios:
        terminalreporter.write_line(
            f"fault scenarios: {sum(scenarios.values())} ({dict(scenarios)})"
        )
    for section, values in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{section}: {json.dumps(values, sort_keys=True)}")


def new_token(prefix: str = "t") -> str:
    return f"{prefix}-{next(_tokens)}"


@pytest.fixture(scope="module")
def hop() -> Iterator[NextHop]:
    with NextHop() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_hop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests that use the shared next hop start and end with it well-behaved."""
    if "hop" not in request.fixturenames:
        yield
        return
    server: NextHop = request.getfixturevalue("hop")
    server.behaviour = Behaviour()
    server.accept_connections()
    yield
    server.behaviour = Behaviour()
    server.accept_connections()


def write_rules(folder: Path, text: str = RULES) -> Path:
    path = folder / "rules.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def filterd(tmp_path_factory: pytest.TempPathFactory, hop: NextHop) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("filterd")
    extra = {"limits": {"relay_timeout": RELAY_TIMEOUT, "session_timeout": 30}}
    with Daemon(work, hop.port, rules=write_rules(work), metrics=True, extra=extra) as daemon:
        yield daemon


def quarantine_dir(daemon: Daemon) -> Path:
    return daemon.workdir / "state" / "quarantine"


def assert_still_serving(daemon: Daemon, hop: NextHop, client: RawClient | None = None) -> None:
    """A clean message goes through (on ``client``'s session when given, else a new one) and
    arrives exactly once: the daemon, its sessions and its relay pool survived the fault."""
    token = new_token("alive")
    if client is None:
        with RawClient(daemon.port) as fresh:
            fresh.ehlo()
            reply = fresh.sendmail("sender@example.org", ["rcpt@example.net"], message(token))
            fresh.quit()
    else:
        client.command("RSET")
        reply = client.sendmail("sender@example.org", ["rcpt@example.net"], message(token))
    assert reply.code == 250, f"after the fault a clean message got {reply}"
    # the next hop records a message before it answers 250, so it is there already
    arrived = [m for m in list(hop.messages) if token_of(m.data) == token]
    assert len(arrived) == 1, f"the clean message after the fault arrived {len(arrived)} times"
