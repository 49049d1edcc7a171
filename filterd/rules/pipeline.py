"""The compiled rule set and ``evaluate``: the pure function from a message to its verdict.

Order and precedence (docs/rules.md tells the admin the same):

1. Rules run in load order (files by name, rules in file order). A matching rule adds its
   score and its modifiers (headers, bcc, subject prefix); its action competes with the
   action decided so far by ``Action.strength``: reject > tempfail > quarantine > discard >
   redirect > tag > accept; on a tie the earlier rule keeps the decision.
2. ``stop: true`` on a matching rule ends evaluation. If that rule's action is ``accept`` and
   nothing stronger than accept was decided before it, the message is accepted outright:
   thresholds are not applied and nothing after it counts. Any other stop keeps what was
   decided so far and still applies the thresholds.
3. Thresholds (``scores:``) apply to the summed score of the non-shadow rules that matched;
   the strongest threshold reached competes with the rules' decision by strength.
4. ``mode: shadow`` rules are evaluated and traced, never add score, act or stop.

Rules are evaluated lazily: a rule whose condition needs a multi-pattern hit (its *atoms*) is
only looked at when a field scan produced one of them, and a field is scanned only when the
first rule that needs it comes up. The work per message thus follows the rules that can
match, and a trusted-relay ``accept`` + ``stop`` at the top skips all content scanning.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, overload

from filterd.model import Action, Envelope, Message, RuleTrace, SmtpReply, Verdict
from filterd.rules.view import MessageScan

if TYPE_CHECKING:
    from filterd.rules.conditions import Condition
    from filterd.rules.matchers import FieldScanner

DEFAULT_REJECT = SmtpReply(554, "5.7.1", "Message rejected by policy")
DEFAULT_TEMPFAIL = SmtpReply(451, "4.7.1", "Message deferred by policy")
DEFAULT_MAX_SCAN_BYTES = 1_048_576


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: where it came from, its condition and what it does."""

    name: str
    source: str
    line: int
    condition: Condition
    description: str = ""
    action: Action | None = None
    reply: SmtpReply | None = None
    reason: str = ""
    score: float = 0.0
    stop: bool = False
    shadow: bool = False
    bcc: tuple[str, ...] = ()
    redirect: tuple[str, ...] = ()
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    subject_prefix: str = ""


@dataclass(frozen=True)
class Thresholds:
    """``scores:``: summed-score thresholds; each one is optional."""

    tag: float | None = None
    quarantine: float | None = None
    reject: float | None = None

    def reached(self, score: float) -> tuple[Action, float] | None:
        """The strongest threshold ``score`` reaches, with its value."""
        for action, value in (
            (Action.REJECT, self.reject),
            (Action.QUARANTINE, self.quarantine),
            (Action.TAG, self.tag),
        ):
            if value is not None and score >= value:
                return action, value
        return None


@dataclass(frozen=True)
class TestExpectation:
    """``expect:`` of a test case; None/empty means "not checked"."""

    __test__ = False  # not a pytest class, despite the name

    action: Action | None = None
    rules: tuple[str, ...] = ()
    not_rules: tuple[str, ...] = ()
    score_at_least: float | None = None
    score_below: float | None = None
    tag: bool | None = None


@dataclass(frozen=True)
class RuleTestCase:
    """One ``tests:`` entry: a message (file or inline), its envelope and what must come out."""

    __test__ = False

    name: str
    source: str
    line: int
    col: int
    envelope: Envelope
    expect: TestExpectation
    message_path: str | None = None  # resolved against the rule file's directory
    raw: bytes | None = None


_Step = tuple[int, Rule | None, tuple[tuple[str, Mapping[int, tuple[int, ...]]], ...] | None]


