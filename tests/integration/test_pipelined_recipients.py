"""The RCPTs of a pipelined group (RFC 2920) go to the next hop together, in one write, and
each still gets the next hop's own reply; a RCPT refused by filterd itself never reaches it.

Postfix hands a content filter every recipient of a queue file (up to 50 by default) in one
group: asked one by one, each would cost a round trip to the next hop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.faultclient import RawClient, Reply, stuff
from tests.support.nexthop import NextHop

BODY = b"From: a@example.org\r\nSubject: many\r\n\r\nhello\r\n"


@pytest.fixture
def daemon(tmp_path: Path, nexthop: NextHop):
    with Daemon(tmp_path, nexthop.port, extra={"limits": {"max_recipients": 4}}) as running:
        yield running


def pipelined(daemon: Daemon, rcpt_lines: list[str]) -> list[Reply]:
    """EHLO, then MAIL, the RCPT lines and DATA in one write; the replies to the group and,
    if DATA was accepted, the final reply to the message."""
    with RawClient(daemon.port) as client:
        assert client.ehlo().code == 250
        group = ["MAIL FROM:<a@example.org>", *rcpt_lines, "DATA"]
        client.send("".join(line + "\r\n" for line in group))
        replies = client.read_replies(len(group))
        if replies[-1].code == 354:
            client.send(stuff(BODY))
            replies.append(client.read_reply())
        client.quit()
        return replies


def rcpt_lines_at_next_hop(nexthop: NextHop) -> list[tuple[bytes, bool]]:
    """Each RCPT the next hop read, and whether more was waiting behind it."""
    return [
        (line.rstrip(b"\r\n"), followed)
        for line, followed in zip(nexthop.commands, nexthop.followed, strict=True)
        if line.upper().startswith(b"RCPT")
    ]


def test_a_group_of_recipients_reaches_the_next_hop_in_one_write(
    daemon: Daemon, nexthop: NextHop
) -> None:
    recipients = [f"r{n}@example.net" for n in range(1, 5)]
    replies = pipelined(daemon, [f"RCPT TO:<{rcpt}>" for rcpt in recipients])
    assert [reply.code for reply in replies] == [250, 250, 250, 250, 250, 354, 250]
    [received] = nexthop.wait_for(1)
    assert received.recipients == recipients
    # All four RCPTs came in one write (with XFORWARD and MAIL): each but the last had the
    # rest waiting behind it. Asked one by one, none would have.
    assert [followed for _, followed in rcpt_lines_at_next_hop(nexthop)] == [
        True,
        True,
        True,
        False,
    ]


def test_each_recipient_of_a_group_gets_the_next_hops_own_reply(
    daemon: Daemon, nexthop: NextHop
) -> None:
    nexthop.behaviour.refuse_rcpt = {
        "r2@example.net": "550 5.1.1 <r2@example.net>: Recipient address rejected",
        "r3@example.net": "450 4.2.0 <r3@example.net>: Mailbox busy",
    }
    replies = pipelined(daemon, [f"RCPT TO:<r{n}@example.net>" for n in range(1, 5)])
    assert [str(reply) for reply in replies[1:5]] == [
        "250 2.1.5 Ok",
        "550 5.1.1 <r2@example.net>: Recipient address rejected",
        "450 4.2.0 <r3@example.net>: Mailbox busy",
        "250 2.1.5 Ok",
    ]
    assert replies[-1].code == 250
    [received] = nexthop.wait_for(1)
    assert received.recipients == ["r1@example.net", "r4@example.net"]


def test_a_recipient_refused_here_never_reaches_the_next_hop(
    daemon: Daemon, nexthop: NextHop
) -> None:
    """A RCPT sent to the next hop that the client was told is refused would be delivered
    anyway: every local check comes first, and only what passes is sent."""
    lines = [
        "RCPT TO:<r1@example.net>",
        "RCPT TO:<r2@example.net> NOTIFY=NEVER",  # a parameter filterd does not offer: 555
        "RCPT TO:<r3@example.net>",
        "RCPT TO:<r4@example.net>",
        "RCPT TO:<r5@example.net>",
        "RCPT TO:<r6@example.net>",  # the fifth one counted: past max_recipients (4)
    ]
    replies = pipelined(daemon, lines)
    assert [reply.code for reply in replies[1:7]] == [250, 555, 250, 250, 250, 452]
    assert replies[-1].code == 250
    [received] = nexthop.wait_for(1)
    sent = ["r1@example.net", "r3@example.net", "r4@example.net", "r5@example.net"]
    assert received.recipients == sent
    assert [line for line, _ in rcpt_lines_at_next_hop(nexthop)] == [
        f"RCPT TO:<{rcpt}>".encode() for rcpt in sent
    ]


def test_a_next_hop_failing_during_a_group_defers_the_whole_group(
    daemon: Daemon, nexthop: NextHop
) -> None:
    nexthop.behaviour.close_at = "rcpt"
    replies = pipelined(daemon, [f"RCPT TO:<r{n}@example.net>" for n in range(1, 4)])
    # Every recipient of the group, and the DATA after it, get 451: a retry, never a bounce.
    assert [reply.code for reply in replies] == [250, 451, 451, 451, 451]
    assert nexthop.messages == []


def test_lock_step_recipients_are_still_asked_one_at_a_time(
    daemon: Daemon, nexthop: NextHop
) -> None:
    with RawClient(daemon.port) as client:
        client.ehlo()
        assert client.command("MAIL FROM:<a@example.org>").code == 250
        assert client.command("RCPT TO:<r1@example.net>").code == 250
        assert client.command("RCPT TO:<r2@example.net>").code == 250
        assert client.data(BODY).code == 250
        client.quit()
    [received] = nexthop.wait_for(1)
    assert received.recipients == ["r1@example.net", "r2@example.net"]
    assert [followed for _, followed in rcpt_lines_at_next_hop(nexthop)] == [False, False]
