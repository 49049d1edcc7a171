"""Loading and validation of rule files: every problem located, all of them at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from filterd.errors import ConfigError
from filterd.model import Action, SmtpReply
from filterd.rules import load_ruleset


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_ruleset(path)
    return [str(problem) for problem in caught.value.problems]


def _rule_file(*names: str) -> str:
    """A rules: section with one trivial rule per name."""
    return "rules:\n" + "".join(
        f"  - {{name: {name}, if: {{subject: {{contains: x}}}}, then: {{score: 1}}}}\n"
        for name in names
    )


def _one_rule(tmp_path: Path, body: str) -> tuple[Path, list[str]]:
    """Problems of a file holding one rule named ``r`` whose other keys are ``body``."""
    (tmp_path / "lists").mkdir(exist_ok=True)
    (tmp_path / "lists" / "known.txt").write_text("a@example.org\n")
    path = tmp_path / "rules.yaml"
    path.write_text(
        "lists:\n  known: lists/known.txt\nrules:\n  - name: r\n"
        + textwrap.indent(body, "    ")
        + "\n"
    )
    return path, _problems(path)


def _position(path: Path, token: str) -> tuple[int, int]:
    """1-based line and column of the first ``token`` after the rule's name line."""
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines[4:], start=5):
        if token in line:
            return number, line.index(token) + 1
    raise AssertionError(f"{token!r} not in {path}")


X = "if: {subject: {contains: x}}\n"


@pytest.mark.parametrize(
    ("body", "token", "expected"),
    [
        (
            "if: {subjct: {contains: x}}\nthen: {score: 1}",
            "subjct",
            "unknown condition 'subjct'; did you mean 'subject'?",
        ),
        (
            "iff: {subject: {contains: x}}\nthen: {score: 1}",
            "iff",
            "unknown key 'iff' in a rule; did you mean 'if'?",
        ),
        (
            "if: {subject: {contans: x}}\nthen: {score: 1}",
            "contans",
            "unknown key 'contans' in subject matcher; did you mean 'contains'?",
        ),
        (X + "then: {acton: reject}", "acton", "did you mean 'action'?"),
        (X + "then: {action: rejct}", "rejct", "unknown action 'rejct'"),
        (X + "then: {score: high}", "high", "score must be a number, got a string"),
        (X + "then: {stop: 1}", "1}", "stop must be true or false"),
        ("if: {subject: [contains, x]}\nthen: {score: 1}", "[", "must be a mapping, got a list"),
        (
            "if: {subject: hello}\nthen: {score: 1}",
            "hello",
            "expected a matcher such as {contains:",
        ),
        (
            "if: {subject: {regex: '(?=x)'}}\nthen: {score: 1}",
            "'(?=x)'",
            "lookaround is not supported",
        ),
        (
            "if: {subject: {regex: '(a)\\1'}}\nthen: {score: 1}",
            "'(a)",
            "backreferences are not supported",
        ),
        (
            "if: {subject: {regex: '(unclosed'}}\nthen: {score: 1}",
            "'(unclosed'",
            "invalid regex: missing )",
        ),
        ("if: {subject: {regex: ['ok', 'x\\Z']}}\nthen: {score: 1}", "'x", "use \\z"),
        (
            "if: {sender: {in_list: knwon}}\nthen: {score: 1}",
            "knwon",
            "unknown list 'knwon'; did you mean 'known'?",
        ),
        (
            "if: {client_ip: {in: [10.0.0.0/33]}}\nthen: {score: 1}",
            "10.0.0.0/33",
            "bad CIDR '10.0.0.0/33'",
        ),
        ("if: {size: {gt: 10X}}\nthen: {score: 1}", "10X", "bad size '10X'"),
        ("if: {size: {gt: -1}}\nthen: {score: 1}", "-1", "must not be negative"),
        ("if: {subject: {contains: x, regex: y}}\nthen: {score: 1}", "{contains", "exactly one of"),
        ("if: {subject: {contains: x, case: upper}}\nthen: {score: 1}", "upper", "case must be"),
        ("if: {any: []}\nthen: {score: 1}", "[]", "'any:' needs at least one condition"),
        ("if: {}\nthen: {score: 1}", "{}", "empty condition"),
        ("if: {sender: {name: {equals: x}}}\nthen: {score: 1}", "name", "no display name"),
        ("if: {header: {contains: x}}\nthen: {score: 1}", "{contains", "'header:' needs a name"),
        (
            "if: {header: {name: 'Bad Name', exists: true}}\nthen: {score: 1}",
            "'Bad Name'",
            "not a valid header name",
        ),
        (
            "if: {header: {name: X, exists: true, contains: y}}\nthen: {score: 1}",
            "exists",
            "either exists or a matcher",
        ),
        ("if: {url: {text_domain_mismatch: false}}\nthen: {score: 1}", "false", "only takes true"),
        ("if: {mime_truncated: false}\nthen: {score: 1}", "false", "wrap the condition in not:"),
        ("if: {mime_truncated: part}\nthen: {score: 1}", "part", "did you mean 'parts'?"),
        ("if: {mime_truncated: 500}\nthen: {score: 1}", "500", "takes true (either limit)"),
        (
            "if: {attachment: {archive: {name: {glob: x}}}}\nthen: {score: 1}",
            "name",
            "did you mean 'filename'?",
        ),
        (
            X + "then: {action: reject, reply: '451 4.7.1 later'}",
            "'451",
            "reply for reject must be '5xx 5.x.y text'",
        ),
        (
            X + "then: {action: tempfail, reply: '451 later'}",
            "'451",
            "reply for tempfail must be '4xx 4.x.y text'",
        ),
        (
            X + "then: {action: tag, reply: '554 5.7.1 no'}",
            "'554",
            "reply: only applies to action reject or tempfail",
        ),
        (
            X + "then: {action: reject, redirect: [a@example.org]}",
            "redirect",
            "cannot go with action reject",
        ),
        (X + "then: {action: redirect}", "redirect", "action redirect needs redirect:"),
        (X + "then: {bcc: [not-an-address]}", "not-an-address", "is not an email address"),
        (X + "then: {add_header: {'X Bad': v}}", "'X Bad'", "not a valid header name"),
        (X + "then: {}", "{}", "'then:' needs an action"),
        (X + "then: {score: 1}\nmode: dry", "dry", "mode must be 'enforce' or 'shadow'"),
    ],
)
def test_located_problem(tmp_path: Path, body: str, token: str, expected: str) -> None:
    path, problems = _one_rule(tmp_path, body)
    line, col = _position(path, token)
    wanted = f"{path}:{line}:{col}: "
    assert any(p.startswith(wanted) and expected in p for p in problems), (wanted, problems)


