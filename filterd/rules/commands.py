"""``filterd check`` / ``scan`` / ``test`` / ``schema``: the rule commands, without argparse.

Each function prints to the streams it is given and returns the exit code (0 ok, 1 a message
or test failed, 78 invalid rules), so the CLI stays a thin dispatcher and tests can call
these directly. ``scan`` and ``test`` normalize line endings to CRLF, as mail arrives over
SMTP, and show the rules a message past ``limits.spool_threshold`` as the daemon's rules see
it once spooled (``daemon_view``), so a saved message gets the verdict the daemon would give
it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any, TextIO

from filterd.config import Limits, shipped_rules_dir
from filterd.errors import ConfigError
from filterd.model import Envelope, Message, Verdict
from filterd.rules.jsonschema import json_schema
from filterd.rules.pipeline import DEFAULT_MAX_SCAN_BYTES, RuleSet, RuleTestCase, evaluate
from filterd.rules.schema import load_ruleset
from filterd.rules.testcases import to_crlf
from filterd.spool import prefix_of

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 78
RulesPath = str | os.PathLike[str]
DEFAULT_SPOOL_THRESHOLD = Limits.spool_threshold
# The ingress moves DATA to the spool only once more than this is buffered
# (smtp_protocol._read_data): a smaller message stays whole in memory whatever the threshold.
NEVER_SPOOLED_UP_TO = 65536


def daemon_view(
    envelope: Envelope, raw: bytes, source: str, spool_threshold: int = DEFAULT_SPOOL_THRESHOLD
) -> Message:
    """``raw`` (CRLF) as the daemon's rules see it. A message past ``spool_threshold`` is spooled
    by the daemon: its MIME parts are read from the whole of it, ``raw:`` rules see its first
    bytes (``prefix_of``: cut back to a line end, the whole header kept), and ``size`` the
    whole size."""
    if len(raw) <= max(spool_threshold, NEVER_SPOOLED_UP_TO):
        return Message(envelope, raw)
    # The daemon's own cut, on the CRLF bytes (the file itself may have LF line endings).
    prefix = prefix_of(io.BytesIO(raw), spool_threshold)
    # spool_path is only where the whole message is; the rules read ``whole``, as the
    # daemon hands it to them.
    return Message(envelope, prefix, spool_path=source, spooled_size=len(raw), whole=raw)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _load(
    rules_path: RulesPath, err: TextIO, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES
) -> RuleSet | None:
    try:
        return load_ruleset(rules_path, max_scan_bytes=max_scan_bytes)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        print(f"{_plural(len(exc.problems), 'problem')} found; rules not loaded", file=err)
        return None


def _checked_path(rules_path: RulesPath) -> str:
    """The rules path as ``check`` names it: absolute, and flagged when it is the rules shipped
    with filterd, which a config that names no rules falls back to when /etc/filterd/rules is
    missing; an OK for those says nothing about the rules the admin meant to check."""
    shown = os.path.abspath(rules_path)
    if os.path.realpath(shown) == os.path.realpath(shipped_rules_dir()):
        shown += " (the rules shipped with filterd)"
    return shown


def check(rules_path: RulesPath, out: TextIO, err: TextIO) -> int:
    """Validate every rule file; print each problem as ``file:line:col: message`` or a summary
    that names the rules path checked."""
    ruleset = _load(rules_path, err)
    if ruleset is None:
        return EXIT_CONFIG
    extra = []
    if ruleset.shadow_rule_names:
        extra.append(f"{len(ruleset.shadow_rule_names)} in shadow mode")
    if ruleset.tests:
        extra.append(_plural(len(ruleset.tests), "test"))
    print(
        f"OK: {_checked_path(rules_path)}: {_plural(len(ruleset.rules), 'rule')}"
        f" in {_plural(len(ruleset.sources), 'file')}, {_plural(len(ruleset.lists), 'list')}"
        + (f" ({', '.join(extra)})" if extra else ""),
        file=out,
    )
    return EXIT_OK


def verdict_json(file: str, verdict: Verdict) -> dict[str, Any]:
    """The ``scan --json`` object of one message."""
    return {
        "file": file,
        "action": verdict.action.value,
        "score": verdict.score,
        "rules": list(verdict.rules),
        "shadow_rules": list(verdict.shadow_rules),
        "deciding_rule": verdict.deciding_rule,
        "reason": verdict.reason,
        "reply": verdict.reply.render() if verdict.reply else None,
        "tag": verdict.tag,
        "required_score": verdict.required_score,
        "subject_prefix": verdict.subject_prefix,
        "add_headers": [list(pair) for pair in verdict.add_headers],
        "remove_headers": list(verdict.remove_headers),
        "bcc": list(verdict.bcc),
        "redirect": list(verdict.redirect),
        "trace": [
            {
                "rule": t.rule,
                "matched": t.matched,
                "score": t.score,
                "shadow": t.shadow,
                "detail": t.detail,
                "action": t.action.value if t.action else None,
            }
            for t in verdict.trace
        ],
    }


def _print_human(file: str, verdict: Verdict, out: TextIO) -> None:
    head = f"{file}: {verdict.action.value.upper()} score {verdict.score:g}"
    if verdict.required_score is not None:
        head += f" (tag at {verdict.required_score:g})"
    if verdict.deciding_rule:
        head += f", decided by {verdict.deciding_rule}"
    if verdict.reason:
        head += f": {verdict.reason}"
    print(head, file=out)
    if verdict.reply:
        print(f"  reply: {verdict.reply.render()}", file=out)
    modifiers = [f"{name}: {value}" for name, value in verdict.add_headers]
    modifiers += [f"remove {name}" for name in verdict.remove_headers]
    modifiers += [f"bcc {address}" for address in verdict.bcc]
    modifiers += [f"redirect to {address}" for address in verdict.redirect]
    if verdict.subject_prefix:
        modifiers.append(f"subject prefix {verdict.subject_prefix!r}")
    if verdict.tag:
        modifiers.append("X-Spam-* headers")
    if modifiers:
        print("  on delivery: " + "; ".join(modifiers), file=out)
    width = max((len(t.rule) for t in verdict.trace), default=0)
    for entry in verdict.trace:
        mark = "~" if entry.shadow and entry.matched else ("+" if entry.matched else "-")
        line = f"  {mark} {entry.rule:<{width}}"
        if entry.matched:
            line += f"  {entry.score:+g}" + (" (shadow, not acted on)" if entry.shadow else "")
            line += f"  {entry.detail}"
        elif entry.detail:
            line += f"  {entry.detail}"
        print(line.rstrip(), file=out)


def scan(
    rules_path: RulesPath,
    files: Sequence[str],
    *,
    sender: str,
    recipients: Sequence[str],
    client_ip: str | None,
    helo: str | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
    max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES,
    spool_threshold: int = DEFAULT_SPOOL_THRESHOLD,
) -> int:
    """Dry-run each message file through the rules, as the daemon would see it (see
    ``daemon_view``); print its verdict and full trace."""
    ruleset = _load(rules_path, err, max_scan_bytes)
    if ruleset is None:
        return EXIT_CONFIG
    envelope = Envelope(sender=sender, recipients=tuple(recipients), client_ip=client_ip, helo=helo)
    status = EXIT_OK
    for file in files:
        try:
            with open(file, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            print(f"filterd scan: cannot read {file}: {exc.strerror or exc}", file=err)
            status = EXIT_FAILED
            continue
        verdict = evaluate(ruleset, daemon_view(envelope, to_crlf(raw), file, spool_threshold))
        if as_json:
            print(json.dumps(verdict_json(file, verdict), ensure_ascii=False), file=out)
        else:
            _print_human(file, verdict, out)
    return status


def case_differences(case: RuleTestCase, verdict: Verdict) -> list[str]:
    """What differs between a test case's expectation and the verdict ([] when it passes)."""
    expect = case.expect
    differences: list[str] = []
    if expect.action is not None and verdict.action is not expect.action:
        differences.append(f"action: expected {expect.action.value}, got {verdict.action.value}")
    matched = set(verdict.rules) | set(verdict.shadow_rules)
    missing = [name for name in expect.rules if name not in matched]
    if missing:
        differences.append("expected to match but did not: " + ", ".join(missing))
    unwanted = [name for name in expect.not_rules if name in matched]
    if unwanted:
        differences.append("expected not to match but did: " + ", ".join(unwanted))
    if expect.score_at_least is not None and not verdict.score >= expect.score_at_least:
        differences.append(
            f"score: expected at least {expect.score_at_least:g}, got {verdict.score:g}"
        )
    if expect.score_below is not None and not verdict.score < expect.score_below:
        differences.append(f"score: expected below {expect.score_below:g}, got {verdict.score:g}")
    if expect.tag is not None and verdict.tag is not expect.tag:
        differences.append(
            f"tag: expected {str(expect.tag).lower()}, got {str(verdict.tag).lower()}"
        )
    return differences


