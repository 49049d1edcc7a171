"""Header edits: byte-identity, folding, RFC 2047, line endings, injection, X-Spam-* format."""

from __future__ import annotations

import email
import email.policy
import re
from email.header import decode_header, make_header
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.actions.tag import (
    add_headers,
    apply_modifications,
    fold_header,
    prefix_subject,
    remove_headers,
    spam_headers,
)

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.eml"))


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """Header block and body (separator included in the body) for well-formed test messages."""
    match = re.search(rb"\r?\n\r?\n", raw)
    assert match is not None
    return raw[: match.start() + 1 + (raw[match.start()] == 13)], raw[match.start() :]


def _decoded(raw: bytes, name: str) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return [str(v) for v in msg.get_all(name, [])]


def _unfold(text: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", text)


def _lines(raw: bytes) -> list[bytes]:
    return raw.splitlines()


def _fields(head: bytes) -> list[bytes]:
    """The header fields of ``head``, each with its continuation lines."""
    fields: list[bytes] = []
    for line in _lines(head):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += b"\n" + line
        elif line:
            fields.append(line)
    return fields


def _message(eol: bytes, body: bytes = b"Hello.\nX-Spam-Flag: YES\n") -> bytes:
    headers = [
        b"Received: from a.example by b.example;",
        b"\tMon, 30 Nov 2026 09:00:00 +0000",
        b"X-Spam-Flag: YES",
        b"From: Alice <alice@example.org>",
        b"x-spam-status: Yes, score=99.0",
        b" required=5.0 tests=FORGED",
        b"Subject: hello",
        b"X-SPAM-Level: ******",
        b"To: bob@example.net",
    ]
    return eol.join(headers) + eol + eol + body.replace(b"\n", eol)


EOLS = [pytest.param(b"\r\n", id="crlf"), pytest.param(b"\n", id="lf")]


# --- remove_headers -------------------------------------------------------------------------


@pytest.mark.parametrize("eol", EOLS)
def test_remove_prefix_strips_every_spam_field_with_its_continuations(eol: bytes) -> None:
    raw = _message(eol)
    out = remove_headers(raw, [], prefixes=("X-Spam-",))
    head, body = _split(out)
    assert b"spam" not in head.lower()
    assert body == _split(raw)[1]  # the body still says X-Spam-Flag: YES, untouched
    expected = [
        b"Received: from a.example by b.example;",
        b"\tMon, 30 Nov 2026 09:00:00 +0000",
        b"From: Alice <alice@example.org>",
        b"Subject: hello",
        b"To: bob@example.net",
    ]
    assert head == eol.join(expected) + eol


@pytest.mark.parametrize("eol", EOLS)
@pytest.mark.parametrize("name", ["received", "RECEIVED", "Received"])
def test_remove_by_name_is_case_insensitive_and_takes_continuations(eol: bytes, name: str) -> None:
    raw = _message(eol)
    out = remove_headers(raw, [name])
    assert b"Received" not in out
    assert b"Mon, 30 Nov 2026" not in out
    assert out == raw[raw.index(b"X-Spam-Flag") :]


@pytest.mark.parametrize("eol", EOLS)
def test_remove_nothing_returns_identical_bytes(eol: bytes) -> None:
    raw = _message(eol)
    assert remove_headers(raw, ["X-Not-There"]) == raw
    assert remove_headers(raw, []) == raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # no separator, no final line ending
        (b"Subject: x\r\nX-Spam-Flag: YES", b"Subject: x\r\n"),
        # no separator: the first non-field line starts the body
        (
            b"Subject: x\r\nHello there\r\nX-Spam-Flag: YES\r\n",
            b"Subject: x\r\nHello there\r\nX-Spam-Flag: YES\r\n",
        ),
        (b"X-Spam-Flag: YES\nSubject: x\nbody line\n", b"Subject: x\nbody line\n"),
        # empty message and header-only message
        (b"", b""),
        (b"X-Spam-Score: 9\r\n", b""),
        # mbox From_ line is kept, the field after it goes
        (b"From alice Mon Nov 30\nX-Spam-Flag: YES\n\nbody\n", b"From alice Mon Nov 30\n\nbody\n"),
        # blank before the colon (obsolete syntax) is still the same field
        (b"X-Spam-Flag : YES\r\nA: b\r\n\r\n", b"A: b\r\n\r\n"),
        # a body that looks like headers after the separator is never touched
        (b"A: b\r\n\r\nX-Spam-Flag: YES\r\n", b"A: b\r\n\r\nX-Spam-Flag: YES\r\n"),
    ],
)
def test_remove_on_odd_shapes(raw: bytes, expected: bytes) -> None:
    assert remove_headers(raw, [], prefixes=("x-spam-",)) == expected


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus_body_is_byte_identical_after_all_edits(path: Path) -> None:
    raw = path.read_bytes()
    head, body = _split(raw)
    out = apply_modifications(
        raw,
        remove=["Received", "Date"],
        add=[*spam_headers(12.3, 5.0, ["rule-a", "rule-b"], True), ("X-Filterd", "checked")],
        subject_prefix="[SPAM] ",
    )
    assert out.endswith(body)
    new_head = out[: len(out) - len(body)]
    edited = (b"x-spam-", b"x-filterd", b"subject:")  # fields filterd adds or changes
    kept = [field for field in _fields(new_head) if not field.lower().startswith(edited)]
    # every untouched field is still there, whole and in order; Received and Date went away
    expected = [
        field
        for field in _fields(head)
        if not field.lower().startswith((*edited, b"received:", b"date:"))
    ]
    assert kept == expected
    assert _decoded(out, "X-Spam-Flag") == ["YES"]
    assert _decoded(out, "Subject")[0].startswith("[SPAM] ")
    eol = b"\r\n" if b"\r\n" in raw else b"\n"
    assert out.count(eol) == out.count(b"\n")  # no mixed line endings introduced


