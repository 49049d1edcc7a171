"""Robustness: no message content can make the pipeline raise, and no regex can stall it."""

from __future__ import annotations

import textwrap
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterd.model import Action, Envelope, Message
from filterd.rules import RuleSet, evaluate, load_ruleset
from tests.support.blowup import run_to_completion

SHIPPED = Path(__file__).resolve().parents[2] / "rules"
_SHIPPED_SET = load_ruleset(SHIPPED)

# A rule set touching every field, so random input reaches every extractor and matcher.
_EVERY_FIELD = textwrap.dedent("""\
    scores: {tag: 1, quarantine: 2, reject: 3}
    rules:
      - {name: f1, if: {from: {name: {regex: '.'}, domain: {glob: '*'}}}, then: {score: 0.1}}
      - {name: f2, if: {to: {name_domain_mismatch: true}}, then: {score: 0.1}}
      - {name: f3, if: {header: {name: Received, regex: 'from'}}, then: {score: 0.1}}
      - {name: f4, if: {body: {regex: '(?i)\\bfree\\b'}}, then: {score: 0.1}}
      - {name: f5, if: {raw: {contains: 'MIME'}}, then: {score: 0.1}}
      - {name: f6, if: {url: {text_domain_mismatch: true}}, then: {score: 0.1}}
      - name: f7
        if: {url: {domain: {in: [example.com]}, link_text: {regex: '.'}}}
        then: {score: 0.1}
      - name: f8
        if: {attachment: {filename: {glob: '*.*'}, detected_type: {contains: '/'}}}
        then: {score: 0.1}
      - name: f9
        if: {attachment: {archive: {filename: {regex: '.'}, size: {gt: 0}}}}
        then: {score: 0.1}
      - {name: f10, if: {not: {header: {name: Date, exists: true}}}, then: {score: 0.1}}
      - {name: f11, if: {any: [{subject: {equals: ''}}, {size: {lt: 10}}]}, then: {score: 0.1}}
      - name: f12
        if: {helo: {in: ['.example.org']}, client_ip: {in: ['0.0.0.0/0', '::/0']}}
        then: {action: tag}
    """)

_fragments = st.sampled_from(
    [
        b"From: ",
        b"To: ",
        b"Subject: ",
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"Content-Type: text/html\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Content-Disposition: attachment; filename*=",
        b"--b\r\n",
        b"--b--\r\n",
        b"\r\n",
        b"\n",
        b"=?utf-8?b?",
        b"?=",
        b'<a href="http://',
        b'">',
        b"</a>",
        b"PK\x03\x04",
        b"PK\x05\x06",
        b"MZ",
        b"=E2=80",
        b"\x00",
        b"\xff\xfe",
        b"@",
        b"<>",
        b'"',
        b"(",
        b")",
        b";",
        b":",
        b",",
        b"www.example.com",
        b"\t",
        b" ",
    ]
)
_messages = st.one_of(
    st.binary(max_size=4096),
    st.lists(st.one_of(_fragments, st.binary(max_size=40)), max_size=120).map(b"".join),
)


def _every_field(tmp: Path) -> RuleSet:
    path = tmp / "every.yaml"
    if not path.exists():
        path.write_text(_EVERY_FIELD)
    return load_ruleset(path)


@settings(max_examples=300, deadline=None)
@given(
    raw=_messages,
    sender=st.sampled_from(["", "a@example.org", "@", "x"]),
    client_ip=st.sampled_from([None, "192.0.2.1", "garbage", "IPv6:::1"]),
)
def test_random_bytes_never_raise_with_the_shipped_rules(
    raw: bytes, sender: str, client_ip: str | None
) -> None:
    verdict = evaluate(_SHIPPED_SET, Message(Envelope(sender, ("b@example.org",), client_ip), raw))
    assert isinstance(verdict.action, Action)
    assert len(verdict.trace) == len(_SHIPPED_SET.rules)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=_messages, helo=st.sampled_from([None, "", "mx.example.org", "\x00"]))
def test_random_bytes_never_raise_on_any_field(
    tmp_path: Path, raw: bytes, helo: str | None
) -> None:
    ruleset = _every_field(tmp_path)
    envelope = Envelope("a@example.org", ("b@example.org",), "192.0.2.1", None, helo)
    verdict = evaluate(ruleset, Message(envelope, raw))
    assert verdict.score >= 0
    assert len(verdict.trace) == 12
    assert set(verdict.rules) <= set(ruleset.rule_names)


def test_catastrophic_regex_runs_in_linear_time(tmp_path: Path) -> None:
    """(a+)+$ takes exponential time on a backtracking engine; RE2 answers at once."""
    (tmp_path / "redos.yaml").write_text(
        textwrap.dedent("""\
        rules:
          - {name: redos, if: {body: {regex: '(a+)+$', case: sensitive}}, then: {score: 1}}
          - {name: redos-raw, if: {raw: {regex: '^(a|aa)+$'}}, then: {score: 1}}
          - {name: redos-subject, if: {subject: {regex: '(x+x+)+y'}}, then: {score: 1}}
        """)
    )
    ruleset = load_ruleset(tmp_path / "redos.yaml")
    # A backtracking engine would not finish this in the age of the universe; RE2 takes
    # milliseconds. Run in a child process given minutes (see tests/support/blowup.py).
    printed = run_to_completion(
        "import sys\n"
        "from filterd.model import Envelope, Message\n"
        "from filterd.rules import evaluate, load_ruleset\n"
        "attack = 'a' * 50_000 + '!'\n"
        "raw = f\"Subject: {'x' * 5000}\\r\\n\\r\\n{attack}\\r\\n\".encode()\n"
        "envelope = Envelope('a@example.org', ('b@example.org',))\n"
        "print(evaluate(load_ruleset(sys.argv[1]), Message(envelope, raw)).rules)",
        str(tmp_path / "redos.yaml"),
    )
    assert printed.strip() == "()"
    matching = evaluate(
        ruleset,
        Message(
            Envelope("a@example.org", ("b@example.org",)),
            b"Subject: s\r\n\r\n" + b"a" * 50_000 + b"\r\n",
        ),
    )
    assert matching.rules == ("redos",)