def test_missing_if_is_reported_at_the_rule(tmp_path: Path) -> None:
    path, problems = _one_rule(tmp_path, "then: {score: 1}")
    assert any(p.startswith(f"{path}:4:5: ") and "needs 'if:'" in p for p in problems), problems


def test_every_problem_of_a_file_at_once(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "rules.yaml",
        """\
        rules:
          - name: Bad Name
            if: {subject: {contains: x}}
            then: {score: 1}
          - name: ok
            if: {body: {regex: '(?<=x)y'}}
            then: {score: 1}
          - name: ok
            if: {sender: {in_list: nowhere}}
            then: {action: reject}
          - name: fine
            if: {subjet: {contains: x}}
            then: {score: 1}
        """,
    )
    problems = _problems(path)
    assert [p.split(": ", 1)[0] for p in problems] == [
        f"{path}:2:11",
        f"{path}:6:24",
        f"{path}:8:11",
        f"{path}:9:28",
        f"{path}:12:10",
    ]
    assert "bad rule name 'Bad Name'" in problems[0]
    assert "duplicate rule name 'ok' (first defined at" in problems[2]


def test_duplicate_yaml_key_is_located(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "rules.yaml",
        """\
        rules:
          - name: a
            if: {subject: {contains: x}}
            then: {score: 1}
            then: {score: 2}
        """,
    )
    problems = _problems(path)
    assert problems == [f"{path}:5:5: duplicate key 'then' (first defined at line 4)"]