@dataclass(frozen=True, eq=False)  # compiled matchers have no value equality: compare by identity
class RuleSet:
    """A complete, immutable rule set; reload builds a new one and swaps the reference."""

    rules: tuple[Rule, ...]
    sources: tuple[str, ...]
    lists: tuple[str, ...]
    tests: tuple[RuleTestCase, ...]
    thresholds: Thresholds
    tag_subject_prefix: str
    max_scan_bytes: int
    scanners: Mapping[str, FieldScanner] = field(repr=False)
    rule_names: tuple[str, ...] = field(init=False)
    shadow_rule_names: tuple[str, ...] = field(init=False)
    # Lazy evaluation plan (see module docstring); built from the rules, never mutated.
    # The steps every evaluation takes, in order: (key, rule to evaluate or None, field scans
    # to run or None). A key is 2 * position + 1 for a rule, 2 * position for the scans of the
    # fields a rule at that position is the first to need; a scan pushes the keys of the rules
    # its hits name (each field's pattern index -> rule positions) for a visit in key order.
    _steps: tuple[_Step, ...] = field(init=False, repr=False)
    _unmatched: tuple[RuleTrace, ...] = field(init=False, repr=False)
    _skipped: tuple[RuleTrace, ...] = field(init=False, repr=False)
    _nothing_matched: Verdict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "rule_names", tuple(rule.name for rule in self.rules))
        put(self, "shadow_rule_names", tuple(rule.name for rule in self.rules if rule.shadow))
        atom_rules: dict[str, dict[int, list[int]]] = {}
        first_use: dict[str, int] = {}
        initial: list[int] = []
        for position, rule in enumerate(self.rules):
            atoms = rule.condition.atoms()
            if not atoms:
                initial.append(2 * position + 1)
                continue
            for field_name, index in atoms:
                atom_rules.setdefault(field_name, {}).setdefault(index, []).append(position)
                first_use.setdefault(field_name, position)
        events: dict[int, list[str]] = {}
        for field_name, position in first_use.items():
            events.setdefault(position, []).append(field_name)
            initial.append(2 * position)  # even keys: scan before evaluating that rule
        by_field = {f: {i: tuple(r) for i, r in by.items()} for f, by in atom_rules.items()}
        steps: list[_Step] = []
        for key in sorted(set(initial)):
            position = key >> 1
            if key & 1:
                steps.append((key, self.rules[position], None))
            else:
                scans = tuple((name, by_field[name]) for name in events[position])
                steps.append((key, None, scans))
        put(self, "_steps", tuple(steps))
        put(
            self,
            "_unmatched",
            tuple(RuleTrace(rule.name, False, 0.0, rule.shadow, "", None) for rule in self.rules),
        )
        put(
            self,
            "_skipped",
            tuple(
                RuleTrace(
                    rule.name,
                    False,
                    0.0,
                    rule.shadow,
                    "not evaluated (an earlier rule stopped)",
                    None,
                )
                for rule in self.rules
            ),
        )
        # Most mail matches no rule; its verdict depends on the rule set alone (thresholds at
        # a score of 0): made once, not per message.
        put(self, "_nothing_matched", _verdict(self, _Decision(), (), None, self._unmatched))


class _Decision:
    """What the rules decided so far while evaluating one message (local to one call)."""

    __slots__ = ("add_headers", "bcc", "decider", "remove_headers", "score", "subject_prefix")

    def __init__(self) -> None:
        self.score = 0.0
        self.decider: Rule | None = None
        self.add_headers: list[tuple[str, str]] = []
        self.remove_headers: list[str] = []
        self.bcc: list[str] = []
        self.subject_prefix = ""

    def apply(self, rule: Rule) -> None:
        self.score += rule.score
        self.add_headers.extend(rule.add_headers)
        self.remove_headers.extend(rule.remove_headers)
        self.bcc.extend(address for address in rule.bcc if address not in self.bcc)
        if rule.subject_prefix and not self.subject_prefix:
            self.subject_prefix = rule.subject_prefix
        if rule.action is not None and (
            self.decider is None or rule.action.strength > _action(self.decider).strength
        ):
            self.decider = rule


def _action(rule: Rule) -> Action:
    return rule.action if rule.action is not None else Action.ACCEPT


def evaluate(ruleset: RuleSet, message: Message) -> Verdict:
    """The verdict of ``ruleset`` for ``message``: pure, no I/O, no clock."""
    scan = MessageScan(message, ruleset.scanners, ruleset.max_scan_bytes)
    rules = ruleset.rules
    steps = ruleset._steps
    step_count = len(steps)
    next_step = 0
    pushed: list[int] = []  # keys of rules a scan's hits named, as a heap (empty for most mail)
    matched: list[int] = []
    decision = _Decision()
    stopped_at: int | None = None
    accepted_by: Rule | None = None
    last_pushed = -1
    while True:
        if pushed and (next_step == step_count or pushed[0] < steps[next_step][0]):
            key = heapq.heappop(pushed)
            if key == last_pushed:
                continue  # a rule reached through several of its patterns
            last_pushed = key
            rule = rules[key >> 1]
        elif next_step < step_count:
            key, step_rule, scans = steps[next_step]
            next_step += 1
            if scans is not None:
                for field_name, rules_by_index in scans:
                    for index in scan.fired(field_name):
                        for candidate in rules_by_index.get(index, ()):
                            heapq.heappush(pushed, 2 * candidate + 1)
                continue
            rule = step_rule  # type: ignore[assignment]  # a step without scans has its rule
        else:
            break
        position = key >> 1
        if rule.condition.eval(scan) is None:
            continue
        matched.append(position)
        if rule.shadow:
            continue
        nothing_stronger = decision.decider is None or _action(decision.decider) is Action.ACCEPT
        decision.apply(rule)
        if rule.stop:
            stopped_at = position
            if rule.action is Action.ACCEPT and nothing_stronger:
                accepted_by = rule
            break
    if not matched:
        return ruleset._nothing_matched
    trace = LazyTrace(lambda: _trace(ruleset, scan, matched, stopped_at))
    return _verdict(ruleset, decision, matched, accepted_by, trace)


