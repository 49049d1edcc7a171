"""Verdicts: actions, precedence, stop, thresholds, shadow mode, modifiers, replies, trace,
and the lazy evaluation that keeps unneeded content unparsed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import filterd.rules.matchers
import filterd.rules.view
from filterd.mime import ParsedMessage
from filterd.model import Action, Envelope, Message, SmtpReply
from filterd.rules import RuleSet, evaluate, load_ruleset

THRESHOLDS = "scores: {tag: 5, quarantine: 10, reject: 15}\ntag: {subject_prefix: '[SPAM] '}\n"


def _ruleset(tmp_path: Path, rules: str, head: str = THRESHOLDS, **kwargs: int) -> RuleSet:
    path = tmp_path / "rules.yaml"
    path.write_text(head + "rules:\n" + textwrap.indent(textwrap.dedent(rules), "  "))
    return load_ruleset(path, **kwargs)


def _message(
    subject: str = "hello", body: str = "body text", sender: str = "a@example.org"
) -> Message:
    raw = f"From: a@example.org\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()
    return Message(Envelope(sender, ("b@example.net",)), raw)


def _rule(name: str, word: str, then: str, extra: str = "") -> str:
    return f"- {{name: {name}, if: {{subject: {{contains: {word}}}}}, then: {then}{extra}}}\n"


def test_nothing_matches(tmp_path: Path) -> None:
    ruleset = _ruleset(tmp_path, _rule("a", "zzz", "{action: reject}"))
    verdict = evaluate(ruleset, _message())
    assert (verdict.action, verdict.score, verdict.rules) == (Action.ACCEPT, 0.0, ())
    assert verdict.tag is False
    assert verdict.deciding_rule is None
    assert verdict.reply is None
    assert verdict.required_score == 5.0
    assert [(t.rule, t.matched) for t in verdict.trace] == [("a", False)]


def test_nothing_matched_is_decided_once_per_rule_set(tmp_path: Path) -> None:
    # The verdict of a message no rule matches depends on the rule set alone, so it is made
    # when the set is loaded; thresholds still apply to its score of 0.
    head = "scores: {tag: 0, quarantine: 10}\ntag: {subject_prefix: '[SPAM] '}\n"
    ruleset = _ruleset(tmp_path, _rule("a", "zzz", "{action: reject}"), head=head)
    first, second = evaluate(ruleset, _message()), evaluate(ruleset, _message("other"))
    assert first is second
    assert (first.action, first.score, first.tag, first.subject_prefix) == (
        Action.TAG,
        0.0,
        True,
        "[SPAM] ",
    )
    assert [(t.rule, t.matched, t.detail) for t in first.trace] == [("a", False, "")]
    matched = evaluate(ruleset, _message("zzz"))
    assert matched is not first
    assert matched.action is Action.REJECT


def test_strongest_action_wins(tmp_path: Path) -> None:
    ruleset = _ruleset(
        tmp_path,
        _rule("t", "hello", "{action: tag}")
        + _rule("r", "hello", "{action: reject, reason: nope}")
        + _rule("q", "hello", "{action: quarantine}"),
    )
    verdict = evaluate(ruleset, _message())
    assert (verdict.action, verdict.deciding_rule, verdict.reason) == (Action.REJECT, "r", "nope")
    assert verdict.rules == ("t", "r", "q")
    assert verdict.reply == SmtpReply(554, "5.7.1", "Message rejected by policy")


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("quarantine", "discard", Action.QUARANTINE),
        ("discard", "tempfail", Action.TEMPFAIL),
        ("tag", "accept", Action.TAG),
        ("accept", "tag", Action.TAG),
        ("tempfail", "reject", Action.REJECT),
    ],
)
def test_precedence_pairs(tmp_path: Path, first: str, second: str, expected: Action) -> None:
    ruleset = _ruleset(
        tmp_path,
        _rule("one", "hello", f"{{action: {first}}}")
        + _rule("two", "hello", f"{{action: {second}}}"),
    )
    assert evaluate(ruleset, _message()).action is expected


def test_ties_keep_the_earlier_rule(tmp_path: Path) -> None:
    ruleset = _ruleset(
        tmp_path,
        _rule("first", "hello", "{action: quarantine, reason: one}")
        + _rule("second", "hello", "{action: quarantine, reason: two}"),
    )
    verdict = evaluate(ruleset, _message())
    assert (verdict.deciding_rule, verdict.reason) == ("first", "one")


def test_accept_stop_first_wins_over_everything_after(tmp_path: Path) -> None:
    ruleset = _ruleset(
        tmp_path,
        _rule("scored", "hello", "{score: 20}")
        + _rule("trusted", "hello", "{action: accept, stop: true}")
        + _rule("later", "hello", "{action: reject}"),
    )
    verdict = evaluate(ruleset, _message())
    assert (verdict.action, verdict.deciding_rule, verdict.tag) == (Action.ACCEPT, "trusted", False)
    assert verdict.score == 20.0  # reported, but no threshold applies
    assert verdict.rules == ("scored", "trusted")
    assert verdict.trace[2].matched is False
    assert "not evaluated" in verdict.trace[2].detail


def test_accept_stop_after_a_stronger_action_does_not_override(tmp_path: Path) -> None:
    ruleset = _ruleset(
        tmp_path,
        _rule("tagger", "hello", "{action: tag}")
        + _rule("trusted", "hello", "{action: accept, stop: true}")
        + _rule("later", "hello", "{action: reject}"),
    )
    verdict = evaluate(ruleset, _message())
    assert (verdict.action, verdict.deciding_rule) == (Action.TAG, "tagger")
    assert "later" not in verdict.rules


def test_other_stop_keeps_the_decision_and_applies_thresholds(tmp_path: Path) -> None:
    ruleset = _ruleset(
        tmp_path,
        _rule("big", "hello", "{score: 11, stop: true}")
        + _rule("later", "hello", "{action: reject}"),
    )
    verdict = evaluate(ruleset, _message())
    assert (verdict.action, verdict.deciding_rule) == (Action.QUARANTINE, None)
    assert verdict.reason == "score 11 reached the quarantine threshold 10"
    assert verdict.rules == ("big",)


@pytest.mark.parametrize(
    ("scores", "expected", "tag"),
    [
        ([1.5, 2], Action.ACCEPT, False),
        ([2.5, 2.5], Action.TAG, True),
        ([6, 4], Action.QUARANTINE, True),
        ([10, 5], Action.REJECT, True),
        ([20, -6], Action.QUARANTINE, True),  # negative scores count
    ],
)
def test_thresholds(tmp_path: Path, scores: list[float], expected: Action, tag: bool) -> None:
    rules = "".join(_rule(f"s{i}", "hello", f"{{score: {s}}}") for i, s in enumerate(scores))
    verdict = evaluate(_ruleset(tmp_path, rules), _message())
    assert (verdict.action, verdict.tag, verdict.score) == (expected, tag, sum(scores))
    assert verdict.subject_prefix == ("[SPAM] " if tag else "")
    if expected is Action.REJECT:
        assert verdict.reply == SmtpReply(554, "5.7.1", "Message rejected by policy")


def test_threshold_competes_with_rule_actions(tmp_path: Path) -> None:
    stronger = _ruleset(tmp_path, _rule("q", "hello", "{action: quarantine, score: 16}"))
    verdict = evaluate(stronger, _message())
    assert (verdict.action, verdict.deciding_rule) == (Action.REJECT, None)
    weaker = _ruleset(tmp_path, _rule("r", "hello", "{action: reject, score: 6}"))
    verdict = evaluate(weaker, _message())
    assert (verdict.action, verdict.deciding_rule, verdict.tag) == (Action.REJECT, "r", True)


def test_no_thresholds_configured(tmp_path: Path) -> None:
    ruleset = _ruleset(tmp_path, _rule("s", "hello", "{score: 100}"), head="")
    verdict = evaluate(ruleset, _message())
    assert (verdict.action, verdict.tag, verdict.required_score) == (Action.ACCEPT, False, None)


def test_shadow_rules_are_traced_and_never_act(tmp_path: Path) -> None:
    ruleset = _ruleset(
        tmp_path,
        _rule("shadowed", "hello", "{action: reject, score: 100, stop: true}", ", mode: shadow")
        + _rule("real", "hello", "{score: 1}"),
    )
    verdict = evaluate(ruleset, _message())
    assert (verdict.action, verdict.score, verdict.rules) == (Action.ACCEPT, 1.0, ("real",))
    assert verdict.shadow_rules == ("shadowed",)
    shadow_trace = verdict.trace[0]
    assert (shadow_trace.matched, shadow_trace.shadow, shadow_trace.score) == (True, True, 100.0)
    assert ruleset.shadow_rule_names == ("shadowed",)


def test_modifiers_accumulate(tmp_path: Path) -> None:
    ruleset = _ruleset(
        tmp_path,
        "".join(
            [
                _rule(
                    "a",
                    "hello",
                    "{add_header: {X-A: '1'}, bcc: [audit@example.org], subject_prefix: '[A] '}",
                ),
                _rule(
                    "b",
                    "hello",
                    "{add_header: {X-B: '2'}, remove_header: [X-Old], "
                    "bcc: [audit@example.org, legal@example.org], subject_prefix: '[B] '}",
                ),
                _rule("c", "nomatch", "{add_header: {X-C: '3'}}"),
            ]
        ),
    )
    verdict = evaluate(ruleset, _message())
    assert verdict.add_headers == (("X-A", "1"), ("X-B", "2"))
    assert verdict.remove_headers == ("X-Old",)
    assert verdict.bcc == ("audit@example.org", "legal@example.org")
    assert verdict.subject_prefix == "[A] "


def test_redirect(tmp_path: Path) -> None:
    ruleset = _ruleset(tmp_path, _rule("moved", "hello", "{redirect: [new@example.org]}"))
    verdict = evaluate(ruleset, _message())
    assert (verdict.action, verdict.redirect) == (Action.REDIRECT, ("new@example.org",))
    beaten = _ruleset(
        tmp_path,
        _rule("moved", "hello", "{redirect: [new@example.org]}")
        + _rule("q", "hello", "{action: quarantine}"),
    )
    verdict = evaluate(beaten, _message())
    assert (verdict.action, verdict.redirect) == (Action.QUARANTINE, ())


def test_rule_replies_and_defaults(tmp_path: Path) -> None:
    custom = _ruleset(
        tmp_path, _rule("r", "hello", "{action: reject, reply: '550 5.7.0 Go away now'}")
    )
    assert evaluate(custom, _message()).reply == SmtpReply(550, "5.7.0", "Go away now")
    later = _ruleset(tmp_path, _rule("t", "hello", "{action: tempfail}"))
    deferred = SmtpReply(451, "4.7.1", "Message deferred by policy")
    assert evaluate(later, _message()).reply == deferred
    own = _ruleset(tmp_path, _rule("t", "hello", "{action: tempfail, reply: '450 4.2.0 Busy'}"))
    assert evaluate(own, _message()).reply == SmtpReply(450, "4.2.0", "Busy")


def test_trace_lists_every_rule_in_order(tmp_path: Path) -> None:
    rules = "".join(
        _rule(f"r{i}", "hello" if i % 3 == 0 else f"miss{i}", "{score: 0.5}") for i in range(12)
    )
    rules += "- {name: neg, if: {not: {body: {contains: absent}}}, then: {score: 0.25}}\n"
    verdict = evaluate(_ruleset(tmp_path, rules), _message())
    assert [t.rule for t in verdict.trace] == [f"r{i}" for i in range(12)] + ["neg"]
    assert verdict.rules == ("r0", "r3", "r6", "r9", "neg")
    assert all(t.detail for t in verdict.trace if t.matched)
    assert verdict.score == 2.25


def test_the_trace_quotes_what_matched_and_is_built_only_when_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = (
        "- {name: money, if: {body: {regex: 'win \\$[0-9]+'}}, then: {score: 1}}\n"
        "- {name: words, if: {subject: {contains: lottery}}, then: {score: 1}}\n"
    )
    ruleset = _ruleset(tmp_path, rules)
    searches: list[int] = []
    original = filterd.rules.matchers.PatternMatch.describe

    def counting(self: object, scan: object, item: int) -> str:
        searches.append(item)
        return original(self, scan, item)  # type: ignore[arg-type]

    monkeypatch.setattr(filterd.rules.matchers.PatternMatch, "describe", counting)
    verdict = evaluate(ruleset, _message(subject="lottery", body="you win $500 today"))
    assert verdict.rules == ("money", "words")
    deciding = len(searches)
    trace = {t.rule: t.detail for t in verdict.trace}
    assert '"win $500"' in trace["money"]  # the text the regex matched, quoted
    assert '"lottery"' in trace["words"]
    assert len(searches) > deciding  # quoting happened when the trace was read
    assert verdict.trace == tuple(verdict.trace)  # and the trace is a stable sequence


def test_evaluation_is_deterministic(tmp_path: Path) -> None:
    ruleset = _ruleset(
        tmp_path, _rule("a", "hello", "{score: 6}") + _rule("b", "text", "{score: 1}")
    )
    message = _message()
    assert evaluate(ruleset, message) == evaluate(ruleset, message)


def test_scanned_size_is_capped(tmp_path: Path) -> None:
    rules = (
        "- {name: deep, if: {body: {contains: needle}}, then: {score: 1}}\n"
        "- {name: deepraw, if: {raw: {contains: needle}}, then: {score: 1}}\n"
    )
    capped = _ruleset(tmp_path, rules, max_scan_bytes=1000)
    assert evaluate(capped, _message(body="x" * 5000 + " needle")).rules == ()
    assert evaluate(capped, _message(body="needle " + "x" * 5000)).rules == ("deep", "deepraw")


class _Spy(ParsedMessage):
    """A real ParsedMessage that records which content views were computed."""

    seen: list[str] = []  # noqa: RUF012 - reset by each test

    def __getattribute__(self, name: str) -> object:
        if name in ("body_text", "urls", "attachments", "headers", "header_values", "addresses"):
            _Spy.seen.append(name)
        return super().__getattribute__(name)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    _Spy.seen = []
    monkeypatch.setattr(filterd.rules.view, "ParsedMessage", _Spy)
    return _Spy.seen


def test_header_only_rules_never_decode_the_body(tmp_path: Path, spy: list[str]) -> None:
    ruleset = _ruleset(
        tmp_path,
        _rule("s", "hello", "{score: 1}")
        + "- {name: h, if: {header: {name: Date, exists: false}}, "
        "then: {score: 1}}\n",
    )
    assert evaluate(ruleset, _message()).rules == ("s", "h")
    assert "header_values" in spy
    assert not {"body_text", "urls", "attachments"} & set(spy)


def test_envelope_only_rules_never_parse(tmp_path: Path, spy: list[str]) -> None:
    ruleset = _ruleset(
        tmp_path, "- {name: e, if: {sender: {domain: {equals: example.org}}}, then: {score: 1}}\n"
    )
    assert evaluate(ruleset, _message()).rules == ("e",)
    assert spy == []


def test_accept_stop_at_the_top_skips_content_scanning(tmp_path: Path, spy: list[str]) -> None:
    ruleset = _ruleset(
        tmp_path,
        "- {name: trusted, if: {sender: {equals: a@example.org}}, "
        "then: {action: accept, stop: true}}\n"
        "- {name: gtube, if: {body: {contains: GTUBE}}, then: {action: reject}}\n",
    )
    verdict = evaluate(ruleset, _message(body="GTUBE"))
    assert (verdict.action, verdict.rules) == (Action.ACCEPT, ("trusted",))
    assert "body_text" not in spy
    other = evaluate(ruleset, _message(body="GTUBE", sender="x@elsewhere.example"))
    assert other.action is Action.REJECT
    assert "body_text" in spy