def test_remove_prefix_reads_past_a_field_without_a_name() -> None:
    # Python's email parser skips ": x" and reads on: a forged field after it must go too.
    raw = b"From: a@x\r\n: x\r\nX-Spam-Flag: NO\r\nSubject: s\r\n\r\nbody\r\n"
    out = remove_headers(raw, [], prefixes=("X-Spam-",))
    assert out == b"From: a@x\r\n: x\r\nSubject: s\r\n\r\nbody\r\n"
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["X-Spam-Flag"] is None
    assert msg["Subject"] == "s"


# --- add_headers and folding ----------------------------------------------------------------


@pytest.mark.parametrize("eol", EOLS)
def test_add_prepends_in_order_with_the_message_line_ending(eol: bytes) -> None:
    raw = _message(eol)
    out = add_headers(raw, [("X-One", "1"), ("X-Two", "2")])
    assert out == b"X-One: 1" + eol + b"X-Two: 2" + eol + raw


def test_add_keeps_leading_stray_continuations_out_of_the_added_fields() -> None:
    # A message that starts with a blank-led line: prepended fields would take it as their
    # continuation (our X-Spam-Status would read "Yes, score=9 stray").
    out = add_headers(b" stray\r\nSubject: s\r\n\r\nbody\r\n", [("X-Spam-Status", "Yes")])
    assert out == b" stray\r\nX-Spam-Status: Yes\r\nSubject: s\r\n\r\nbody\r\n"
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["X-Spam-Status"] == "Yes"


def test_add_to_message_without_line_ending_uses_crlf() -> None:
    assert add_headers(b"", [("X-A", "b")]) == b"X-A: b\r\n"


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
@pytest.mark.parametrize(
    "value",
    [
        "short",
        "word " * 40 + "end",
        "a-very-long-token-" * 3 + " then  two  spaces  and   three   " * 5,
        "tab\tseparated\tvalue " * 10,
    ],
)
def test_ascii_values_fold_at_78_and_unfold_to_the_value(eol: str, value: str) -> None:
    folded = fold_header("X-Long-Header", value, eol).decode("ascii")
    assert folded.endswith(eol)
    lines = folded[: -len(eol)].split(eol)
    # one line when it fits; folded at a blank into lines of at most 78 characters otherwise
    assert (len(lines) == 1) == (len("X-Long-Header: " + value.strip()) <= 78)
    assert all(len(line) <= 78 for line in lines)
    assert all(line[:1] in (" ", "\t") for line in lines[1:])
    assert _unfold(folded[: -len(eol)]) == "X-Long-Header: " + value.strip()


def test_word_longer_than_a_line_stays_whole() -> None:
    value = "x" * 120
    assert fold_header("X-A", value) == b"X-A: " + value.encode() + b"\r\n"


def test_word_past_the_hard_limit_is_encoded_rather_than_sent_illegal() -> None:
    value = "y" * 1500
    folded = fold_header("X-A", value)
    assert all(len(line) <= 78 for line in folded.split(b"\r\n"))
    assert _decoded(folded + b"\r\n", "X-A") == [value]