def case_message(case: RuleTestCase) -> bytes:
    """The raw message of a test case (raises OSError when its file cannot be read)."""
    if case.raw is not None:
        return case.raw
    with open(case.message_path or "", "rb") as handle:
        return to_crlf(handle.read())


def run_tests(
    rules_path: RulesPath,
    out: TextIO,
    err: TextIO,
    *,
    max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES,
    spool_threshold: int = DEFAULT_SPOOL_THRESHOLD,
) -> int:
    """Run the ``tests:`` of every rule file; exit 1 when any case fails. The limits are the
    config's, so a case gets the verdict ``scan`` and the daemon give its message."""
    ruleset = _load(rules_path, err, max_scan_bytes)
    if ruleset is None:
        return EXIT_CONFIG
    if not ruleset.tests:
        print("no test cases in the rule files (add tests: to a rule file)", file=out)
        return EXIT_OK
    failed = 0
    for case in ruleset.tests:
        where = f"{case.source}:{case.line}:{case.col}"
        try:
            raw = case_message(case)
        except OSError as exc:
            failed += 1
            print(
                f"FAIL {case.name} ({where}): cannot read message {case.message_path}: "
                f"{exc.strerror or exc}",
                file=out,
            )
            continue
        source = case.message_path or f"{case.source}:{case.line}"
        verdict = evaluate(ruleset, daemon_view(case.envelope, raw, source, spool_threshold))
        differences = case_differences(case, verdict)
        if differences:
            failed += 1
            got = (
                f"[got {verdict.action.value}, score {verdict.score:g}, rules: "
                f"{', '.join(verdict.rules) or 'none'}]"
            )
            print(f"FAIL {case.name} ({where}): {'; '.join(differences)} {got}", file=out)
        else:
            print(f"PASS {case.name}", file=out)
    passed = len(ruleset.tests) - failed
    print(f"{passed} passed, {failed} failed", file=out)
    return EXIT_FAILED if failed else EXIT_OK


def schema(out: TextIO) -> int:
    """Print the JSON Schema of rule files."""
    print(json.dumps(json_schema(), indent=2), file=out)
    return EXIT_OK
