"""Per-message processing: evaluate the rules, execute the verdict, account for the outcome.

This is the seam between the ingress (which owns the SMTP dialogue) and everything that decides
and acts. It is also the outermost catch-all for a message: whatever fails here becomes
``451 4.3.0`` with one log line and a metric, never a pass and never a 5xx.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import functools
import os
import re
import time
from collections.abc import Callable
from typing import Protocol

from filterd.actions import Executor
from filterd.actions.relay import RelayTransaction, refusal_reason
from filterd.errors import FilterdError, QuarantineError, RelayError
from filterd.logsetup import get_logger
from filterd.model import (
    TEMPFAIL_INTERNAL,
    Action,
    Envelope,
    Message,
    Outcome,
    SmtpReply,
    Verdict,
)
from filterd.rules import RuleSet, evaluate
from filterd.spool import read_all

log = get_logger("filterd")

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
# Evaluating a large message can take milliseconds; past this size it runs off the event loop.
OFFLOAD_BYTES = 256 * 1024
NOTHING_DECIDED = Verdict()  # immutable: one for every message whose evaluation failed


class ProcessingMetrics(Protocol):
    def message_processed(
        self,
        action: str,
        duration_s: float,
        size: int,
        rules: tuple[str, ...],
        shadow_rules: tuple[str, ...],
    ) -> None: ...
    def relay_error(self, reason: str) -> None: ...
    def set_quarantine_size(self, n: int) -> None: ...


def message_id_of(raw: bytes) -> str:
    """The Message-ID from the header block, without parsing the message."""
    end = _HEADER_END.search(raw)
    header = raw[: end.start()] if end else raw[:65536]
    match = _MESSAGE_ID.search(header)
    return match.group(1).decode("utf-8", "replace").strip()[:200] if match else ""


class MessageProcessor:
    """Runs one message through the current rule set and the executor."""

    def __init__(
        self,
        ruleset: Callable[[], RuleSet],
        executor: Executor,
        metrics: ProcessingMetrics,
    ) -> None:
        self.ruleset = ruleset
        self.executor = executor
        self.metrics = metrics
        self._running_loop: asyncio.AbstractEventLoop | None = None
        # One spooled message at a time is read back whole for its rules (see
        # _evaluate_spooled): one thread per process waits for its turn, not one per message.
        self._whole_reads = asyncio.Semaphore(1)

    async def process(self, message: Message, txn: RelayTransaction, session_id: str) -> SmtpReply:
        started = time.perf_counter()
        ruleset = self.ruleset()  # the set this message started with, even if a reload swaps it
        verdict = NOTHING_DECIDED  # what is accounted if the rules fail
        error = ""
        try:
            if message.spool_path is not None:
                verdict = await self._evaluate_spooled(ruleset, message, message.spool_path)
            elif message.size > OFFLOAD_BYTES:
                verdict = await asyncio.to_thread(evaluate, ruleset, message)
            else:
                verdict = evaluate(ruleset, message)
            outcome = await self.executor.execute(verdict, message, txn)
        except RelayError as exc:
            self.metrics.relay_error(exc.reason)
            error = f"relay {exc.reason}: {exc.detail}"
            outcome = Outcome(Action.TEMPFAIL, TEMPFAIL_INTERNAL)
        except QuarantineError as exc:
            error = f"quarantine: {exc}"
            outcome = Outcome(Action.TEMPFAIL, TEMPFAIL_INTERNAL)
        except (FilterdError, Exception) as exc:  # the message's outermost catch-all: fail closed
            log.error("message_failed", session=session_id, error=repr(exc), exc_info=exc)
            error = f"internal: {exc!r}"[:300]
            outcome = Outcome(Action.TEMPFAIL, TEMPFAIL_INTERNAL)
        duration = time.perf_counter() - started
        # The reply goes back first: the accounting (metrics, the log line) runs in the event
        # loop's next pass, while the client reads the reply and sends its next command, so
        # it adds nothing to a message's latency. It still runs if the client is gone.
        self._loop().call_soon(
            functools.partial(
                self._account,
                message.envelope,
                message.raw,
                message.size,
                verdict,
                outcome,
                duration=duration,
                error=error,
                session_id=session_id,
            )
        )
        return outcome.reply

    async def _evaluate_spooled(
        self, ruleset: RuleSet, message: Message, spool_path: str
    ) -> Verdict:
        """Evaluate a spooled message on all of it, read back from its spool file, off the
        event loop and one such message at a time in the whole daemon (see
        ``_evaluate_whole``)."""
        async with self._whole_reads:
            return await asyncio.to_thread(_evaluate_whole, ruleset, message, spool_path)

    def _loop(self) -> asyncio.AbstractEventLoop:
        # get_running_loop() costs a getpid() system call; the daemon runs one loop.
        loop = self._running_loop
        if loop is None or not loop.is_running():
            loop = self._running_loop = asyncio.get_running_loop()
        return loop

    def refused(
        self, envelope: Envelope, size: int, reply: SmtpReply, reason: str, session_id: str
    ) -> None:
        """Account for a message the ingress refused before it could be processed (larger
        than ``max_message_size``, or not stored): its one log line and its count, as for a
        processed one, with no rule run."""
        action = Action.TEMPFAIL if reply.is_transient else Action.REJECT
        verdict = Verdict(action=action, reason=reason)
        self._account(
            envelope,
            b"",
            size,
            verdict,
            Outcome(action, reply),
            duration=0.0,
            error="",
            session_id=session_id,
        )

    def _account(
        self,
        envelope: Envelope,
        head: bytes,
        size: int,
        verdict: Verdict,
        outcome: Outcome,
        *,
        duration: float,
        error: str,
        session_id: str,
    ) -> None:
        """Count and log one processed message (its one ``message_processed`` line); ``head``
        is the start of the message, where its Message-ID is."""
        if outcome.quarantine_size is not None:
            self.metrics.set_quarantine_size(outcome.quarantine_size)
        refusal = _next_hop_refusal(outcome)
        if refusal is not None:
            # Counted besides the action: a next hop that refuses every message (a re-injection
            # port that answers 5xx) would otherwise pass for rule rejects, and no relay alert
            # would fire.
            self.metrics.relay_error(refusal)
        action = _accounted_action(outcome)
        self.metrics.message_processed(
            action.value, duration, size, verdict.rules, verdict.shadow_rules
        )
        env = envelope
        log.info(
            "message_processed",
            session=session_id,
            queue_id=env.queue_id,
            message_id=message_id_of(head),
            sender=env.sender,
            recipients=len(env.recipients),
            size=size,
            client_ip=env.client_ip,
            helo=env.helo,
            action=action.value,
            verdict=verdict.action.value,
            rules=list(verdict.rules),
            shadow_rules=list(verdict.shadow_rules),
            score=round(verdict.score, 2),
            reason=verdict.reason or None,
            duration_ms=round(duration * 1000, 3),
            reply=outcome.reply.render(),
            next_hop_reply=outcome.next_hop_reply or None,
            quarantine_id=outcome.quarantine_id,
            error=error or None,
        )


def _evaluate_whole(ruleset: RuleSet, message: Message, spool_path: str) -> Verdict:
    """Read a spooled message back and evaluate it, holding a lock on the spool folder that
    every process of the daemon takes for this: the memory the rules of large messages take
    (the message, and an attachment decoded to type and size it) is then one message's,
    however many arrive at once. The folder itself is locked, not a file in it: there is no
    file to be left behind, or owned by another user."""
    folder = os.open(os.path.dirname(spool_path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        whole = read_all(spool_path)
        return _evaluate_and_let_go(ruleset, dataclasses.replace(message, whole=whole))
    finally:
        os.close(folder)  # (closing releases the lock)


def _evaluate_and_let_go(ruleset: RuleSet, message: Message) -> Verdict:
    """``evaluate``, with the verdict's trace built at once: built later (the quarantine reads
    it), it would keep the message it quotes, here the whole of a spooled one, in memory until
    the delivery is over, and ten large messages at once would all be held."""
    verdict = evaluate(ruleset, message)
    len(verdict.trace)  # builds it, and drops what the builder held
    return verdict


def _next_hop_refusal(outcome: Outcome) -> str | None:
    """The relay error reason when the next hop refused the message itself (a 4xx/5xx to its
    DATA, BDAT or end of data: only then does the outcome carry the next hop's reply), else
    None. A recipient a rule added and the next hop refused is a per-recipient verdict, not
    a relay error."""
    if not outcome.next_hop_reply or outcome.reply.is_success:
        return None
    return refusal_reason(outcome.reply.code)


def _accounted_action(outcome: Outcome) -> Action:
    """What really happened: a relayed message the next hop refused was not accepted."""
    if (
        outcome.action in (Action.ACCEPT, Action.TAG, Action.REDIRECT)
        and not outcome.reply.is_success
    ):
        return Action.TEMPFAIL if outcome.reply.is_transient else Action.REJECT
    return outcome.action
