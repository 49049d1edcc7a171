"""The command lines of a transaction's start: XFORWARD, built in one piece when it fits in
one command, and MAIL with the parameters the next hop announced. Each must be what the
general construction gives, for any attributes, values and announcements."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.actions import relay
from filterd.actions.relay import RelayClient, RelayTransaction, Xforward, xtext


def xforward_part_by_part(attrs: dict[str, str], supported: Iterable[str]) -> list[str]:
    """The reference: each attribute added to the line in turn, a new line when it is full."""
    allowed = {name.upper() for name in supported}
    parts = [f"{name}={xtext(value)}" for name, value in attrs.items() if name in allowed and value]
    lines: list[str] = []
    current = "XFORWARD"
    for part in parts:
        if len(current) + 1 + len(part) > 500 and current != "XFORWARD":
            lines.append(current)
            current = "XFORWARD"
        current += " " + part
    if current != "XFORWARD":
        lines.append(current)
    return lines


NAMES = st.sampled_from(["NAME", "ADDR", "PROTO", "HELO", "IDENT", "SOURCE", "addr", "PORT"])
VALUES = st.one_of(
    st.sampled_from(["", "127.0.0.1", "ESMTP", "[UNAVAILABLE]", "a+b=c", "h\udce9llo", "x y"]),
    st.text(max_size=20),
    st.integers(0, 600).map(lambda size: "v" * size),
)


@settings(deadline=None, max_examples=1000)
@given(
    st.dictionaries(NAMES, VALUES, max_size=8),
    st.lists(st.sampled_from(["NAME", "ADDR", "proto", "HELO", "IDENT", "SOURCE"]), max_size=6),
)
def test_xforward_lines_are_those_built_part_by_part(
    attrs: dict[str, str], supported: list[str]
) -> None:
    assert Xforward(attrs).commands(supported) == xforward_part_by_part(attrs, supported)


def test_xforward_attributes_that_fit_go_in_one_command_and_the_rest_in_more() -> None:
    few = {"ADDR": "192.0.2.7", "HELO": "mx.example.org", "PROTO": "ESMTP"}
    assert Xforward(few).commands(["ADDR", "HELO", "PROTO"]) == [
        "XFORWARD ADDR=192.0.2.7 HELO=mx.example.org PROTO=ESMTP"
    ]
    many = {"ADDR": "a" * 300, "HELO": "h" * 300}
    assert Xforward(many).commands(["ADDR", "HELO"]) == [
        "XFORWARD ADDR=" + "a" * 300,
        "XFORWARD HELO=" + "h" * 300,
    ]
    assert Xforward({"ADDR": ""}).commands(["ADDR"]) == []


class AnnouncedConnection:
    def __init__(self, extensions: Iterable[str]) -> None:
        self.extensions = dict.fromkeys(extensions, "")

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.extensions


def mail_by_name(conn: AnnouncedConnection, sender: str, options: Sequence[str]) -> str:
    """The reference: each parameter checked against its extension by name."""
    params = []
    for option in options:
        name = option.split("=", 1)[0].upper()
        if (
            (name == "BODY" and conn.supports("8BITMIME"))
            or (name == "SMTPUTF8" and conn.supports("SMTPUTF8"))
            or (name == "SIZE" and conn.supports("SIZE"))
        ):
            params.append(option)
    suffix = (" " + " ".join(params)) if params else ""
    return f"MAIL FROM:<{sender}>{suffix}"


@settings(deadline=None, max_examples=500)
@given(
    st.lists(
        st.sampled_from(
            ["BODY=8BITMIME", "body=7bit", "SMTPUTF8", "SIZE=1000", "size", "RET=HDRS", "=x", ""]
        ),
        max_size=5,
    ),
    st.lists(st.sampled_from(["8BITMIME", "SMTPUTF8", "SIZE", "PIPELINING", "BODY"]), max_size=5),
)
def test_mail_passes_on_the_parameters_the_next_hop_announced(
    options: list[str], extensions: list[str]
) -> None:
    txn = RelayTransaction(RelayClient("127.0.0.1", 25, timeout=1, helo="filterd.test"))
    conn: Any = AnnouncedConnection(extensions)
    txn.conn = conn
    assert txn._mail_command("a@example.org", options) == mail_by_name(
        conn, "a@example.org", options
    )


def test_the_xtext_check_is_the_one_xtext_makes() -> None:
    assert relay._is_plain_xtext("192.0.2.7")
    assert not relay._is_plain_xtext("a+b")
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
