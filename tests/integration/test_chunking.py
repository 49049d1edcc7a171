"""BDAT (RFC 3030) to a next hop that offers CHUNKING: a message kept in memory goes as one
``BDAT n LAST`` with its data in the same write, not dot-stuffed; refusals and failures are
passed on as with DATA, and the pooled connection stays usable. Against a real next hop on
loopback; the end-to-end tests do the same against Postfix and Exim, which offer CHUNKING."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.nexthop import NextHop

PLAIN = (
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n"
    b"Message-ID: <c1@example.org>\r\n\r\nhello\r\n"
)
DOTS = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
TAG_RULES = """\
scores: {tag: 1}
rules:
  - {name: dots, if: {subject: {contains: dots}}, then: {score: 2}}
"""


@pytest.fixture
def chunking_hop() -> Iterator[NextHop]:
    with NextHop() as hop:
        hop.behaviour.announce = (*hop.behaviour.announce, "CHUNKING")
        yield hop


@pytest.fixture
def daemon(tmp_path: Path, chunking_hop: NextHop) -> Iterator[Daemon]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(TAG_RULES)
    with Daemon(tmp_path, chunking_hop.port, rules=rules) as running:
        yield running


def _commands(hop: NextHop) -> list[bytes]:
    return [line.split(b" ", 1)[0].rstrip(b"\r\n").upper() for line in hop.commands]


def _send(port: int, message: bytes) -> None:
    """One message through filterd, which must accept it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        assert smtp.sendmail("a@example.org", ["b@example.net"], message) == {}


def test_a_message_goes_as_one_bdat_chunk_byte_for_byte(
    daemon: Daemon, chunking_hop: NextHop
) -> None:
    _send(daemon.port, PLAIN)
    [received] = chunking_hop.wait_for(1)
    assert received.data == PLAIN
    assert received.recipients == ["b@example.net"]
    assert f"BDAT {len(PLAIN)} LAST\r\n".encode() in chunking_hop.commands
    assert b"DATA" not in _commands(chunking_hop)
    [line] = daemon.wait_event("message_processed")
    assert line["next_hop_reply"].startswith("250")


def test_lines_with_dots_arrive_unstuffed_and_header_edits_apply(
    daemon: Daemon, chunking_hop: NextHop
) -> None:
    _send(daemon.port, DOTS)  # smtplib dot-stuffs, filterd's ingress unstuffs, BDAT must not
    [received] = chunking_hop.wait_for(1)
    head, _, body = received.data.partition(b"\r\n\r\n")
    assert body == b".leading dot\r\n..two\r\n.\r\nend\r\n"
    assert b"X-Spam-Flag: YES" in head  # the tag's header edits, made before the chunk


@pytest.mark.parametrize(
    ("final", "expected"), [("554 5.7.1 no thanks", 554), ("452 4.3.1 full", 452)]
)
def test_the_next_hops_reply_to_the_chunk_is_passed_on(
    daemon: Daemon, chunking_hop: NextHop, final: str, expected: int
) -> None:
    chunking_hop.behaviour.final_reply = final
    with (
        smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp,
        pytest.raises(smtplib.SMTPDataError) as error,
    ):
        smtp.sendmail("a@example.org", ["b@example.net"], PLAIN)
    assert error.value.smtp_code == expected
    assert chunking_hop.messages == []
    # The refused transaction is reset before the connection serves the next message.
    chunking_hop.behaviour.final_reply = None
    _send(daemon.port, PLAIN)
    assert len(chunking_hop.wait_for(1)) == 1
    assert b"RSET" in _commands(chunking_hop)


@pytest.mark.parametrize("stage", ["data", "mid-data", "dot"])
def test_next_hop_closing_during_the_chunk_gives_451(
    daemon: Daemon, chunking_hop: NextHop, stage: str
) -> None:
    chunking_hop.behaviour.close_at = stage
    with (
        smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp,
        pytest.raises(smtplib.SMTPDataError) as error,
    ):
        smtp.sendmail("a@example.org", ["b@example.net"], PLAIN * 3)
    assert error.value.smtp_code == 451
    assert chunking_hop.messages == []


def test_the_pooled_connection_carries_the_next_message(
    daemon: Daemon, chunking_hop: NextHop
) -> None:
    for _ in range(3):
        _send(daemon.port, PLAIN)
    assert len(chunking_hop.wait_for(3)) == 3
    assert chunking_hop.connections == 1
    assert _commands(chunking_hop).count(b"BDAT") == 3


def test_a_spooled_message_still_goes_with_data(tmp_path: Path, chunking_hop: NextHop) -> None:
    """Past the spool threshold the message streams from its file with DATA."""
    big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n"
    big = big[:16] + big[16:] * 2000  # ~160 KB
    with Daemon(tmp_path, chunking_hop.port, extra={"limits": {"spool_threshold": "64K"}}) as d:
        _send(d.port, big)
    [received] = chunking_hop.wait_for(1)
    assert received.data == big
    assert b"DATA" in _commands(chunking_hop)
    assert b"BDAT" not in _commands(chunking_hop)
