"""Golden test: the shipped rules give every corpus message the verdict MANIFEST.json asks for.

MANIFEST ``expect`` reads "relay", "reject", "quarantine", "tag or quarantine", ... ; "relay"
means delivered untouched: action accept and no tagging. Ham and malformed mail may score a
little, never up to the tag threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from filterd.model import Action, Envelope, Message
from filterd.rules import evaluate, load_ruleset
from filterd.rules.testcases import to_crlf

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus"
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text())
RULESET = load_ruleset(ROOT / "rules")


def _allowed(expect: str) -> set[Action]:
    words = {"relay": Action.ACCEPT}
    return {words.get(word) or Action(word) for word in expect.split(" or ")}


def _envelope(entry: dict[str, str]) -> Envelope:
    sender = "" if "null sender" in entry.get("note", "") else "sender@example.net"
    return Envelope(sender, ("bob@example.net",), client_ip="198.51.100.7", helo="mail.example.net")


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_corpus_verdict(entry: dict[str, str]) -> None:
    raw = (CORPUS / entry["file"]).read_bytes()
    verdict = evaluate(RULESET, Message(_envelope(entry), to_crlf(raw)))
    allowed = _allowed(entry["expect"])
    assert verdict.action in allowed, (entry["file"], verdict.action, verdict.rules, verdict.score)
    if entry["expect"] == "relay":
        assert not verdict.tag
        assert verdict.subject_prefix == ""
        assert verdict.add_headers == ()
        assert verdict.bcc == ()
        assert verdict.redirect == ()
        assert RULESET.thresholds.tag is not None
        assert verdict.score < RULESET.thresholds.tag
    if entry["kind"] == "ham":
        assert verdict.rules == (), (entry["file"], verdict.rules)


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_corpus_verdict_without_crlf_normalization(entry: dict[str, str]) -> None:
    """The daemon may hand over the bytes as stored; the verdict must not depend on it."""
    raw = (CORPUS / entry["file"]).read_bytes()
    verdict = evaluate(RULESET, Message(_envelope(entry), raw))
    assert verdict.action in _allowed(entry["expect"])