def test_yaml_syntax_error_is_located(tmp_path: Path) -> None:
    path = _write(tmp_path / "rules.yaml", "rules:\n  - name: a\n    if: {subject: [\n")
    problems = _problems(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:")
    assert "invalid YAML" in problems[0]


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "rules.yaml", "rules: !!python/name:os.system\n")
    assert "invalid YAML" in _problems(path)[0]


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    # Seven lines that would expand to 10**7 values: refused within the value budget.
    lines = ['x0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"x{n}: &a{n} [{','.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 7)]
    path = _write(tmp_path / "rules.yaml", "rules: []\n" + "\n".join(lines) + "\n")
    [problem] = _problems(path)
    assert problem.startswith(f"{path}:")
    assert "values once aliases are expanded" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules: &r [*r]\n", ":1:8: an alias that refers to itself"),
        ("rules: []\ndescription: 2024-02-30\n", ":2:14: invalid value: day is out of range"),
        ("rules: []\nx: !!int abc\n", ":2:4: invalid value:"),
        ("rules: []\nx: " + "9" * 5000 + "\n", ":2:4: invalid value:"),
        (
            "rules:\n  - {name: a, if: {subject: {contains: x}}, then: {score: 1"
            + "0" * 400
            + "}}\n",
            "score must be a finite number",
        ),
        (
            "rules:\n  - {name: a, if: {size: {gt: '1" + "0" * 400 + "K'}}, then: {score: 1}}\n",
            "is too large",
        ),
    ],
    ids=[
        "recursive-alias",
        "impossible-date",
        "bad-int-tag",
        "huge-int",
        "huge-score",
        "huge-size",
    ],
)
def test_yaml_that_parses_but_cannot_be_built_is_located(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = _write(tmp_path / "rules.yaml", text)
    [problem] = _problems(path)
    assert problem.startswith(str(path))
    assert expected in problem


@pytest.mark.parametrize(
    "then",
    [
        '{bcc: ["archive@example.org\\n"]}',
        '{redirect: ["a@example.org\\n"]}',
        '{add_header: {"X-A\\n": v}}',
        '{action: reject, reply: "550 5.7.1 no\\n"}',
    ],
)
def test_a_trailing_newline_is_not_part_of_a_valid_name_or_address(
    tmp_path: Path, then: str
) -> None:
    # Python's "$" also matches before a final newline: an address with one went into RCPT TO.
    path = _write(
        tmp_path / "rules.yaml",
        f"rules:\n  - {{name: a, if: {{subject: {{contains: x}}}}, then: {then}}}\n",
    )
    assert len(_problems(path)) == 1


def test_directory_loads_yaml_files_in_name_order(tmp_path: Path) -> None:
    _write(tmp_path / "20-second.yaml", _rule_file("b"))
    _write(tmp_path / "10-first.yaml", _rule_file("a"))
    _write(tmp_path / "notes.txt", "not yaml at all: [")
    _write(tmp_path / ".hidden.yaml", "nonsense: [")
    ruleset = load_ruleset(tmp_path)
    assert ruleset.rule_names == ("a", "b")
    assert [Path(s).name for s in ruleset.sources] == ["10-first.yaml", "20-second.yaml"]


def test_problems_across_files_and_duplicate_names_across_files(tmp_path: Path) -> None:
    first = _write(tmp_path / "10-a.yaml", _rule_file("same"))
    second = _write(tmp_path / "20-b.yaml", _rule_file("same") + "scorez: {}\n")
    problems = _problems(tmp_path)
    assert problems[0].startswith(
        f"{second}:2:12: duplicate rule name 'same' (first defined at {first}:2:12)"
    )
    assert problems[1].startswith(
        f"{second}:3:1: unknown key 'scorez' in a rule file; did you mean 'scores'?"
    )


def test_empty_directory_and_missing_path(tmp_path: Path) -> None:
    assert "no rule files" in _problems(tmp_path)[0]
    assert "does not exist" in _problems(tmp_path / "nope.yaml")[0]


def test_lists_load_relative_to_their_rule_file(tmp_path: Path) -> None:
    (tmp_path / "conf" / "lists").mkdir(parents=True)
    (tmp_path / "conf" / "lists" / "bad.txt").write_text(
        "# header\n\nspam.example\n  evil.example  # trailing comment\n"
    )
    _write(
        tmp_path / "conf" / "rules.yaml",
        """\
        lists: {bad: lists/bad.txt}
        rules:
          - {name: a, if: {sender: {in_list: bad}}, then: {action: reject}}
        """,
    )
    ruleset = load_ruleset(tmp_path / "conf" / "rules.yaml")
    assert ruleset.lists == ("bad",)


def test_missing_list_file_and_bad_cidr_entry_are_located(tmp_path: Path) -> None:
    (tmp_path / "nets.txt").write_text("10.0.0.0/8\n\n  300.1.2.3\n")
    path = _write(
        tmp_path / "rules.yaml",
        """\
        lists: {nets: nets.txt, gone: gone.txt}
        rules:
          - {name: a, if: {client_ip: {in_list: nets}}, then: {action: accept}}
        """,
    )
    problems = _problems(path)
    assert any(p.startswith(f"{path}:1:31: list 'gone': cannot read") for p in problems), problems
    wanted = f"{tmp_path / 'nets.txt'}:3:3: list 'nets': not an IP address or CIDR: '300.1.2.3'"
    assert any(p.startswith(wanted) for p in problems), problems


def test_thresholds_and_tag_settings(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "rules.yaml",
        """\
        scores: {tag: 4, quarantine: 8.5}
        tag: {subject_prefix: "[SPAM] "}
        rules: []
        """,
    )
    ruleset = load_ruleset(path)
    thresholds = ruleset.thresholds
    assert (thresholds.tag, thresholds.quarantine, thresholds.reject) == (4.0, 8.5, None)
    assert ruleset.tag_subject_prefix == "[SPAM] "


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ("{tag: 10, quarantine: 5}", "scores quarantine (5) must be above tag (10)"),
        ("{tag: five}", "scores tag must be a number"),
        ("{tags: 5}", "did you mean 'tag'?"),
    ],
)
def test_bad_thresholds(tmp_path: Path, scores: str, expected: str) -> None:
    path = _write(tmp_path / "rules.yaml", f"scores: {scores}\nrules: []\n")
    assert any(expected in p for p in _problems(path))


