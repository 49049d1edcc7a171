"""The common-shape reading of address lists gives what the general scan gives, and is the one
that reads the common shapes."""

from __future__ import annotations

import re
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterd import mime_address
from filterd.mime_address import _clean_name, _parse_common, _parse_general, parse_address_list
from filterd.mime_headers import decode_words
from tests.support.blowup import run_to_completion

MANY = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Whitespace as folding leaves it, and whitespace only Unicode calls so.
_SPACES = ["", " ", "  ", "\t", "\r\n ", "\n\t", "\xa0", "\u2028"]
_NAMES = [
    "",
    "Name",
    "Ann  Lee",
    "a>b",
    "x@y.example",
    "é",
    '"Quoted, Name"',
    '"Doe; J. <x@y.example> (c): "',
    '""',
    '"a" "b"',
    'Foo "Bar, Baz" Qux',
    "=?utf-8?q?Caf=C3=A9?=",
    "=?utf-8?q?M=C3=BCller=2C_Hans?=",
    "=?utf-8?b?w6k=?= =?utf-8?b?w6k=?=",
    '"=?utf-8?q?a?=" =?utf-8?q?b?=',
    "=?bogus?q?x?=",
    "=?",
]
_ANGLE_ADDRESSES = ["a@b.example", "x.y+z@[192.0.2.1]", "é@ü.example", "@", "local", "a@b@c"]
_BARE_ADDRESSES = ["a@b.example", "x.y+z@[192.0.2.1]", "é@ü.example", "@", "a@b@c", "=?x?q?y?=@b"]
_GROUP_NAMES = ["undisclosed-recipients", "", "Team  of é", "=?utf-8?q?x?="]
_SEPARATORS = [",", ";", ", ", " ,", ";\r\n "]
# Pieces that, dropped into a common value, reach every branch of the general scan.
_PIECES = [
    "a",
    "b.example",
    "@",
    "x@y.example",
    "<",
    ">",
    '"',
    ",",
    ";",
    ":",
    "(",
    ")",
    "\\",
    " ",
    "\t",
    "\r\n ",
    "\n",
    "\xa0",
    "=?utf-8?q?Caf=C3=A9?=",
    "=?utf-8?q?a,b?=",
    "=?",
    "?=",
    "é",
    "[192.0.2.1]",
    "Name",
    "undisclosed-recipients",
    "<a@b.example>",
    "@route.example:",
    "Team:",
    ":;",
    "\x00",
]

_space = st.sampled_from(_SPACES)
_named_mailbox = st.builds(
    lambda space, name, gap, address, after: f"{space}{name}{gap}<{address}>{after}",
    _space,
    st.sampled_from(_NAMES),
    _space,
    st.sampled_from(_ANGLE_ADDRESSES),
    _space,
)
_bare_mailbox = st.builds(
    lambda space, address, after: f"{space}{address}{after}",
    _space,
    st.sampled_from(_BARE_ADDRESSES),
    _space,
)
_empty_group = st.builds(
    lambda space, name, gap: f"{space}{name}:{gap};",
    _space,
    st.sampled_from(_GROUP_NAMES),
    _space,
)
_element = st.one_of(_named_mailbox, _named_mailbox, _bare_mailbox, _empty_group, _space)
_common_value = st.builds(
    lambda pairs, last: "".join(element + separator for element, separator in pairs) + last,
    st.lists(st.tuples(_element, st.sampled_from(_SEPARATORS)), max_size=4),
    _element,
)


@MANY
@given(_common_value)
def test_common_values_are_read_without_the_scan_and_as_the_scan_reads_them(value: str) -> None:
    common = _parse_common(value)
    assert common is not None
    assert common == _parse_general(value)


@MANY
@given(
    _common_value, st.lists(st.tuples(st.integers(0, 200), st.sampled_from(_PIECES)), max_size=3)
)
def test_common_values_with_a_stray_piece_read_as_the_scan_reads_them(
    value: str, insertions: list[tuple[int, str]]
) -> None:
    for offset, piece in insertions:
        at = offset % (len(value) + 1)
        value = value[:at] + piece + value[at:]
    assert parse_address_list(value) == _parse_general(value)


@MANY
@given(
    st.one_of(
        st.lists(st.sampled_from(_PIECES + _SPACES + _NAMES), max_size=25).map("".join),
        st.text(alphabet=st.sampled_from('a@.<>",;:()\\ \t\r\n=?é'), max_size=60),
    )
)
def test_any_value_reads_as_the_scan_reads_it(value: str) -> None:
    assert parse_address_list(value) == _parse_general(value)


