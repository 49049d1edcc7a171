"""Fuzzing the daemon over SMTP: random command sequences (lock-step and pipelined) and random
MIME messages, against one long-running filterd with the shipped rules and a healthy next hop.

For every example: each command gets exactly one reply, within the timeout; no reply is an
internal error (with a healthy next hop a 451 can only mean an exception inside filterd); every
message the client got 250 for has exactly one outcome and no other has any; the daemon logs no
session or message exception; and a fresh session is answered at once afterwards.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import corpus_manifest
from tests.faults.accounting import CensusWatch, Ledger, balance
from tests.faults.conftest import new_token
from tests.faults.figures import count
from tests.faults.strategies import ANY_MESSAGE, SESSIONS, Step
from tests.support.daemon import REPO, Daemon
from tests.support.faultclient import RawClient, Reply, ServerClosed, answers
from tests.support.nexthop import NextHop

SESSION_TIMEOUT = 5  # filterd's idle limit; with a healthy next hop replies come at once
READ_TIMEOUT = 4.0
CASES: Counter[str] = Counter()
# more with FILTERD_FUZZ_EXAMPLES=N (the long run uses thousands)
EXAMPLES = int(os.environ.get("FILTERD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@pytest.fixture(scope="module")
def fuzzd(tmp_path_factory: pytest.TempPathFactory, hop: NextHop) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("filterd-fuzz")
    extra = {"limits": {"relay_timeout": 5, "session_timeout": SESSION_TIMEOUT}}
    with Daemon(work, hop.port, rules=REPO / "rules", metrics=True, extra=extra) as daemon:
        yield daemon
    count("smtp fuzz (through the daemon)", CASES)


@pytest.fixture(scope="module")
def watch(fuzzd: Daemon, hop: NextHop) -> CensusWatch:
    return CensusWatch(hop, fuzzd.workdir / "state" / "quarantine", fuzzd.log_path)


def _stuffed(body: bytes) -> bytes:
    """Dot-stuff after any line ending, as filterd un-stuffs, then end the data."""
    stuffed = body.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n"


def _check(reply: Reply, what: bytes) -> None:
    assert 200 <= reply.code < 600, f"{what[:80]!r} got {reply}"
    assert reply.code != 451, f"{what[:80]!r} got an internal error: {reply}"
    assert "Error: (" not in reply.text, f"{what[:80]!r} leaked an exception: {reply}"


def _send_body(client: RawClient, body: bytes, ledger: Ledger) -> Reply:
    token = new_token("fz")
    ledger.expect(token)
    client.send(_stuffed(f"Message-ID: <{token}@faults.test>\r\n".encode() + body))
    reply = client.read_reply()
    ledger.record(token, "final", reply.code)
    CASES["messages"] += 1
    CASES[f"final_{reply.code}"] += 1
    return reply


def _lock_step(client: RawClient, session: list[Step], ledger: Ledger) -> bool:
    """Drive the session command by command; False when the server ended it."""
    for step in session:
        try:
            reply = client.command(step.line)
        except ServerClosed:
            return False
        _check(reply, step.line)
        if reply.code == 354:
            reply = _send_body(
                client, step.body or b"Subject: DATA with no body drawn\r\n\r\nx\r\n", ledger
            )
            _check(reply, b"end of data")
        if reply.code in (221, 421):
            return False
    return True


def _pipelined(client: RawClient, session: list[Step]) -> bool:
    """Everything in one write (DATA replaced: its data may not follow unasked)."""
    lines = [b"NOOP" if step.body is not None else step.line for step in session]
    client.send(b"".join(line + b"\r\n" for line in lines))
    for line in lines:
        try:
            reply = client.read_reply()
        except ServerClosed:
            return False
        _check(reply, line)
        if reply.code in (221, 421):
            return False
    return True


def _assert_in_sync(client: RawClient) -> None:
    """One NOOP, one 250, and nothing else pending: no command got two replies or none."""
    reply = client.command("NOOP")
    assert reply.code == 250, f"out of sync: NOOP got {reply}"
    client.sock.settimeout(0.05)
    try:
        extra = client.sock.recv(4096)
    except TimeoutError:
        extra = b""
    assert extra == b"", f"unasked-for replies: {extra[:200]!r}"


def _settle(daemon: Daemon, watch: CensusWatch, ledger: Ledger) -> None:
    books = balance(ledger, watch.update())
    assert books.ok, str(books)
    assert not books.unacknowledged_outcomes, str(books)
    assert [str(e)[:300] for e in watch.internal_errors] == []
    assert answers(daemon.port, timeout=5), "the daemon no longer answers a fresh session"


@FUZZ
@given(session=SESSIONS, pipelined=st.booleans())
def test_any_command_sequence_gets_one_reply_each_and_leaves_the_daemon_serving(
    fuzzd: Daemon, watch: CensusWatch, session: list[Step], pipelined: bool
) -> None:
    CASES["sessions"] += 1
    CASES["commands"] += len(session)
    ledger = Ledger()
    with RawClient(fuzzd.port, timeout=READ_TIMEOUT) as client:
        if session[0].line[:4].upper() not in (b"EHLO", b"HELO"):
            client.ehlo()  # most sequences start inside a session; some greet themselves
        try:
            open_ = (
                _pipelined(client, session) if pipelined else _lock_step(client, session, ledger)
            )
        except TimeoutError:
            pytest.fail(f"a command was not answered within {READ_TIMEOUT}s: {session!r:.500}")
        if open_:
            _assert_in_sync(client)
    _settle(fuzzd, watch, ledger)


@FUZZ
@given(raw=ANY_MESSAGE, xforward_addr=st.sampled_from([None, "192.0.2.7", "203.0.113.9"]))
def test_any_message_through_the_daemon_is_decided_and_accounted(
    fuzzd: Daemon, watch: CensusWatch, raw: bytes, xforward_addr: str | None
) -> None:
    # The real parser and the shipped rules, on the real path (ingress, evaluate, tag rewrite,
    # quarantine, relay): the answer is a decision (250 or the rule's 5xx), never a 451.
    ledger = Ledger()
    with RawClient(fuzzd.port, timeout=READ_TIMEOUT) as client:
        client.ehlo()
        if xforward_addr:
            assert client.command(f"XFORWARD ADDR={xforward_addr}").code == 250
        assert client.command("MAIL FROM:<sender@example.org> BODY=8BITMIME").code == 250
        assert client.command("RCPT TO:<rcpt@example.net>").code == 250
        assert client.command("DATA").code == 354
        reply = _send_body(client, raw, ledger)
        _check(reply, b"end of data")
        assert reply.code == 250 or 500 <= reply.code < 600, str(reply)
        _assert_in_sync(client)
        client.quit()
    _settle(fuzzd, watch, ledger)


def test_the_corpus_seeds_pass_through_the_fuzz_daemon(fuzzd: Daemon, watch: CensusWatch) -> None:
    # The seeds themselves: with the shipped rules each corpus message gets a decision.
    ledger = Ledger()
    codes: dict[str, int] = {}
    for entry in corpus_manifest():
        raw = (Path(__file__).resolve().parents[1] / "corpus" / str(entry["file"])).read_bytes()
        with RawClient(fuzzd.port, timeout=READ_TIMEOUT) as client:
            client.ehlo()
            client.command("XFORWARD ADDR=192.0.2.7")
            assert (
                client.command("MAIL FROM:<sender@example.org> BODY=8BITMIME SMTPUTF8").code == 250
            )
            assert client.command("RCPT TO:<rcpt@example.net>").code == 250
            assert client.command("DATA").code == 354
            reply = _send_body(client, raw, ledger)
            codes[str(entry["file"])] = reply.code
            client.quit()
    assert all(code == 250 or 500 <= code < 600 for code in codes.values()), codes
    _settle(fuzzd, watch, ledger)


def test_fuzz_sessions_are_closed_by_the_session_timeout_when_abandoned(fuzzd: Daemon) -> None:
    # The bound behind "no input may stall a session past its timeout": a session left in the
    # middle of DATA is closed by filterd after session_timeout.
    with RawClient(fuzzd.port, timeout=READ_TIMEOUT) as client:
        client.ehlo()
        client.command("MAIL FROM:<a@example.org>")
        client.command("RCPT TO:<b@example.net>")
        assert client.command("DATA").code == 354
        client.send(b"Subject: half\r\n\r\npartial line with no end")
        assert client.is_closed(wait=SESSION_TIMEOUT + 5), "a half-sent DATA kept the session open"
    with socket.create_connection(("127.0.0.1", fuzzd.port), timeout=5) as sock:
        assert sock.makefile("rb").readline().startswith(b"220")
