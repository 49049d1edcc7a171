"""Rule files → validated model → compiled ``RuleSet`` (``load_ruleset``).

A path is a rule file or a directory whose ``*.yaml`` files load in name order. Files are
read with the safe YAML loader (``filterd.yamlsrc``: duplicate keys are errors, positions are
kept). Parsing never stops at the first problem: every problem of every file is collected
and raised together as one ``ConfigError`` whose problems each read ``file:line:col: message``.
Nothing is shared with a previously loaded set, so a reload builds a complete new object.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filterd.errors import ConfigError, Problem
from filterd.model import Action, SmtpReply
from filterd.rules.condparse import ConditionParser
from filterd.rules.lists import NamedList, load_list
from filterd.rules.matchers import PatternTable
from filterd.rules.pipeline import DEFAULT_MAX_SCAN_BYTES, Rule, RuleSet, RuleTestCase, Thresholds
from filterd.rules.testcases import TestCaseParser
from filterd.rules.validate import (
    Problems,
    as_bool,
    as_map,
    as_number,
    as_seq,
    as_str,
    as_str_list,
    describe_type,
    header_name,
    suggestion,
    unknown_keys,
)
from filterd.yamlsrc import Pos, YamlMap, load_yaml_file

TOP_KEYS = ("lists", "rules", "scores", "tag", "tests")
RULE_KEYS = ("name", "description", "if", "then", "mode")
THEN_KEYS = (
    "action",
    "reply",
    "reason",
    "score",
    "stop",
    "bcc",
    "redirect",
    "add_header",
    "remove_header",
    "subject_prefix",
)
SCORE_KEYS = ("tag", "quarantine", "reject")
TAG_KEYS = ("subject_prefix",)
MODES = ("enforce", "shadow")
ACTIONS = tuple(action.value for action in Action)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
LIST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
REPLY_RE = re.compile(r"^([245]\d\d)[ -]([245]\.\d{1,3}\.\d{1,3}) +([ -~]+)$")
ADDRESS_RE = re.compile(r"^[^\s<>@,;]+@[^\s<>@,;]+$")
MAX_HEADER_VALUE = 900


def rule_files(path: str | os.PathLike[str]) -> list[str]:
    """The files a rules path names: itself, or the ``*.yaml`` of a directory in name order."""
    text = os.fspath(path)
    if os.path.isdir(text):
        names = sorted(n for n in os.listdir(text) if n.endswith(".yaml") and not n.startswith("."))
        if not names:
            raise ConfigError.single(text, 1, 1, "no rule files (*.yaml) in this directory")
        return [os.path.join(text, name) for name in names]
    if not os.path.exists(text):
        raise ConfigError.single(text, 1, 1, "rules path does not exist")
    return [text]


def load_ruleset(
    path: str | os.PathLike[str], *, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES
) -> RuleSet:
    """Load, validate and compile the rules at ``path``; ``ConfigError`` lists every problem."""
    if max_scan_bytes <= 0:
        raise ConfigError.single(os.fspath(path), 1, 1, "max_scan_bytes must be positive")
    return _Loader(rule_files(path), max_scan_bytes).load()


class _Loader:
    def __init__(self, files: Sequence[str], max_scan_bytes: int) -> None:
        self.files = list(files)
        self.max_scan_bytes = max_scan_bytes
        self.problems = Problems()
        self.lists: dict[str, NamedList] = {}
        self.table = PatternTable()
        self.rules: list[Rule] = []
        self.rule_at: dict[str, Pos] = {}
        self.thresholds: dict[str, tuple[float, Pos]] = {}
        self.subject_prefix: tuple[str, Pos] | None = None
        self.tests: list[RuleTestCase] = []

    def load(self) -> RuleSet:
        documents: list[tuple[str, YamlMap]] = []
        for source in self.files:
            try:
                document = load_yaml_file(source)
            except ConfigError as exc:
                self.problems.items.extend(exc.problems)
                continue
            if not isinstance(document, YamlMap):
                self.problems.items.append(
                    Problem(
                        source,
                        1,
                        1,
                        f"a rule file must be a mapping with rules:, got {describe_type(document)}",
                    )
                )
                continue
            unknown_keys(document, TOP_KEYS, self.problems, "a rule file")
            documents.append((source, document))
        for source, document in documents:
            if "lists" in document:
                self._lists(source, document["lists"], document.at("lists"))
        conditions = ConditionParser(self.table, self.lists, self.problems)
        for _source, document in documents:
            if "rules" in document:
                self._rules(document["rules"], document.at("rules"), conditions)
            if "scores" in document:
                self._scores(document["scores"], document.at("scores"))
            if "tag" in document:
                self._tag(document["tag"], document.at("tag"))
        tests = TestCaseParser(self.problems, self.rule_at)
        for source, document in documents:
            if "tests" in document:
                self.tests.extend(tests.parse(source, document["tests"], document.at("tests")))
        self._check_thresholds()
        scanners = self.table.compile(self.problems.items)
        if self.problems:
            order = {source: index for index, source in enumerate(self.files)}
            raise ConfigError(
                sorted(
                    self.problems.items,
                    key=lambda p: (order.get(p.source, len(order)), p.source, p.line, p.col),
                )
            )
        return RuleSet(
            rules=tuple(self.rules),
            sources=tuple(self.files),
            lists=tuple(self.lists),
            tests=tuple(self.tests),
            thresholds=Thresholds(**{k: v for k, (v, _) in self.thresholds.items()}),
            tag_subject_prefix=self.subject_prefix[0] if self.subject_prefix else "",
            max_scan_bytes=self.max_scan_bytes,
            scanners=scanners,
        )

    # -- lists, scores, tag ---------------------------------------------------------------

    def _lists(self, source: str, value: Any, pos: Pos) -> None:
        mapping = as_map(value, pos, self.problems, "'lists:'")
        if mapping is None:
            return
        base = Path(source).parent
        for name, path_value in mapping.items():
            at = mapping.key_at(name)
            if not LIST_NAME_RE.fullmatch(name):
                self.problems.add(at, f"bad list name '{name}' (letters, digits, '_', '-', '.')")
                continue
            if name in self.lists:
                first = self.lists[name].declared_at
                self.problems.add(
                    at,
                    f"duplicate list name '{name}' (first declared at "
                    f"{first.source}:{first.line}:{first.col})",
                )
                continue
            rel = as_str(path_value, mapping.at(name), self.problems, f"list '{name}' path")
            if rel is None:
                continue
            loaded = load_list(name, str(base / rel), mapping.at(name))
            if isinstance(loaded, Problem):
                self.problems.items.append(loaded)
            else:
                self.lists[name] = loaded

    def _scores(self, value: Any, pos: Pos) -> None:
        mapping = as_map(value, pos, self.problems, "'scores:'")
        if mapping is None:
            return
        unknown_keys(mapping, SCORE_KEYS, self.problems, "'scores:'")
        for key in SCORE_KEYS:
            if key not in mapping:
                continue
            number = as_number(mapping[key], mapping.at(key), self.problems, f"scores {key}")
            if number is None:
                continue
            if key in self.thresholds:
                first = self.thresholds[key][1]
                self.problems.add(
                    mapping.key_at(key),
                    f"scores {key} is already set at {first.source}:{first.line}:{first.col}",
                )
                continue
            self.thresholds[key] = (number, mapping.key_at(key))

    def _check_thresholds(self) -> None:
        set_ones = [(k, self.thresholds[k]) for k in SCORE_KEYS if k in self.thresholds]
        for (low_key, (low, _)), (high_key, (high, at)) in itertools.pairwise(set_ones):
            if high <= low:
                self.problems.add(
                    at, f"scores {high_key} ({high:g}) must be above {low_key} ({low:g})"
                )

    def _tag(self, value: Any, pos: Pos) -> None:
        mapping = as_map(value, pos, self.problems, "'tag:'")
        if mapping is None:
            return
        unknown_keys(mapping, TAG_KEYS, self.problems, "'tag:'")
        if "subject_prefix" in mapping:
            at = mapping.key_at("subject_prefix")
            prefix = _header_text(
                mapping["subject_prefix"],
                mapping.at("subject_prefix"),
                self.problems,
                "subject_prefix",
            )
            if prefix is None:
                return
            if self.subject_prefix is not None:
                first = self.subject_prefix[1]
                self.problems.add(
                    at,
                    f"tag subject_prefix is already set at {first.source}:{first.line}:{first.col}",
                )
                return
            self.subject_prefix = (prefix, at)

    # -- rules ------------------------------------------------------------------------------

    def _rules(self, value: Any, pos: Pos, conditions: ConditionParser) -> None:
        seq = as_seq(value, pos, self.problems, "'rules:'")
        if seq is None:
            return
        for index, item in enumerate(seq):
            rule = self._rule(item, seq.at(index), conditions)
            if rule is not None:
                self.rules.append(rule)

    def _rule(self, value: Any, pos: Pos, conditions: ConditionParser) -> Rule | None:
        mapping = as_map(value, pos, self.problems, "a rule")
        if mapping is None:
            return None
        ok = unknown_keys(mapping, RULE_KEYS, self.problems, "a rule")
        name = self._rule_name(mapping, pos)
        ok = ok and name is not None
        for required in ("if", "then"):
            if required not in mapping:
                self.problems.add(pos, f"rule {name or ''} needs '{required}:'".replace("  ", " "))
                ok = False
        condition = conditions.parse(mapping["if"], mapping.at("if")) if "if" in mapping else None
        then = self._then(mapping["then"], mapping.at("then")) if "then" in mapping else None
        description = ""
        if "description" in mapping:
            description = (
                as_str(
                    mapping["description"],
                    mapping.at("description"),
                    self.problems,
                    "description",
                    allow_empty=True,
                )
                or ""
            )
        shadow = False
        if "mode" in mapping:
            mode = as_str(mapping["mode"], mapping.at("mode"), self.problems, "mode")
            if mode is not None and mode not in MODES:
                self.problems.add(
                    mapping.at("mode"),
                    f"mode must be 'enforce' or 'shadow', got '{mode}'{suggestion(mode, MODES)}",
                )
                ok = False
            shadow = mode == "shadow"
        if not ok or condition is None or then is None or name is None:
            return None
        return Rule(
            name=name,
            source=pos.source,
            line=pos.line,
            condition=condition,
            description=description,
            shadow=shadow,
            **then,
        )

    def _rule_name(self, mapping: YamlMap, pos: Pos) -> str | None:
        if "name" not in mapping:
            self.problems.add(pos, "rule needs a name")
            return None
        at = mapping.at("name")
        name = as_str(mapping["name"], at, self.problems, "rule name")
        if name is None:
            return None
        if not NAME_RE.fullmatch(name):
            self.problems.add(
                at,
                f"bad rule name '{name}': use lowercase letters, digits, '_' "
                "and '-', starting with a letter or digit",
            )
            return None
        if name in self.rule_at:
            first = self.rule_at[name]
            self.problems.add(
                at,
                f"duplicate rule name '{name}' (first defined at "
                f"{first.source}:{first.line}:{first.col})",
            )
            return None
        self.rule_at[name] = at
        return name

    def _then(self, value: Any, pos: Pos) -> dict[str, Any] | None:
        mapping = as_map(value, pos, self.problems, "'then:'")
        if mapping is None:
            return None
        ok = unknown_keys(mapping, THEN_KEYS, self.problems, "'then:'")
        if not mapping:
            self.problems.add(pos, "'then:' needs an action, a score, a modifier or stop")
            return None
        out: dict[str, Any] = {}
        problems = self.problems
        before = len(problems.items)
        action: Action | None = None
        if "action" in mapping:
            text = as_str(mapping["action"], mapping.at("action"), problems, "action")
            if text is not None and text not in ACTIONS:
                problems.add(
                    mapping.at("action"),
                    f"unknown action '{text}' (one of "
                    f"{', '.join(ACTIONS)}){suggestion(text, ACTIONS)}",
                )
            elif text is not None:
                action = Action(text)
        if "redirect" in mapping:
            targets = _addresses(mapping["redirect"], mapping.at("redirect"), problems, "redirect")
            out["redirect"] = targets or ()
            if action not in (None, Action.REDIRECT):
                problems.add(
                    mapping.key_at("redirect"),
                    f"redirect: replaces the recipients, "
                    f"it cannot go with action {action.value if action else ''}",
                )
            action = Action.REDIRECT
        elif action is Action.REDIRECT:
            problems.add(mapping.at("action"), "action redirect needs redirect: [address, ...]")
        out["action"] = action
        if "reply" in mapping:
            out["reply"] = _reply(mapping["reply"], mapping.at("reply"), action, problems)
        if "reason" in mapping:
            out["reason"] = (
                as_str(
                    mapping["reason"], mapping.at("reason"), problems, "reason", allow_empty=True
                )
                or ""
            )
        if "score" in mapping:
            score = as_number(mapping["score"], mapping.at("score"), problems, "score")
            out["score"] = score or 0.0
        if "stop" in mapping:
            out["stop"] = bool(as_bool(mapping["stop"], mapping.at("stop"), problems, "stop"))
        if "bcc" in mapping:
            out["bcc"] = _addresses(mapping["bcc"], mapping.at("bcc"), problems, "bcc") or ()
        if "add_header" in mapping:
            out["add_headers"] = self._add_headers(mapping["add_header"], mapping.at("add_header"))
        if "remove_header" in mapping:
            names = (
                as_str_list(
                    mapping["remove_header"], mapping.at("remove_header"), problems, "remove_header"
                )
                or []
            )
            out["remove_headers"] = tuple(
                n for n, at in names if header_name(n, at, problems, "remove_header") is not None
            )
        if "subject_prefix" in mapping:
            out["subject_prefix"] = (
                _header_text(
                    mapping["subject_prefix"],
                    mapping.at("subject_prefix"),
                    problems,
                    "subject_prefix",
                )
                or ""
            )
        return out if ok and len(problems.items) == before else None

    def _add_headers(self, value: Any, pos: Pos) -> tuple[tuple[str, str], ...]:
        mapping = as_map(value, pos, self.problems, "add_header")
        if mapping is None:
            return ()
        out: list[tuple[str, str]] = []
        for name, text in mapping.items():
            checked = header_name(name, mapping.key_at(name), self.problems, "add_header name")
            header_value = _header_text(text, mapping.at(name), self.problems, f"header {name}")
            if checked is not None and header_value is not None:
                out.append((checked, header_value))
        return tuple(out)


def _header_text(value: Any, pos: Pos, problems: Problems, what: str) -> str | None:
    text = as_str(value, pos, problems, what, allow_empty=True)
    if text is None:
        return None
    if "\r" in text or "\n" in text or len(text) > MAX_HEADER_VALUE:
        problems.add(pos, f"{what} must be one line of at most {MAX_HEADER_VALUE} characters")
        return None
    return text


def _addresses(value: Any, pos: Pos, problems: Problems, what: str) -> tuple[str, ...] | None:
    listed = as_str_list(value, pos, problems, what)
    if listed is None:
        return None
    bad = [(text, at) for text, at in listed if not ADDRESS_RE.fullmatch(text)]
    for text, at in bad:
        problems.add(at, f"{what}: '{text}' is not an email address (write user@example.org)")
    return None if bad else tuple(text for text, _ in listed)


def _reply(value: Any, pos: Pos, action: Action | None, problems: Problems) -> SmtpReply | None:
    text = as_str(value, pos, problems, "reply")
    if text is None:
        return None
    if action not in (Action.REJECT, Action.TEMPFAIL):
        problems.add(pos, "reply: only applies to action reject or tempfail")
        return None
    wanted = "5" if action is Action.REJECT else "4"
    example = "554 5.7.1 Message rejected" if wanted == "5" else "451 4.7.1 Try again later"
    found = REPLY_RE.fullmatch(text)
    if not found or found.group(1)[0] != wanted or found.group(2)[0] != wanted:
        problems.add(
            pos,
            f"reply for {action.value} must be '{wanted}xx {wanted}.x.y text' "
            f"(e.g. '{example}'), got '{text}'",
        )
        return None
    return SmtpReply(int(found.group(1)), found.group(2), found.group(3).strip())
