"""Frozen value types that flow through filterd: envelope, message, verdict, reply, outcome.

Nothing here does I/O or imports another filterd module except ``errors``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Action(enum.Enum):
    """What a verdict does with a message. Ordered by strength (see ``strength``)."""

    ACCEPT = "accept"
    TAG = "tag"
    REDIRECT = "redirect"
    DISCARD = "discard"
    QUARANTINE = "quarantine"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def strength(self) -> int:
        """Precedence when several rules decide: reject > tempfail > quarantine > discard
        > redirect > tag > accept (the definition order above)."""
        return _STRENGTH[self]


_STRENGTH = {action: rank for rank, action in enumerate(Action)}


@dataclass(frozen=True)
class SmtpReply:
    """A typed SMTP reply; ``render`` is the one place replies become wire text."""

    code: int
    enhanced: str
    text: str

    def render(self) -> str:
        return (
            f"{self.code} {self.enhanced} {self.text}"
            if self.enhanced
            else f"{self.code} {self.text}"
        )

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500


TEMPFAIL_INTERNAL = SmtpReply(451, "4.3.0", "Temporary internal error, try again later")
OK_QUEUED = SmtpReply(250, "2.0.0", "OK")


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of one transaction, plus what XFORWARD told us about the client."""

    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    client_ip: str | None = None
    client_name: str | None = None
    helo: str | None = None
    queue_id: str | None = None
    smtputf8: bool = False
    body_8bitmime: bool = False
    mail_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Message:
    """One message: envelope and the raw bytes as received (CRLF line endings).

    A large message lives in a spool file: ``raw`` then holds only its first bytes (the header
    and the start of the body: what ``raw:`` rules and the header edits see) and
    ``spool_path``/``spooled_size`` say where the whole of it is. While its rules run,
    ``whole`` holds all of it, read back from the spool, so that every MIME part (each
    attachment, and each text part up to ``max_scan_bytes``) is seen, wherever it lies.
    """

    envelope: Envelope
    raw: bytes
    spool_path: str | None = None
    spooled_size: int = 0
    whole: bytes | None = None

    @property
    def size(self) -> int:
        return self.spooled_size if self.spool_path is not None else len(self.raw)


@dataclass(frozen=True)
class RuleTrace:
    """How one rule fared on one message: the part of the ``scan`` trace for that rule."""

    rule: str
    matched: bool
    score: float = 0.0
    shadow: bool = False
    detail: str = ""  # for a match: which condition matched and on what text
    action: Action | None = None


@dataclass(frozen=True)
class Verdict:
    """The pure pipeline's answer for one message. Modifiers apply on delivery."""

    action: Action = Action.ACCEPT
    score: float = 0.0
    rules: tuple[str, ...] = ()  # rules that matched and were not shadow, in evaluation order
    deciding_rule: str | None = None  # the rule whose action won (None: thresholds or default)
    reason: str = ""
    reply: SmtpReply | None = None  # for reject / tempfail
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    subject_prefix: str = ""
    bcc: tuple[str, ...] = ()
    redirect: tuple[str, ...] = ()
    tag: bool = False  # add X-Spam-* headers (score reached the tag threshold or action tag)
    required_score: float | None = None  # the tag threshold, for X-Spam-Status
    # Per rule, in order. The pipeline's is built on first use (see rules.pipeline.LazyTrace).
    trace: Sequence[RuleTrace] = ()
    shadow_rules: tuple[str, ...] = ()  # shadow rules that matched (counted, never acted)


@dataclass(frozen=True)
class Outcome:
    """What happened to a message after its verdict was executed: the reply and the facts to log."""

    action: Action
    reply: SmtpReply
    delivered: tuple[str, ...] = ()  # recipients the next hop accepted
    next_hop_reply: str = ""
    quarantine_id: str | None = None
    quarantine_size: int | None = None  # entries held after this one was stored
