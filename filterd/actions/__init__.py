"""Action executors: turn a ``Verdict`` into I/O (relay, quarantine) and an ``Outcome``.

The one place where a verdict meets the next hop. A message is answered 250 only when the next
hop said 250 for it, or when its quarantine copy is on disk; a rule's discard is the one
deliberate exception and is counted and logged by the caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from filterd.actions.nexthop import NextHopReply
from filterd.actions.quarantine import QuarantineStore
from filterd.actions.relay import RelayTransaction, first_refused
from filterd.actions.tag import apply_modifications, spam_headers
from filterd.errors import QuarantineError
from filterd.logsetup import get_logger
from filterd.model import Action, Message, Outcome, SmtpReply, Verdict
from filterd.spool import read_all

log = get_logger("filterd.actions")

DEFAULT_REJECT = SmtpReply(554, "5.7.1", "Message rejected by policy")
DEFAULT_TEMPFAIL = SmtpReply(451, "4.7.1", "Message deferred by policy")


def rewrite(message: Message, verdict: Verdict) -> bytes:
    """The bytes to deliver: incoming X-Spam-* removed, the verdict's header edits applied."""
    added = list(verdict.add_headers)
    if verdict.tag:
        added = (
            spam_headers(verdict.score, verdict.required_score or 0.0, verdict.rules, flag=True)
            + added
        )
    return apply_modifications(
        message.raw,
        remove=verdict.remove_headers,
        add=added,
        subject_prefix=verdict.subject_prefix if verdict.tag or verdict.subject_prefix else "",
    )


class LazyQuarantine:
    """The quarantine store, opened on first use and again after a failure.

    An unusable quarantine folder (read-only, full, missing) must not stop clean mail: only the
    messages a rule quarantines are deferred with 451 until the folder works again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._store: QuarantineStore | None = None
        self._lock = threading.Lock()

    def get(self) -> QuarantineStore:
        """The open store (call it off the event loop); raises QuarantineError."""
        with self._lock:
            if self._store is None:
                self._store = QuarantineStore(self.path)
            return self._store

    def store(self, message: Message, verdict: Verdict) -> tuple[str, int | None]:
        """Write one entry; return its id and the number of entries now held, or None when
        the index cannot say (busy, broken): the entry is on disk all the same, and answering
        451 for it would only have the MTA send it again, to be quarantined twice."""
        store = self.get()
        entry_id = store.store(
            message, verdict, rule=verdict.deciding_rule or "", reason=verdict.reason
        )
        try:
            held: int | None = store.count()
        except QuarantineError as exc:
            log.warning("quarantine_count_failed", id=entry_id, error=str(exc))
            held = None
        return entry_id, held


class Executor:
    """Carries out verdicts for one daemon; holds the quarantine store."""

    def __init__(self, quarantine: LazyQuarantine) -> None:
        self.quarantine = quarantine

    async def execute(self, verdict: Verdict, message: Message, txn: RelayTransaction) -> Outcome:
        action = verdict.action
        if action is Action.REJECT:
            return Outcome(action, verdict.reply or DEFAULT_REJECT)
        if action is Action.TEMPFAIL:
            return Outcome(action, verdict.reply or DEFAULT_TEMPFAIL)
        if action is Action.DISCARD:
            return Outcome(action, SmtpReply(250, "2.0.0", "Ok: discarded"))
        if action is Action.QUARANTINE:
            if message.spool_path is not None:
                # The store keeps whole messages; a spooled one is read back (at most
                # max_message_size) for the write.
                whole = await asyncio.to_thread(read_all, message.spool_path)
                message = dataclasses.replace(message, raw=whole, spool_path=None, spooled_size=0)
            entry_id, held = await asyncio.to_thread(self.quarantine.store, message, verdict)
            return Outcome(
                action,
                SmtpReply(250, "2.0.0", f"Ok: quarantined as {entry_id}"),
                quarantine_id=entry_id,
                quarantine_size=held,
            )
        return await self._deliver(verdict, message, txn)

    async def _deliver(self, verdict: Verdict, message: Message, txn: RelayTransaction) -> Outcome:
        recipients = list(verdict.redirect) if verdict.redirect else list(txn.accepted)
        extra = [rcpt for rcpt in verdict.bcc if rcpt not in recipients]
        added: list[str] = []  # the recipients a rule put on the message
        replies: list[NextHopReply] = []
        if verdict.redirect:
            added = recipients + extra
            replies = await txn.restart(added)
        elif extra:
            added = extra
            replies = await txn.add_recipients(extra)  # one write for all of them (PIPELINING)
        refused = first_refused(added, replies)
        if refused is not None:
            # The message goes to nobody: a copy a rule asked for must not go missing while the
            # client hears 250, and a retry delivers them all once the next hop takes each.
            address, reply = refused
            return Outcome(
                verdict.action, SmtpReply(451, "4.3.0", f"Next hop refused <{address}>: {reply}")
            )
        if message.spool_path is None:
            data_reply = await txn.send_data(rewrite(message, verdict))
        else:
            data_reply = await txn.send_data_stream(
                rewrite(message, verdict), message.spool_path, offset=len(message.raw)
            )
        return Outcome(
            verdict.action,
            data_reply.as_reply(),
            delivered=tuple(txn.accepted) if data_reply.code == 250 else (),
            next_hop_reply=str(data_reply),
        )