def test_long_spam_test_list_folds_after_commas_like_spamassassin() -> None:
    tests = [f"long-rule-number-{i}" for i in range(80)]
    (_, status) = spam_headers(20.0, 5.0, tests, True)[-1]
    folded = fold_header("X-Spam-Status", status)
    lines = folded.split(b"\r\n")[:-1]
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b"\t") for line in lines[1:])
    unfolded = _unfold(folded.decode()).replace("\t", "")
    assert unfolded.rstrip("\r\n").endswith("tests=" + ",".join(tests))


@pytest.mark.parametrize(
    "value",
    [
        "Grüße aus München",
        "\u4f1a\u8b70\u306e\u8b70\u4e8b\u9332 " * 8,
        "mixed ascii and ünïcödé words " * 4,
        "emoji 🎉 party",
    ],
)
def test_non_ascii_values_are_rfc2047_encoded_and_folded(value: str) -> None:
    folded = fold_header("X-Note", value)
    assert folded.isascii()
    assert all(len(line) <= 78 for line in folded.split(b"\r\n"))
    assert _decoded(folded + b"\r\nbody", "X-Note") == [value.strip()]


@pytest.mark.parametrize(
    "value",
    [
        "innocent\r\nBcc: victim@example.org",
        "innocent\nBcc: victim@example.org",
        "innocent\rBcc: victim@example.org",
        "innocent\r\n\r\nfake body",
        "innocent\x00\x0b\x0cBcc: victim@example.org",
        "ünï\r\nBcc: victim@example.org",
        "ünï\x85Bcc: victim@example.org",
        "ünï\u2028Bcc: victim@example.org",
    ],
)
def test_values_cannot_inject_fields_or_end_the_header(value: str) -> None:
    raw = b"To: bob@example.net\r\n\r\nreal body\r\n"
    out = add_headers(raw, [("X-Note", value)])
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg.get_all("Bcc") is None
    assert msg.get_payload() == "real body\r\n"
    assert list(msg.keys()) == ["X-Note", "To"]
    assert out.endswith(raw)


@pytest.mark.parametrize("name", ["X-A: b\r\nBcc", "X A", "X:A", "", "Ünï", "X-A\n"])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid header field name"):
        add_headers(b"A: b\r\n\r\n", [(name, "v")])


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@settings(deadline=None)
@given(value=_TEXT)
def test_any_value_round_trips_through_a_parser(value: str) -> None:
    expected = re.sub(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]+", " ", value).strip(" \t")
    raw = add_headers(b"To: bob@example.net\r\n\r\nbody\r\n", [("X-Any", value)])
    head = raw[: raw.index(b"To: bob")]
    assert head.isascii()
    assert raw.endswith(b"To: bob@example.net\r\n\r\nbody\r\n")
    text = _unfold(head.decode("ascii"))
    assert text.count("\r\n") == 1  # exactly one field was added
    value_text = text[len("X-Any: ") : -2]
    if expected.isascii():
        assert value_text == expected
    else:
        assert str(make_header(decode_header(value_text))) == expected


@settings(deadline=None)
@given(
    fields=st.lists(
        st.tuples(
            st.sampled_from(
                ["Subject", "X-Spam-Flag", "Received", "X-Spamd", "x-spam-level", "To"]
            ),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
            st.booleans(),
        ),
        max_size=12,
    ),
    eol=st.sampled_from([b"\r\n", b"\n"]),
)
def test_removal_equals_building_without_the_removed_fields(
    fields: list[tuple[str, str, bool]], eol: bytes
) -> None:
    def build(items: list[tuple[str, str, bool]]) -> bytes:
        out = b""
        for name, value, folded in items:
            out += f"{name}: {value}".encode() + eol
            if folded:
                out += b"\tcontinued " + value.encode() + eol
        return out + eol + b"X-Spam-Flag: body" + eol

    raw = build(fields)
    expected = build([f for f in fields if not f[0].lower().startswith("x-spam-") and f[0] != "To"])
    assert remove_headers(raw, ["to"], prefixes=["X-Spam-"]) == expected


# --- prefix_subject -------------------------------------------------------------------------


@pytest.mark.parametrize("eol", EOLS)
def test_prefix_plain_subject(eol: bytes) -> None:
    raw = _message(eol)
    out = prefix_subject(raw, "[SPAM] ")
    assert out == raw.replace(b"Subject: hello", b"Subject: [SPAM] hello")


