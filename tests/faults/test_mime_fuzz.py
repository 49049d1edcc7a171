"""Fuzzing the content path in-process: MIME trees (nesting, message/rfc822, encodings,
charsets, broken boundaries, forged X-Spam-* headers) and mutated corpus messages, through the
real parser, the shipped rules and the tag rewrite that the daemon applies before relaying.

tests/unit/test_mime_fuzz.py covers ParsedMessage on its own; here the whole decision chain runs,
with the properties that matter on the wire: nothing raises or stalls, a tagged message carries
only filterd's X-Spam-* verdict (a sender cannot forge one), and the rewrite leaves the body as
it was.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from email import message_from_bytes
from email.policy import compat32

import pytest
from hypothesis import HealthCheck, example, given, settings

from filterd import actions, mime, rules
from filterd.model import Action, Envelope, Message, Verdict
from filterd.rules import RuleSet
from tests.faults.figures import count
from tests.faults.strategies import ANY_MESSAGE, corpus_bytes
from tests.support.daemon import REPO

STALL_BOUND = 10.0  # seconds: far above any real message, far below a session timeout
CASES: Counter[str] = Counter()
# more with FILTERD_FUZZ_EXAMPLES=N (the long run uses thousands)
EXAMPLES = int(os.environ.get("FILTERD_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
TAG = Verdict(
    action=Action.TAG,
    score=7.5,
    rules=("fuzz-a", "fuzz-b"),
    tag=True,
    required_score=5.0,
    subject_prefix="[SPAM] ",
    add_headers=(("X-Fuzz", "1"),),
)


@pytest.fixture(scope="module")
def shipped() -> Iterator[RuleSet]:
    # Shipped rules that do not load fail every test here: the daemon would not start either.
    yield rules.load_ruleset(REPO / "rules")
    count("mime fuzz (in process)", CASES)


def _touch(parsed: object) -> None:
    for view in (
        "headers",
        "subject",
        "message_id",
        "body_text",
        "urls",
        "attachments",
        "truncated",
    ):
        getattr(parsed, view)
    for header in ("From", "To", "Reply-To"):
        parsed.addresses(header)  # type: ignore[attr-defined]


def _spam_headers_of(raw: bytes) -> dict[str, list[str]]:
    """X-Spam-* fields as Python's email parser (what many downstream tools use) sees them.

    That parser also ends a line at a bare CR, which filterd passes on as it is; a forgery
    hidden behind one is a finding of its own, with a deterministic test in
    test_client_faults.py, so it is neutralised here to keep this property about the rest.
    """
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b" ")
    parsed = message_from_bytes(raw, policy=compat32)
    found: dict[str, list[str]] = {}
    for name, value in parsed.items():
        if name.strip().lower().startswith("x-spam-"):
            found.setdefault(name.strip().lower(), []).append(" ".join(str(value).split()))
    return found


@FUZZ
@example(raw=b"X-Spam-Flag : NO\r\nSubject: forged\r\n\r\nbody\r\n")
@example(raw=b"Subject: x\r\nX-Spam-Status:\r\n No, score=-5\r\n\r\nbody\r\n")
@given(raw=ANY_MESSAGE)
def test_any_message_is_parsed_decided_and_tagged_without_raising_or_stalling(
    shipped: RuleSet, raw: bytes
) -> None:
    CASES["messages"] += 1
    started = time.monotonic()
    parsed = mime.ParsedMessage(raw)
    _touch(parsed)
    message = Message(
        Envelope("sender@example.org", ("rcpt@example.net",), "192.0.2.7", None, "mx.test"), raw
    )
    verdict = rules.evaluate(shipped, message)
    assert isinstance(verdict.action, Action)
    CASES[f"verdict_{verdict.action.value}"] += 1
    tagged = actions.rewrite(message, TAG)
    elapsed = time.monotonic() - started
    assert elapsed < STALL_BOUND, f"one message took {elapsed:.1f}s to parse, decide and tag"

    # the body is untouched by the header edits
    assert tagged.endswith(parsed.body_bytes), "the tag rewrite changed the body"
    # only filterd's verdict is in the X-Spam-* fields, however the sender spelled a forgery
    spam = _spam_headers_of(tagged)
    assert spam.get("x-spam-flag") == ["YES"], f"X-Spam-Flag after tagging: {spam}"
    assert len(spam.get("x-spam-status", [])) == 1, f"X-Spam-Status after tagging: {spam}"
    assert spam["x-spam-status"][0].startswith("Yes, score=7.5")
    assert mime.ParsedMessage(tagged).header_values("X-Spam-Flag") == ["YES"]
    # and on a plain delivery no incoming verdict survives at all
    plain = actions.rewrite(message, Verdict())
    assert _spam_headers_of(plain) == {}, f"forged X-Spam-* survived: {_spam_headers_of(plain)}"
    assert plain.endswith(parsed.body_bytes)


def test_the_corpus_seeds_are_decided(shipped: RuleSet) -> None:
    for raw in corpus_bytes():
        message = Message(Envelope("sender@example.org", ("rcpt@example.net",), "192.0.2.7"), raw)
        assert isinstance(rules.evaluate(shipped, message).action, Action)
