"""``tests:`` of rule files → ``RuleTestCase`` values, validated like the rules themselves.

A case names a message (a file relative to its rule file, or the inline ``raw:`` text), an
optional envelope and what the verdict must be. Rule names in ``expect`` must exist, so a
renamed rule breaks its tests at load rather than silently passing them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filterd.model import Action, Envelope
from filterd.rules.pipeline import RuleTestCase, TestExpectation
from filterd.rules.validate import (
    Problems,
    as_bool,
    as_map,
    as_number,
    as_seq,
    as_str,
    as_str_list,
    suggestion,
    unknown_keys,
)
from filterd.yamlsrc import Pos

TEST_KEYS = ("name", "message", "raw", "sender", "recipients", "client_ip", "helo", "expect")
EXPECT_KEYS = ("action", "rules", "not_rules", "score_at_least", "score_below", "tag")
ACTIONS = tuple(action.value for action in Action)
DEFAULT_TEST_SENDER = "sender@example.test"
DEFAULT_TEST_RECIPIENT = "recipient@example.test"


class TestCaseParser:
    """Parses ``tests:`` sections; ``rule_at`` holds every rule name of the rule set."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, problems: Problems, rule_at: Mapping[str, Pos]) -> None:
        self.problems = problems
        self.rule_at = rule_at

    def parse(self, source: str, value: Any, pos: Pos) -> list[RuleTestCase]:
        """The test cases of the ``tests:`` of rule file ``source``."""
        seq = as_seq(value, pos, self.problems, "'tests:'")
        if seq is None:
            return []
        cases = [self._test(source, item, seq.at(index)) for index, item in enumerate(seq)]
        return [case for case in cases if case is not None]

    def _test(self, source: str, value: Any, pos: Pos) -> RuleTestCase | None:
        mapping = as_map(value, pos, self.problems, "a test case")
        if mapping is None:
            return None
        before = len(self.problems.items)
        unknown_keys(mapping, TEST_KEYS, self.problems, "a test case")
        problems = self.problems
        has = [key for key in ("message", "raw") if key in mapping]
        message_path: str | None = None
        raw: bytes | None = None
        if len(has) != 1:
            problems.add(pos, "a test case needs exactly one of message: (a file) or raw: (text)")
        elif has[0] == "message":
            rel = as_str(mapping["message"], mapping.at("message"), problems, "message")
            message_path = str(Path(source).parent / rel) if rel else None
        else:
            text = as_str(mapping["raw"], mapping.at("raw"), problems, "raw")
            raw = to_crlf(text.encode("utf-8")) if text else None
        name = f"{Path(source).name}:{pos.line}"
        if "name" in mapping:
            name = as_str(mapping["name"], mapping.at("name"), problems, "test name") or name
        elif message_path:
            name += f" ({Path(message_path).name})"

        def text_key(key: str, default: str | None) -> str | None:
            if key not in mapping:
                return default
            return as_str(mapping[key], mapping.at(key), problems, key, allow_empty=key == "sender")

        sender = text_key("sender", DEFAULT_TEST_SENDER) or ""
        recipients: tuple[str, ...] = (DEFAULT_TEST_RECIPIENT,)
        if "recipients" in mapping:
            listed = as_str_list(
                mapping["recipients"], mapping.at("recipients"), problems, "recipients"
            )
            recipients = tuple(address for address, _ in listed or [])
        envelope = Envelope(
            sender=sender,
            recipients=recipients,
            client_ip=text_key("client_ip", None),
            helo=text_key("helo", None),
        )
        expect = (
            self._expect(mapping.get("expect"), mapping.at("expect"))
            if "expect" in mapping
            else None
        )
        if expect is None and "expect" not in mapping:
            problems.add(pos, "a test case needs expect:")
        if expect is None or len(problems.items) != before:
            return None
        return RuleTestCase(
            name=name,
            source=source,
            line=pos.line,
            col=pos.col,
            envelope=envelope,
            expect=expect,
            message_path=message_path,
            raw=raw,
        )

    def _expect(self, value: Any, pos: Pos) -> TestExpectation | None:
        mapping = as_map(value, pos, self.problems, "expect")
        if mapping is None:
            return None
        unknown_keys(mapping, EXPECT_KEYS, self.problems, "expect")
        if not mapping:
            self.problems.add(pos, "expect: needs at least one of " + ", ".join(EXPECT_KEYS))
            return None
        fields: dict[str, Any] = {}
        if "action" in mapping:
            text = as_str(mapping["action"], mapping.at("action"), self.problems, "expect action")
            if text is not None and text not in ACTIONS:
                self.problems.add(
                    mapping.at("action"), f"unknown action '{text}'{suggestion(text, ACTIONS)}"
                )
            elif text is not None:
                fields["action"] = Action(text)
        for key in ("rules", "not_rules"):
            if key in mapping:
                names = as_str_list(mapping[key], mapping.at(key), self.problems, key) or []
                for rule_name, at in names:
                    if rule_name not in self.rule_at:
                        self.problems.add(
                            at, f"unknown rule '{rule_name}'{suggestion(rule_name, self.rule_at)}"
                        )
                fields[key] = tuple(n for n, _ in names)
        for key in ("score_at_least", "score_below"):
            if key in mapping:
                fields[key] = as_number(mapping[key], mapping.at(key), self.problems, key)
        if "tag" in mapping:
            fields["tag"] = as_bool(mapping["tag"], mapping.at("tag"), self.problems, "tag")
        return TestExpectation(**fields)


def to_crlf(data: bytes) -> bytes:
    """Normalize line endings to CRLF, as a message arrives over SMTP."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
