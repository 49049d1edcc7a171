"""The message processor answers first and accounts right after: the reply to the final dot
does not wait for the metrics and the ``message_processed`` line, which follow in the event
loop's next pass, before any further input is read. And what it answers follows what is on
disk: a quarantine entry written is a 250, whatever its index says."""

from __future__ import annotations

import asyncio
import fcntl
import os
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from filterd.actions import Executor, LazyQuarantine
from filterd.actions.quarantine import QuarantineStore
from filterd.actions.relay import RelayClient, RelayTransaction
from filterd.errors import QuarantineError
from filterd.model import Envelope, Message, Verdict
from filterd.observe import Metrics
from filterd.processor import MessageProcessor
from filterd.rules import load_ruleset
from filterd.rules.pipeline import LazyTrace
from tests.support.nexthop import NextHop


def _processor(tmp_path: Path, registry: CollectorRegistry) -> MessageProcessor:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        textwrap.dedent(
            """\
            rules:
              - {name: no-offers, if: {subject: {contains: offer}}, then: {action: reject}}
              - {name: hold, if: {subject: {contains: hold}}, then: {action: quarantine}}
            """
        )
    )
    ruleset = load_ruleset(rules)
    executor = Executor(LazyQuarantine(str(tmp_path / "quarantine")))
    return MessageProcessor(lambda: ruleset, executor, Metrics(registry))