@pytest.mark.parametrize(
    ("value", "common"),
    [
        ("", True),
        ("   ", True),
        ("\r\n\t", True),
        ("<a@b.example>", True),
        ("  <a@b.example>  ", True),
        ("\xa0<a@b.example>\u2028", True),
        ("a@b.example", True),
        ("@", True),
        ("a@b@c.example", True),
        ("<a@[192.0.2.1]>", True),
        ("Name <é@ü.example>", True),
        ("Name\r\n <a@b.example>", True),
        ("\t=?utf-8?q?Caf=C3=A9?=\r\n <a@b.example>", True),
        ("   <a@b.example>", True),
        ("a>b <c@d.example>", True),
        ("x@y.example <c@d.example>", True),
        ('"a" "b" <c@d.example>', True),
        ('Foo "Bar, Baz" Qux <c@d.example>', True),
        ('"" <c@d.example>', True),
        ('"  " <c@d.example>', True),
        ('"<e@f.example>" <c@d.example>', True),
        ("a@b.example,", True),
        ("a@b.example,,c@d.example", True),
        ("a@b.example;c@d.example", True),
        (", ,", True),
        ("undisclosed-recipients:;", True),
        ("undisclosed-recipients: ;", True),
        (":;", True),
        ("undisclosed-recipients:;, <a@b.example>", True),
        ("<a @b.example>", False),
        ("<a@b.example\r\n>", False),
        ("<a@b.example\xa0>", False),
        ("<a(c)@b.example>", False),
        ("<a@b.example> (comment)", False),
        ("(comment) <a@b.example>", False),
        ("Name (comment) <a@b.example>", False),
        ('"a\\"b" <a@b.example>', False),
        ('"a\\\\" <a@b.example>', False),
        ("Jo\\hn <j@x.example>", False),
        ('"unterminated <x@y.example>', False),
        ('"a" b" <c@d.example>', False),
        ("Group: a@b.example;", False),
        ("Group: a@b.example, c@d.example;", False),
        ("a@b.example:;", False),
        ("x:, a@b.example", False),
        ("undisclosed-recipients:,, Team:;", False),
        ("undisclosed-recipients:; a@b.example", False),
        ("<@route.example:u@h.example>", False),
        ("<a:b@c.example>", False),
        ("Name <a@b.example> trailing", False),
        ("<a@b.example> <c@d.example>", False),
        ("<a@b<c@d.example>", False),
        ("Name <a@b.example", False),
        ("<>", False),
        ("Name <>", False),
        ("=?utf-8?q?a,b?= <x@y.example>", False),
        ("a@b.example c@d.example", False),
        ("John john@x.example", False),
        ("just a name", False),
        ("a@b.example>", False),
        ("a@b.example, just a name", False),
    ],
)
def test_tricky_values(value: str, common: bool) -> None:
    assert (_parse_common(value) is not None) == common
    assert parse_address_list(value) == _parse_general(value)


def test_the_common_shapes_never_reach_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scan(value: str) -> list[tuple[str, str]]:
        raise AssertionError(f"the general scan read {value!r}")

    monkeypatch.setattr(mime_address, "_parse_general", no_scan)
    assert parse_address_list("<a@b.example>") == [("", "a@b.example")]
    assert parse_address_list("a@b.example") == [("", "a@b.example")]
    assert parse_address_list("Name <a@b.example>") == [("Name", "a@b.example")]
    assert parse_address_list('"Quoted, Name" <a@b.example>') == [("Quoted, Name", "a@b.example")]
    assert parse_address_list("=?utf-8?q?Caf=C3=A9?= <a@b.example>") == [("Café", "a@b.example")]
    assert parse_address_list("Ann <a@b.example>, Bob <c@d.example>") == [
        ("Ann", "a@b.example"),
        ("Bob", "c@d.example"),
    ]
    assert parse_address_list("undisclosed-recipients:;") == []
    assert parse_address_list("") == []


def test_the_address_cap_is_the_same() -> None:
    many = ", ".join(f"<u{i}@b.example>" for i in range(1500))
    assert _parse_common(many) == _parse_general(many)
    assert len(parse_address_list(many)) == 1000
    # The scan stops at the cap too, so what follows it does not matter.
    odd_after_the_cap = ", ".join(f"<u{i}@b.example>" for i in range(1000)) + ", (x"
    assert _parse_common(odd_after_the_cap) == _parse_general(odd_after_the_cap)


@MANY
@given(
    st.lists(
        st.sampled_from([*_SPACES, "\x1c", "\x85", "\u3000", "a", "=?", "=?utf-8?b?w6k=?="])
    ).map("".join)
)
def test_the_name_cleaning_collapses_whitespace_as_the_regex_did(text: str) -> None:
    assert _clean_name(text) == re.sub(r"\s+", " ", decode_words(text)).strip()


def test_str_split_and_the_regex_agree_on_what_whitespace_is() -> None:
    space = re.compile(r"\s")
    disagree = [
        code
        for code in range(sys.maxunicode + 1)
        if chr(code).isspace() != bool(space.match(chr(code)))
    ]
    assert disagree == []


def test_values_that_the_common_reading_gives_up_on_late_still_parse_in_linear_time() -> None:
    # Each would cost minutes if a failed attempt backtracked over what it had read.
    printed = run_to_completion(
        "from filterd.mime_address import parse_address_list\n"
        "print(len(parse_address_list(', ' * 200_000 + '(x')))\n"
        "print(len(parse_address_list('\"q\" ' * 100_000 + '<' + 'a' * 200_000)))\n"
        "print(len(parse_address_list(' ' * 200_000 + 'x')))\n"
        "print(len(parse_address_list('a' * 200_000 + '@' + 'b' * 200_000 + ' c')))\n"
    )
    assert printed.split() == ["1", "1", "1", "1"]