@pytest.mark.parametrize(
    ("raw", "subject"),
    [
        (b"Subject: [SPAM] hello\r\n\r\nx", "[SPAM] hello"),
        (b"Subject: [SPAM]hello\r\n\r\nx", "[SPAM]hello"),
        (b"Subject: =?utf-8?q?=5BSPAM=5D_hello?=\r\n\r\nx", "[SPAM] hello"),
    ],
)
def test_no_double_prefix(raw: bytes, subject: str) -> None:
    assert prefix_subject(raw, "[SPAM] ") == raw
    assert _decoded(raw, "Subject") == [subject]


@pytest.mark.parametrize("eol", EOLS)
def test_missing_subject_is_added(eol: bytes) -> None:
    raw = b"From: a@example.org" + eol + eol + b"body" + eol
    out = prefix_subject(raw, "[SPAM] ")
    assert out == b"Subject: [SPAM]" + eol + raw


def test_empty_subject_becomes_the_prefix() -> None:
    out = prefix_subject(b"Subject:\r\nTo: b@example.net\r\n\r\nx", "[SPAM] ")
    assert _decoded(out, "Subject") == ["[SPAM]"]
    assert out.endswith(b"\r\nTo: b@example.net\r\n\r\nx")


@pytest.mark.parametrize(
    ("subject", "prefix", "expected"),
    [
        (b"hello", "[SPAM] ", "[SPAM] hello"),
        (b"hello", "[SP\u00c4M] ", "[SP\u00c4M] hello"),
        (
            b"=?utf-8?b?5Lya6K2w44Gu6K2w5LqL6Yyy?=",
            "[SPAM] ",
            "[SPAM] \u4f1a\u8b70\u306e\u8b70\u4e8b\u9332",
        ),
        (
            b"=?utf-8?b?5Lya6K2w44Gu6K2w5LqL6Yyy?=",
            "[SPAM]",
            "[SPAM]\u4f1a\u8b70\u306e\u8b70\u4e8b\u9332",
        ),
        (
            b"=?utf-8?b?5Lya6K2w44Gu6K2w5LqL6Yyy?=",
            "[\u0428] ",
            "[\u0428] \u4f1a\u8b70\u306e\u8b70\u4e8b\u9332",
        ),
        (b"=?iso-8859-1?q?caf=E9?= ok", "***SPAM*** ", "***SPAM*** caf\u00e9 ok"),
    ],
)
def test_prefix_decodes_to_prefix_plus_original(subject: bytes, prefix: str, expected: str) -> None:
    raw = b"Subject: " + subject + b"\r\nTo: b@example.net\r\n\r\nbody\r\n"
    out = prefix_subject(raw, prefix)
    assert _decoded(out, "Subject") == [expected]
    assert out.endswith(b"\r\nTo: b@example.net\r\n\r\nbody\r\n")
    assert subject in out  # the original encoded text is kept as it was


def test_only_the_first_subject_is_prefixed() -> None:
    raw = b"Subject: one\r\nSubject: two\r\n\r\nx"
    assert prefix_subject(raw, "[SPAM] ") == b"Subject: [SPAM] one\r\nSubject: two\r\n\r\nx"


@pytest.mark.parametrize("eol", EOLS)
def test_prefix_refolds_a_line_it_pushed_past_78(eol: bytes) -> None:
    words = "word " * 14 + "last"
    raw = b"Subject: " + words.encode() + eol + b"\tcontinued" + eol + eol + b"body"
    out = prefix_subject(raw, "[SPAM] ")
    head, body = out.split(eol + eol)
    assert body == b"body"
    assert all(len(line) <= 78 for line in head.split(eol))
    assert _unfold(head.decode()) == "Subject: [SPAM] " + words + "\tcontinued"


@pytest.mark.parametrize("length", range(55, 75))
def test_refolding_never_leaves_a_line_of_blanks(length: int) -> None:
    # Trailing blanks pushed past 78 columns stay on their line: a line of nothing but blanks
    # is forbidden (RFC 5322), and a lenient parser ends the header section there.
    raw = b"From: a@x\r\nSubject: " + b"w" * length + b"   \r\nTo: b@y\r\n\r\nbody\r\n"
    out = prefix_subject(raw, "[SPAM] ")
    head, body = out.split(b"\r\n\r\n")
    assert body == b"body\r\n"
    assert all(line.strip(b" \t") for line in head.split(b"\r\n"))
    assert _unfold(head.decode()).endswith("Subject: [SPAM] " + "w" * length + "   \r\nTo: b@y")


