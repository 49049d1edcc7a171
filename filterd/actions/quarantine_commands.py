"""What ``filterd quarantine list|show|release|delete|purge`` do; the CLI only parses arguments.

Each command prints to ``out`` (errors to ``err``, by default ``out`` too) and returns the exit
code (0 success, 1 the operation failed, 2 a usage error such as a bad age). Store operations
log themselves (``quarantine_released``, ``quarantine_deleted``, ``quarantine_purged``); reading
a quarantined message is logged here (``quarantine_shown``), since quarantined mail is private.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TextIO

import structlog

from filterd.actions.quarantine import Entry, EntryNotFoundError, EntryStatus, QuarantineStore
from filterd.actions.tag import SPAM_HEADER_PREFIX, remove_headers
from filterd.errors import QuarantineError
from filterd.mime_headers import without_surrogates

__all__ = [
    "SendFunction",
    "delete_entry",
    "list_entries",
    "parse_age",
    "purge_entries",
    "release_entry",
    "release_entry_async",
    "show_entry",
]

log = structlog.stdlib.get_logger(__name__)

SendFunction = Callable[[str, Sequence[str], bytes], Awaitable[None]]
"""``send(sender, recipients, raw)``: deliver through the relay; raises ``RelayError``."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_AGE_RE = re.compile(r"\s*([0-9]+)\s*([smhdw])\s*", re.IGNORECASE)
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_TABLE_LIMITS = {"sender": 40, "recipients": 40, "subject": 50}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` -> timedelta; ``ValueError`` otherwise."""
    match = _AGE_RE.fullmatch(text)
    if not match:
        raise ValueError(f"invalid age {text!r}: expected a number and s, m, h, d or w (e.g. 30d)")
    return timedelta(**{_AGE_UNITS[match.group(2).lower()]: int(match.group(1))})


def _listing(entry: Entry) -> dict[str, Any]:
    """The ``list --json`` object: the contract's keys first, no trace."""
    data = entry.to_dict()
    del data["trace"], data["format"]
    return data


# Quarantined mail is hostile input: a header (or an RFC 2047 word decoding to one) may carry
# terminal escape sequences. Nothing from a message reaches the terminal as a control character.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_JSON_C1_RE = re.compile(r"[\x7f-\x9f]")  # json.dumps escapes C0 itself, not DEL and C1


def _printable(text: str) -> str:
    # Lone surrogates (a sender's bytes that were not UTF-8) cannot be written to a UTF-8
    # terminal: U+FFFD in their place.
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", without_surrogates(text))


def _one_line(text: str) -> str:
    """``_printable`` for a field shown on one line: a newline (an encoded Subject may decode
    to one) would let the sender print lines of their own, a forged ``status:`` say."""
    return _printable(text).replace("\n", "\\n")


def _dump_json(data: object, out: TextIO) -> None:
    text = without_surrogates(json.dumps(data, indent=2, ensure_ascii=False))
    out.write(_JSON_C1_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


def _shown_address(address: str) -> str:
    return _printable(address) or "<>"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def list_entries(
    store: QuarantineStore,
    *,
    as_json: bool,
    out: TextIO,
    limit: int | None = None,
    err: TextIO | None = None,
) -> int:
    """Newest first: a JSON array (``--json``) or an aligned table."""
    try:
        entries = store.list(limit=limit)
    except QuarantineError as exc:
        return _fail(err or out, exc)
    if as_json:
        _dump_json([_listing(e) for e in entries], out)
        return EXIT_OK
    if not entries:
        out.write("quarantine is empty\n")
        return EXIT_OK
    header = ("ID", "DATE", "STATUS", "SIZE", "SENDER", "RECIPIENTS", "RULE", "SUBJECT")
    rows = [
        (
            e.id,
            e.date.strftime("%Y-%m-%d %H:%M:%S"),
            e.status.value,
            str(e.size),
            _cut(_shown_address(e.sender), _TABLE_LIMITS["sender"]),
            _cut(_printable(",".join(e.recipients)), _TABLE_LIMITS["recipients"]),
            e.rule or "-",
            _cut(_printable(" ".join(e.subject.split())), _TABLE_LIMITS["subject"]),
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if column == 3 else cell.ljust(width)  # SIZE aligns right
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.write("  ".join(cells).rstrip() + "\n")
    return EXIT_OK


def _header_block(raw: bytes) -> str:
    match = re.search(rb"\r?\n\r?\n", raw)
    head = raw[: match.start()] if match else raw
    return head.decode("utf-8", "replace").replace("\r\n", "\n")


def show_entry(
    store: QuarantineStore,
    entry_id: str,
    out: TextIO,
    *,
    as_json: bool = False,
    err: TextIO | None = None,
) -> int:
    """The entry's metadata, its rule trace and the message's header block."""
    try:
        entry = store.get(entry_id)
        raw = store.read_message(entry_id)
    except QuarantineError as exc:
        return _fail(err or out, exc)
    log.info("quarantine_shown", id=entry.id)
    if as_json:
        _dump_json(entry.to_dict() | {"headers": _header_block(raw)}, out)
        return EXIT_OK
    fields = [
        ("id", entry.id),
        ("date", entry.date.isoformat()),
        ("status", entry.status.value),
        ("sender", _shown_address(entry.sender)),
        ("recipients", ", ".join(entry.recipients)),
        ("client ip", entry.client_ip or "-"),
        ("client name", entry.client_name or "-"),
        ("helo", entry.helo or "-"),
        ("queue id", entry.queue_id or "-"),
        ("message-id", entry.message_id or "-"),
        ("subject", entry.subject),
        ("size", str(entry.size)),
        ("action", entry.action),
        ("rule", entry.rule or "-"),
        ("reason", entry.reason or "-"),
        ("score", f"{entry.score:.1f}"),
        ("rules hit", ", ".join(entry.rules) or "-"),
    ]
    if entry.released_at:
        fields += [
            ("released at", entry.released_at.isoformat()),
            ("released to", ", ".join(entry.released_to)),
        ]
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        out.write(f"{name + ':':<{width}} {_one_line(value)}\n")
    if entry.trace:
        out.write("trace:\n")
        for t in entry.trace:
            mark = "+" if t.matched else "-"
            extra = [f"score={t.score:g}"] if t.score else []
            extra += ["shadow"] if t.shadow else []
            extra += [f"action={t.action.value}"] if t.action else []
            extra += [_one_line(t.detail)] if t.detail else []
            out.write(f"  {mark} {t.rule}" + (f"  ({'; '.join(extra)})" if extra else "") + "\n")
    out.write("\n" + _printable(_header_block(raw)) + "\n")
    return EXIT_OK


def delete_entry(
    store: QuarantineStore, entry_id: str, out: TextIO, *, err: TextIO | None = None
) -> int:
    try:
        store.delete(entry_id)
    except QuarantineError as exc:
        return _fail(err or out, exc)
    out.write(f"deleted {entry_id}\n")
    return EXIT_OK


def purge_entries(
    store: QuarantineStore, older_than: str, out: TextIO, *, err: TextIO | None = None
) -> int:
    try:
        age = parse_age(older_than)
    except ValueError as exc:
        (err or out).write(f"error: {exc}\n")
        return EXIT_USAGE
    try:
        count = store.purge(age)
    except QuarantineError as exc:
        return _fail(err or out, exc)
    out.write(f"purged {count} {'entry' if count == 1 else 'entries'} older than {older_than}\n")
    return EXIT_OK


async def release_entry_async(
    store: QuarantineStore,
    entry_id: str,
    *,
    to: Sequence[str] | None,
    send: SendFunction,
    out: TextIO,
    err: TextIO | None = None,
) -> int:
    """Send the original message, with its original envelope (or to ``to`` only), through
    ``send``; mark the entry released only once the relay accepted it. A failure changes nothing.

    Incoming ``X-Spam-*`` fields are stripped as on every relayed message, so a release cannot
    deliver a verdict forged by the sender; every other byte is the original.
    """
    try:
        entry = store.get(entry_id)
        raw = store.read_message(entry_id)
    except QuarantineError as exc:
        return _fail(err or out, exc)
    if entry.status is EntryStatus.RELEASED and not to:
        (err or out).write(
            f"error: {entry_id} was already released to {', '.join(entry.released_to)}"
            " (give --to to send it again)\n"
        )
        return EXIT_FAILED
    recipients = list(to) if to else list(entry.recipients)
    try:
        await send(entry.sender, recipients, remove_headers(raw, [], prefixes=[SPAM_HEADER_PREFIX]))
    except Exception as exc:  # send is injected: whatever it raises, nothing was released
        log.warning("quarantine_release_failed", id=entry_id, error=str(exc))
        (err or out).write(f"error: release of {entry_id} failed, entry unchanged: {exc}\n")
        return EXIT_FAILED
    try:
        store.mark_released(entry_id, recipients)
    except QuarantineError as exc:
        log.error("quarantine_release_unrecorded", id=entry_id, error=str(exc))
        (err or out).write(f"error: {entry_id} was sent but not marked released: {exc}\n")
        return EXIT_FAILED
    out.write(f"released {entry_id} to {', '.join(recipients)}\n")
    return EXIT_OK


def release_entry(
    store: QuarantineStore,
    entry_id: str,
    *,
    to: Sequence[str] | None,
    send: SendFunction,
    out: TextIO,
    err: TextIO | None = None,
) -> int:
    """``release_entry_async`` for the synchronous CLI (runs its own event loop)."""
    return asyncio.run(release_entry_async(store, entry_id, to=to, send=send, out=out, err=err))


def _fail(out: TextIO, exc: QuarantineError) -> int:
    if not isinstance(exc, EntryNotFoundError):
        log.error("quarantine_command_failed", error=str(exc))
    out.write(f"error: {exc}\n")
    return EXIT_FAILED
