"""The rule commands (check, scan, test, schema) and the shipped rule files."""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from filterd.rules import json_schema, load_ruleset
from filterd.rules.commands import check, run_tests, scan, schema

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "rules"
CORPUS = ROOT / "tests" / "corpus"


def _streams() -> tuple[io.StringIO, io.StringIO]:
    return io.StringIO(), io.StringIO()


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_check_summary(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("x\n")
    _write(
        tmp_path / "a.yaml",
        """\
        lists: {l: l.txt}
        rules:
          - {name: a, if: {subject: {contains: x}}, then: {score: 1}}
          - {name: b, if: {subject: {contains: y}}, then: {score: 1}, mode: shadow}
        """,
    )
    _write(
        tmp_path / "b.yaml", "rules:\n  - {name: c, if: {sender: {in_list: l}}, then: {score: 1}}\n"
    )
    out, err = _streams()
    assert check(tmp_path, out, err) == 0
    assert out.getvalue() == f"OK: {tmp_path}: 3 rules in 2 files, 1 list (1 in shadow mode)\n"
    assert err.getvalue() == ""


def test_check_reports_every_problem_and_exits_78(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.yaml",
        """\
        rules:
          - {name: a, if: {subjct: {contains: x}}, then: {score: 1}}
          - {name: b, if: {body: {regex: '(?!x)'}}, then: {score: 1}}
        """,
    )
    out, err = _streams()
    assert check(path, out, err) == 78
    lines = err.getvalue().splitlines()
    assert lines[0].startswith(f"{path}:2:20: unknown condition 'subjct'; did you mean 'subject'?")
    assert lines[1].startswith(f"{path}:3:34: invalid regex: lookaround")
    assert lines[2] == "2 problems found; rules not loaded"
    assert out.getvalue() == ""


def test_check_passes_on_the_shipped_rules() -> None:
    out, err = _streams()
    assert check(SHIPPED, out, err) == 0, err.getvalue()
    # Said plainly: an OK for the shipped rules is not an OK for /etc/filterd/rules.
    assert out.getvalue().startswith(f"OK: {SHIPPED} (the rules shipped with filterd): ")


def test_check_names_a_relative_rules_path_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(
        tmp_path / "a.yaml",
        "rules:\n  - {name: a, if: {subject: {contains: x}}, then: {score: 1}}\n",
    )
    monkeypatch.chdir(tmp_path.parent)
    out, err = _streams()
    assert check(tmp_path.name, out, err) == 0, err.getvalue()
    assert out.getvalue() == f"OK: {tmp_path}: 1 rule in 1 file, 0 lists\n"


def test_scan_json_one_object_per_message(tmp_path: Path) -> None:
    out, err = _streams()
    files = [
        str(CORPUS / "spam-gtube.eml"),
        str(tmp_path / "missing.eml"),
        str(CORPUS / "ham-plain.eml"),
    ]
    code = scan(
        SHIPPED,
        files,
        sender="promo@spam.example",
        recipients=["bob@example.net"],
        client_ip="192.0.2.1",
        helo="mx.spam.example",
        as_json=True,
        out=out,
        err=err,
    )
    assert code == 1  # the unreadable file, and the others were still scanned
    assert "missing.eml" in err.getvalue()
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [o["file"] for o in objects] == [files[0], files[2]]
    gtube, ham = objects
    assert (gtube["action"], gtube["rules"], gtube["reply"]) == (
        "reject",
        ["gtube"],
        "554 5.7.1 Message rejected as spam (GTUBE)",
    )
    assert (ham["action"], ham["rules"], ham["score"]) == ("accept", [], 0.0)
    ruleset = load_ruleset(SHIPPED)
    assert [t["rule"] for t in ham["trace"]] == list(ruleset.rule_names)
    assert set(gtube["trace"][0]) >= {"rule", "matched", "score", "shadow", "detail"}
    matched = [t for t in gtube["trace"] if t["matched"]]
    assert [t["rule"] for t in matched] == ["gtube"]
    assert "GTUBE" in matched[0]["detail"]


def test_scan_human_output(tmp_path: Path) -> None:
    out, err = _streams()
    code = scan(
        SHIPPED,
        [str(CORPUS / "phish-link-mismatch.eml")],
        sender="x@example.org",
        recipients=["bob@example.net"],
        client_ip=None,
        helo=None,
        as_json=False,
        out=out,
        err=err,
    )
    text = out.getvalue()
    assert code == 0
    assert err.getvalue() == ""
    first = text.splitlines()[0]
    assert first.startswith(f"{CORPUS / 'phish-link-mismatch.eml'}: QUARANTINE score 13")
    assert "+ link-text-domain-mismatch" in text
    assert '"www.paypal.com"' in text
    assert "- gtube" in text


def test_scan_with_invalid_rules_exits_78(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.yaml", "rules: {}\n")
    out, err = _streams()
    assert (
        scan(
            path,
            [],
            sender="",
            recipients=[],
            client_ip=None,
            helo=None,
            as_json=True,
            out=out,
            err=err,
        )
        == 78
    )
    assert f"{path}:1:8: 'rules:' must be a list" in err.getvalue()


def test_run_tests_on_the_shipped_rules_pass() -> None:
    out, err = _streams()
    code = run_tests(SHIPPED, out, err)
    assert code == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert all(line.startswith("PASS ") for line in lines[:-1])
    assert lines[-1] == f"{len(load_ruleset(SHIPPED).tests)} passed, 0 failed"


def test_run_tests_reports_what_differed(tmp_path: Path) -> None:
    shutil.copy(CORPUS / "spam-gtube.eml", tmp_path / "gtube.eml")
    _write(
        tmp_path / "a.yaml",
        """\
        rules:
          - name: gtube
            if: {body: {contains: "GTUBE-STANDARD"}}
            then: {action: reject}
          - name: never
            if: {subject: {contains: zzz}}
            then: {score: 1}
        tests:
          - name: right
            message: gtube.eml
            expect: {action: reject, rules: [gtube]}
          - name: wrong
            message: gtube.eml
            expect:
              action: accept
              rules: [never]
              not_rules: [gtube]
              score_at_least: 2
              tag: true
          - name: unreadable
            message: nowhere.eml
            expect: {action: accept}
        """,
    )
    out, err = _streams()
    assert run_tests(tmp_path, out, err) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "PASS right"
    assert lines[1].startswith("FAIL wrong (")
    for part in (
        "action: expected accept, got reject",
        "expected to match but did not: never",
        "expected not to match but did: gtube",
        "score: expected at least 2, got 0",
        "tag: expected true, got false",
    ):
        assert part in lines[1]
    assert lines[2].startswith("FAIL unreadable (")
    assert "cannot read message" in lines[2]
    assert lines[3] == "1 passed, 2 failed"


def test_run_tests_without_cases(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "rules: []\n")
    out, err = _streams()
    assert run_tests(tmp_path, out, err) == 0
    assert "no test cases" in out.getvalue()


def test_schema_command_prints_the_schema() -> None:
    out = io.StringIO()
    assert schema(out) == 0
    assert json.loads(out.getvalue()) == json_schema()


def test_shipped_schema_file_is_current() -> None:
    """rules/rules.schema.json is what `filterd schema` prints (regenerate it when this fails)."""
    assert json.loads((SHIPPED / "rules.schema.json").read_text()) == json_schema()


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_rule_files_carry_the_schema_comment_and_validate(path: Path) -> None:
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=rules.schema.json"
    validator = jsonschema.Draft7Validator(json_schema())
    assert [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))] == []


def test_schema_rejects_what_check_rejects() -> None:
    validator = jsonschema.Draft7Validator(json_schema())
    bad = {
        "rules": [
            {"name": "Bad Name", "if": {"subjct": {"contains": "x"}}, "then": {"action": "rejct"}}
        ],
        "scorez": {},
    }
    messages = " | ".join(e.message for e in validator.iter_errors(bad))
    assert "'scorez' was unexpected" in messages
    assert "does not match" in messages  # the rule name pattern
    two_kinds = {
        "rules": [
            {"name": "a", "if": {"subject": {"contains": "x", "regex": "y"}}, "then": {"score": 1}}
        ]
    }
    assert list(validator.iter_errors(two_kinds))