def test_thresholds_may_be_set_once_across_files(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "scores: {tag: 5}\n")
    second = _write(tmp_path / "b.yaml", "scores: {tag: 6}\n")
    assert _problems(tmp_path)[0].startswith(f"{second}:1:10: scores tag is already set at")


def test_rule_fields_are_compiled(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "rules.yaml",
        """\
        rules:
          - name: full
            description: everything
            mode: shadow
            if: {subject: {contains: x}}
            then:
              action: reject
              reply: "550 5.7.1 Go away"
              reason: testing
              score: 2.5
              stop: true
              bcc: [audit@example.org]
              add_header: {X-Checked: "yes"}
              remove_header: X-Old
              subject_prefix: "[X] "
        """,
    )
    rule = load_ruleset(path).rules[0]
    assert rule.action is Action.REJECT
    assert rule.reply == SmtpReply(550, "5.7.1", "Go away")
    assert (rule.reason, rule.score, rule.stop, rule.shadow) == ("testing", 2.5, True, True)
    assert rule.bcc == ("audit@example.org",)
    assert rule.add_headers == (("X-Checked", "yes"),)
    assert rule.remove_headers == ("X-Old",)
    assert rule.subject_prefix == "[X] "


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("{raw: 'Subject: x', expect: {action: rejct}}", "unknown action 'rejct'"),
        ("{raw: 'Subject: x', expect: {rules: [nope]}}", "unknown rule 'nope'"),
        ("{expect: {action: accept}}", "exactly one of message: (a file) or raw: (text)"),
        ("{raw: 'Subject: x'}", "a test case needs expect:"),
        ("{raw: 'Subject: x', expect: {}}", "expect: needs at least one of"),
        (
            "{raw: 'Subject: x', expect: {action: accept, score_atleast: 1}}",
            "did you mean 'score_at_least'?",
        ),
    ],
)
def test_bad_test_cases(tmp_path: Path, case: str, expected: str) -> None:
    path = _write(tmp_path / "rules.yaml", _rule_file("a") + f"tests:\n  - {case}\n")
    problems = _problems(path)
    assert any(expected in p and p.startswith(f"{path}:4:") for p in problems), problems


def test_test_case_defaults_and_paths(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "rules.yaml",
        """\
        rules: []
        tests:
          - message: mails/one.eml
            expect: {action: accept}
          - name: inline
            raw: "Subject: x\\n\\nbody\\n"
            sender: ""
            recipients: [a@example.org, b@example.org]
            client_ip: 192.0.2.1
            helo: mx.example.org
            expect: {action: accept, tag: false}
        """,
    )
    first, second = load_ruleset(path).tests
    assert first.message_path == str(tmp_path / "mails" / "one.eml")
    assert first.raw is None
    assert first.name == "rules.yaml:3 (one.eml)"
    assert first.envelope.sender == "sender@example.test"
    assert second.raw == b"Subject: x\r\n\r\nbody\r\n"
    assert second.envelope.sender == ""
    assert second.envelope.recipients == ("a@example.org", "b@example.org")
    assert (second.envelope.client_ip, second.envelope.helo) == ("192.0.2.1", "mx.example.org")


def test_reload_builds_independent_objects(tmp_path: Path) -> None:
    path = _write(tmp_path / "rules.yaml", _rule_file("a"))
    first = load_ruleset(path)
    _write(path, "rules:\n  - {name: b, if: {subject: {contains: y}}, then: {score: 1}}\n")
    second = load_ruleset(path)
    assert first.rule_names == ("a",)
    assert second.rule_names == ("b",)
    assert first.scanners is not second.scanners