def _verdict(
    ruleset: RuleSet,
    decision: _Decision,
    matched: Sequence[int],
    accepted_by: Rule | None,
    trace: Sequence[RuleTrace],
) -> Verdict:
    rules = ruleset.rules
    score = round(decision.score, 4)
    thresholds = ruleset.thresholds
    decider = accepted_by or decision.decider
    action = _action(decider) if decider is not None else Action.ACCEPT
    reason = (decider.reason or decider.description or f"rule {decider.name}") if decider else ""
    reached = None if accepted_by is not None else thresholds.reached(score)
    if reached is not None and reached[0].strength > action.strength:
        action, decider = reached[0], None
        reason = f"score {score:g} reached the {reached[0].value} threshold {reached[1]:g}"
    tag = accepted_by is None and (
        action is Action.TAG or (thresholds.tag is not None and score >= thresholds.tag)
    )
    reply = None
    if action is Action.REJECT:
        reply = (decider.reply if decider is not None else None) or DEFAULT_REJECT
    elif action is Action.TEMPFAIL:
        reply = (decider.reply if decider is not None else None) or DEFAULT_TEMPFAIL
    return Verdict(
        action=action,
        score=score,
        rules=tuple(rules[p].name for p in matched if not rules[p].shadow),
        deciding_rule=decider.name if decider is not None else None,
        reason=reason,
        reply=reply,
        add_headers=tuple(decision.add_headers),
        remove_headers=tuple(decision.remove_headers),
        subject_prefix=decision.subject_prefix or (ruleset.tag_subject_prefix if tag else ""),
        bcc=tuple(decision.bcc),
        redirect=decider.redirect if decider is not None and action is Action.REDIRECT else (),
        tag=tag,
        required_score=thresholds.tag,
        trace=trace,
        shadow_rules=tuple(rules[p].name for p in matched if rules[p].shadow),
    )


def _trace(
    ruleset: RuleSet, scan: MessageScan, matched: Sequence[int], stopped_at: int | None
) -> tuple[RuleTrace, ...]:
    """Every rule's line of the trace; matched rules say what they matched, quoted. Their
    conditions are evaluated again with quoting on: everything they read is cached in
    ``scan``, so only the quoting is new work."""
    trace = list(ruleset._unmatched)
    if stopped_at is not None:
        trace[stopped_at + 1 :] = ruleset._skipped[stopped_at + 1 :]
    scan.quote = True
    for position in matched:
        rule = ruleset.rules[position]
        detail = rule.condition.eval(scan) or "matched"
        trace[position] = RuleTrace(rule.name, True, rule.score, rule.shadow, detail, rule.action)
    return tuple(trace)


class LazyTrace(Sequence[RuleTrace]):
    """A verdict's per-rule trace, built on first use.

    Building it costs a line per rule (1,000 rules: 1,000 entries) and a second regex search
    per matched pattern to quote what it matched. Only the quarantine and ``filterd scan`` /
    ``test`` read the trace, so mail that is simply relayed never pays for it.
    """

    __slots__ = ("_build", "_items")

    def __init__(self, build: Callable[[], tuple[RuleTrace, ...]]) -> None:
        self._build: Callable[[], tuple[RuleTrace, ...]] | None = build
        self._items: tuple[RuleTrace, ...] = ()

    def _get(self) -> tuple[RuleTrace, ...]:
        if self._build is not None:
            # Dropping the builder also lets go of the message and its parsed views.
            self._items, self._build = self._build(), None
        return self._items

    @overload
    def __getitem__(self, index: int) -> RuleTrace: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[RuleTrace, ...]: ...
    def __getitem__(self, index: int | slice) -> RuleTrace | tuple[RuleTrace, ...]:
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[RuleTrace]:
        return iter(self._get())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self._get()) == tuple(other)

    def __hash__(self) -> int:
        return hash(self._get())

    def __repr__(self) -> str:
        return f"LazyTrace({self._get()!r})"