def test_prefix_with_control_characters_cannot_inject() -> None:
    out = prefix_subject(b"Subject: hi\r\n\r\nx", "[SPAM]\r\nBcc: v@example.org ")
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg.get_all("Bcc") is None
    assert str(msg["Subject"]).startswith("[SPAM]")


# --- spam_headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "required", "tests", "flag", "shown", "status"),
    [
        (
            7.5,
            5.0,
            ["rule-a", "rule-b"],
            True,
            "7.5",
            "Yes, score=7.5 required=5.0 tests=rule-a,rule-b",
        ),
        (
            1.25,
            5,
            ["lottery-words"],
            False,
            "1.2",
            "No, score=1.2 required=5.0 tests=lottery-words",
        ),
        (0.0, 5.0, [], False, "0.0", "No, score=0.0 required=5.0 tests=none"),
        # rounding never crosses the threshold (SpamAssassin bug 6419)
        (4.96, 5.0, [], False, "4.9", "No, score=4.9 required=5.0 tests=none"),
        (-0.04, 5.0, [], False, "0.0", "No, score=0.0 required=5.0 tests=none"),
        (-2.5, 5.0, ["allow"], False, "-2.5", "No, score=-2.5 required=5.0 tests=allow"),
        (15.0, 6.5, ["a"], True, "15.0", "Yes, score=15.0 required=6.5 tests=a"),
        # flagged by an action, not by the score: the score is shown as it is
        (0.0, 5.0, ["tag-it"], True, "0.0", "Yes, score=0.0 required=5.0 tests=tag-it"),
    ],
)
def test_spam_headers_format(
    score: float, required: float, tests: list[str], flag: bool, shown: str, status: str
) -> None:
    expected = [("X-Spam-Score", shown), ("X-Spam-Status", status)]
    if flag:
        expected.insert(0, ("X-Spam-Flag", "YES"))
    assert spam_headers(score, required, tests, flag) == expected


# --- apply_modifications --------------------------------------------------------------------


@pytest.mark.parametrize("eol", EOLS)
def test_forged_verdicts_are_replaced_by_ours(eol: bytes) -> None:
    raw = _message(eol)
    out = apply_modifications(raw, add=spam_headers(1.0, 5.0, [], False))
    assert _decoded(out, "X-Spam-Flag") == []
    assert _decoded(out, "X-Spam-Status") == ["No, score=1.0 required=5.0 tests=none"]
    assert _decoded(out, "X-Spam-Level") == []
    assert out.endswith(_split(raw)[1])


def test_incoming_spam_headers_go_even_with_no_other_edit() -> None:
    raw = _message(b"\r\n")
    out = apply_modifications(raw)
    assert out == remove_headers(raw, [], prefixes=["X-Spam-"])
    assert b"score=99" not in out


def test_removed_header_can_be_replaced() -> None:
    raw = b"X-Mailer: old\r\nSubject: s\r\n\r\nb"
    out = apply_modifications(raw, remove=["x-mailer"], add=[("X-Mailer", "new")])
    assert out == b"X-Mailer: new\r\nSubject: s\r\n\r\nb"


@pytest.mark.parametrize(
    ("raw", "has_field"),
    [
        (b"X-Spam-Flag: YES\r\n\r\nbody\r\n", True),
        (b"Subject: a\r\nX-SPAM-Score: 9\r\n\r\nbody\r\n", True),
        (b"Subject: a\nX-Spam-Status: Yes\n\nbody\n", True),
        (b"Subject: a\r\n\r\nX-Spam-Flag: YES is only body text\r\n", False),
        (b"Subject: a\n\nX-Spam-Flag: YES\n", False),
        (b"Subject: a\r\n x-spam-flag: a folded line, not a field\r\n\r\nb\r\n", False),
    ],
)
def test_forged_spam_fields_are_found_by_the_quick_check_and_removed(
    raw: bytes, has_field: bool
) -> None:
    from filterd.actions.tag import _may_have_prefixed_field

    # The quick check may say yes wrongly, never no: a forged field always reaches the scan.
    if has_field:
        assert _may_have_prefixed_field(raw, (b"x-spam-",))
    cleaned = remove_headers(raw, [], prefixes=("X-Spam-",))
    header = re.split(rb"\r?\n\r?\n", cleaned, maxsplit=1)[0]
    assert not [line for line in header.splitlines() if line.lower().startswith(b"x-spam-")]
    assert (cleaned != raw) is has_field