def _rejected(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("filterd_messages_total", {"action": "reject"})


def _offer() -> Message:
    """A message the rule above rejects."""
    return Message(
        Envelope("a@example.org", ("b@example.net",)),
        b"From: a@example.org\r\nSubject: an offer\r\n\r\nbody\r\n",
    )


def _unused_transaction() -> RelayTransaction:
    # A rejected message never reaches the next hop: the transaction stays unused.
    return RelayTransaction(RelayClient("127.0.0.1", 9, timeout=1.0, helo="localhost"))


def test_the_reply_comes_before_the_accounting(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    processor = _processor(tmp_path, registry)

    async def run() -> tuple[int, float | None, float | None]:
        reply = await processor.process(_offer(), _unused_transaction(), "s1")
        counted_with_the_reply = _rejected(registry)
        await asyncio.sleep(0)  # one pass of the event loop
        return reply.code, counted_with_the_reply, _rejected(registry)

    code, at_reply, after_one_pass = asyncio.run(run())
    assert code == 554
    assert at_reply == 0.0  # not counted yet when the reply is handed back
    assert after_one_pass == 1.0


def test_each_message_is_accounted_once_across_event_loops(tmp_path: Path) -> None:
    """The processor keeps the loop it schedules on; a new loop (a test's, a restart's) must
    be picked up, not the closed one."""
    registry = CollectorRegistry()
    processor = _processor(tmp_path, registry)

    async def one() -> None:
        await processor.process(_offer(), _unused_transaction(), "s")
        await asyncio.sleep(0)

    asyncio.run(one())
    asyncio.run(one())
    assert _rejected(registry) == 2.0


def test_a_stored_entry_is_answered_250_when_the_index_cannot_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count only feeds a gauge: once the entry is on disk, a busy or broken index must not
    turn the reply into a 451 (the MTA would send the message again, to be stored twice)."""

    def index_busy(self: QuarantineStore, status: object = None) -> int:
        raise QuarantineError("quarantine index: database is locked")

    monkeypatch.setattr(QuarantineStore, "count", index_busy)
    registry = CollectorRegistry()
    processor = _processor(tmp_path, registry)
    held = Message(
        Envelope("a@example.org", ("b@example.net",)),
        b"From: a@example.org\r\nSubject: hold this\r\n\r\nbody\r\n",
    )

    async def run() -> int:
        reply = await processor.process(held, _unused_transaction(), "s1")
        await asyncio.sleep(0)
        return reply.code

    assert asyncio.run(run()) == 250
    assert len(list((tmp_path / "quarantine").glob("*.eml"))) == 1
    assert registry.get_sample_value("filterd_messages_total", {"action": "quarantine"}) == 1.0


def _relay_errors(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("filterd_relay_errors_total", {"reason": reason})


async def _relay_clean_message(processor: MessageProcessor, hop: NextHop) -> int:
    """Process a clean message relayed to ``hop``; returns the code of the client's reply."""
    clean = Message(
        Envelope("a@example.org", ("b@example.net",)),
        b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n",
    )
    txn = RelayClient("127.0.0.1", hop.port, timeout=5.0, helo="localhost").transaction()
    txn.begin("a@example.org", ())
    await txn.add_recipients(["b@example.net"])
    try:
        reply = await processor.process(clean, txn, "s1")
    finally:
        await txn.finish()
    await asyncio.sleep(0)  # the accounting runs in the loop's next pass
    return reply.code


@pytest.mark.parametrize(
    ("chunking", "data_reply", "final_reply", "reason", "action"),
    [
        (False, "554 5.3.2 no DATA here", None, "refused_5xx", "reject"),
        (False, "451 4.3.0 no DATA now", None, "refused_4xx", "tempfail"),
        (False, None, "554 5.7.1 refused at the dot", "refused_5xx", "reject"),
        (False, None, "452 4.3.1 queue full", "refused_4xx", "tempfail"),
        (True, None, "554 5.7.1 refused at BDAT", "refused_5xx", "reject"),
        (True, None, "451 4.3.0 BDAT later", "refused_4xx", "tempfail"),
    ],
    ids=["data-5xx", "data-4xx", "dot-5xx", "dot-4xx", "bdat-5xx", "bdat-4xx"],
)
def test_a_next_hop_refusing_the_message_counts_one_relay_error(
    tmp_path: Path,
    chunking: bool,
    data_reply: str | None,
    final_reply: str | None,
    reason: str,
    action: str,
) -> None:
    """A next hop that refuses every message (a re-injection port answering 5xx) must show as
    relay errors, or it passes for rule rejects and no alert fires; the message itself is
    still accounted by what its client was told."""
    registry = CollectorRegistry()
    processor = _processor(tmp_path, registry)
    with NextHop() as hop:
        if chunking:
            hop.behaviour.announce = (*hop.behaviour.announce, "CHUNKING")
        if data_reply is not None:
            hop.behaviour.data_reply = data_reply
        hop.behaviour.final_reply = final_reply
        code = asyncio.run(_relay_clean_message(processor, hop))
    assert code == int((data_reply or final_reply or "")[:3])
    assert _relay_errors(registry, reason) == 1.0
    other = "refused_4xx" if reason == "refused_5xx" else "refused_5xx"
    assert _relay_errors(registry, other) == 0.0
    assert registry.get_sample_value("filterd_messages_total", {"action": action}) == 1.0
    assert registry.get_sample_value("filterd_messages_total", {"action": "accept"}) == 0.0


def test_a_delivered_message_and_a_rule_reject_count_no_relay_error(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    processor = _processor(tmp_path, registry)
    with NextHop() as hop:

        async def run() -> None:
            assert await _relay_clean_message(processor, hop) == 250
            assert (await processor.process(_offer(), _unused_transaction(), "s2")).code == 554
            await asyncio.sleep(0)

        asyncio.run(run())
    for reason in ("refused_4xx", "refused_5xx"):
        assert _relay_errors(registry, reason) == 0.0
    assert registry.get_sample_value("filterd_messages_total", {"action": "accept"}) == 1.0
    assert _rejected(registry) == 1.0


def test_a_spooled_message_is_judged_on_all_of_it_and_then_let_go(tmp_path: Path) -> None:
    """The rules see what lies past a spooled message's first bytes, and once they have
    decided nothing keeps the whole message in memory: the trace, which quotes it, is built
    at once rather than held with the message until the delivery is over (ten 20 MB messages
    at once would all stay in memory)."""
    processor = _processor(tmp_path, CollectorRegistry())
    padding = b"".join(b"filler line %d\r\n" % n for n in range(20_000))
    raw = b"From: a@example.org\r\nSubject: big\r\n\r\n" + padding
    spool = tmp_path / "msg.eml"
    spool.write_bytes(raw)
    message = Message(
        Envelope("a@example.org", ("b@example.net",)),
        raw[:1024],  # the first bytes, as the daemon keeps them
        spool_path=str(spool),
        spooled_size=len(raw),
    )
    ruleset = load_ruleset(_write_rules(tmp_path, "filler line 19999"))

    async def judge() -> tuple[Verdict, bool]:
        verdict = await processor._evaluate_spooled(ruleset, message, str(spool))
        # (checked before the event loop closes: closing it may read the result)
        assert isinstance(verdict.trace, LazyTrace)
        return verdict, verdict.trace._build is None

    verdict, built = asyncio.run(judge())
    assert verdict.rules == ("far",)
    assert built  # it no longer holds the message
    assert verdict.trace[0].detail.startswith("body contains")


def _write_rules(tmp_path: Path, needle: str) -> Path:
    rules = tmp_path / "far.yaml"
    rules.write_text(
        f"rules:\n  - {{name: far, if: {{body: {{contains: '{needle}'}}}}, then: {{score: 1}}}}\n"
    )
    return rules


def test_spooled_messages_are_read_back_one_at_a_time_across_processes(tmp_path: Path) -> None:
    """Every serving process locks the spool folder to read a spooled message back for its
    rules: while another holds it (here, the test), the evaluation waits."""
    processor = MessageProcessor(
        lambda: load_ruleset(_write_rules(tmp_path, "needle")),
        Executor(LazyQuarantine(str(tmp_path / "quarantine"))),
        Metrics(CollectorRegistry()),
    )
    raw = b"From: a@example.org\r\nSubject: big\r\n\r\nneedle\r\n"
    (tmp_path / "spool").mkdir()
    spool = tmp_path / "spool" / "msg.eml"
    spool.write_bytes(raw)
    message = Message(
        Envelope("a@example.org", ("b@example.net",)),
        raw[:20],
        spool_path=str(spool),
        spooled_size=len(raw),
    )
    holder = os.open(tmp_path / "spool", os.O_RDONLY | os.O_DIRECTORY)  # the folder is the lock
    fcntl.flock(holder, fcntl.LOCK_EX)

    async def run() -> Verdict:
        judging = asyncio.ensure_future(
            processor._evaluate_spooled(processor.ruleset(), message, str(spool))
        )
        await asyncio.sleep(0.3)
        assert not judging.done()  # waiting for the lock another process holds
        os.close(holder)  # released
        return await asyncio.wait_for(judging, 10)

    assert asyncio.run(run()).rules == ("far",)
