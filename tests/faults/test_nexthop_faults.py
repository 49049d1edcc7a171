"""A misbehaving next hop, stage by stage: refused connections, stalls, 421, dropped connections,
4xx/5xx replies, replies out of step with the commands, and trickled replies.

For every fault the client must get the safe reply (the next hop's own 5xx when it refused for
good, otherwise a 4xx: never 250 for a message that was not delivered), nothing may arrive at
the next hop, filterd must count what it did, and the same session must deliver a clean
message right after the fault is healed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.faults.accounting import delta, message, messages_by_action, token_of
from tests.faults.conftest import RELAY_TIMEOUT, assert_still_serving, new_token
from tests.support.daemon import Daemon
from tests.support.faultclient import RawClient, Reply, scrape, value
from tests.support.nexthop import Fault, NextHop

STALL = RELAY_TIMEOUT + 1.0  # the next hop says nothing for longer than filterd waits


@dataclass(frozen=True)
class Case:
    fault: Fault
    next_hop_code: int | None = None  # what the next hop answered, if it answered at all
    relay_error: str | None = None  # the filterd_relay_errors_total reason expected to grow

    @property
    def id(self) -> str:
        detail = self.fault.reply.split(" ", 1)[0] if self.fault.kind == "reply" else ""
        return f"{self.fault.kind}{detail}@{self.fault.stage}"


def _cases() -> list[Case]:
    cases = [
        # accepts the connection, then: closes / never greets / 421 / refuses in the greeting
        Case(Fault("greeting", "close"), relay_error="closed"),
        Case(Fault("greeting", "stall", seconds=STALL), relay_error="timeout"),
        Case(Fault("greeting", "reply", "421 4.3.2 nexthop.test busy"), relay_error="refused_4xx"),
        Case(
            Fault("greeting", "reply", "554 5.3.2 nexthop.test no service"),
            relay_error="refused_5xx",
        ),
    ]
    for stage in ("mail", "rcpt", "data", "mid-data", "dot"):
        cases.append(Case(Fault(stage, "close"), relay_error="closed"))
        if stage == "mid-data":
            continue  # only a close can happen in the middle of the data
        if stage != "dot":  # a stall after the dot is covered by tests/integration
            cases.append(Case(Fault(stage, "stall", seconds=STALL), relay_error="timeout"))
        cases.append(Case(Fault(stage, "shutdown"), next_hop_code=421))
    for stage, temp, perm in (
        ("mail", "451 4.3.0 try later", "550 5.7.1 sender refused"),
        ("rcpt", "450 4.2.0 mailbox busy", "550 5.1.1 no such user"),
        ("data", "451 4.3.0 no data now", "554 5.5.1 no data ever"),
        ("dot", "451 4.3.0 queue trouble", "552 5.3.4 too big for me"),
    ):
        # A refusal of the message itself (DATA or the end of data) is a relay error as well;
        # one of the sender or a recipient is the next hop's verdict on that address.
        refused = stage in ("data", "dot")
        cases.append(
            Case(
                Fault(stage, "reply", temp),
                next_hop_code=int(temp[:3]),
                relay_error="refused_4xx" if refused else None,
            )
        )
        cases.append(
            Case(
                Fault(stage, "reply", perm),
                next_hop_code=int(perm[:3]),
                relay_error="refused_5xx" if refused else None,
            )
        )
    # replies out of step with the commands: one too many in the greeting, a 250 where the
    # 354 belongs, a 354 for the message. None may be taken for the message's reply.
    for stage, reply in (
        ("greeting", "220 nexthop.test ESMTP\r\n220 nexthop.test ready"),
        ("data", "250 2.0.0 Ok"),
        ("dot", "354 go on"),
    ):
        cases.append(Case(Fault(stage, "reply", reply), relay_error="protocol"))
    return cases


CASES = _cases()


def always(fault: Fault) -> Callable[[str], Fault | None]:
    """Inject ``fault`` into every connection (greeting faults) or every transaction."""
    point = "connect" if fault.stage == "greeting" else "transaction"
    return lambda where: fault if where == point else None


def attempt(client: RawClient, token: str) -> tuple[str, Reply]:
    """MAIL, RCPT, DATA in lock-step; the stage where it ended and the reply there."""
    reply = client.command("MAIL FROM:<sender@example.org>")
    if reply.code != 250:
        return "mail", reply
    reply = client.command("RCPT TO:<rcpt@example.net>")
    if reply.code != 250:
        return "rcpt", reply
    # several lines, so a close in the middle of the data has a middle to happen in
    return "final", client.data(message(token, body=b"line one\r\nline two\r\nline three\r\n"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_next_hop_fault_gives_the_safe_reply_and_nothing_is_delivered(
    filterd: Daemon, hop: NextHop, case: Case
) -> None:
    assert filterd.metrics_port is not None
    before = scrape(filterd.metrics_port)
    delivered_before = hop.count()
    token = new_token("nh")
    hop.behaviour.faults = always(case.fault)
    if case.fault.stage == "greeting":
        hop.drop_connections()  # the fault needs a new connection, not filterd's pooled one
    with RawClient(filterd.port) as client:
        client.ehlo()
        stage, reply = attempt(client, token)

        assert reply.code != 250, f"{case.id}: the client was told 250 for an undelivered message"
        if (
            case.next_hop_code is not None
            and case.next_hop_code >= 500
            and case.fault.stage != "greeting"
        ):
            assert reply.code == case.next_hop_code, (
                f"{case.id}: next hop's {case.next_hop_code} became {reply}"
            )
        else:
            assert 400 <= reply.code < 500, f"{case.id}: expected a 4xx, got {reply}"
            if case.next_hop_code is None or case.fault.stage == "greeting":
                assert reply.last.startswith("4.3.0"), (
                    f"{case.id}: filterd's own tempfail expected, got {reply}"
                )
        # MAIL reaches the next hop together with the first RCPT, so a fault before or at MAIL
        # shows at the client's RCPT.
        expected_stage = {"greeting": "rcpt", "mail": "rcpt", "rcpt": "rcpt"}.get(
            case.fault.stage, "final"
        )
        assert stage == expected_stage, f"{case.id}: failed at {stage}: {reply}"
        assert [token_of(m.data) for m in hop.messages[delivered_before:]] == []

        hop.behaviour.faults = None
        assert_still_serving(filterd, hop, client)

    after = scrape(filterd.metrics_port)
    counted = delta(messages_by_action(after), messages_by_action(before))
    expected = {"accept": 1}  # the clean message after the fault
    if stage == "final":  # the message reached the end of data: filterd decided and counted it
        expected["reject" if reply.code >= 500 else "tempfail"] = 1
        [line] = [
            e
            for e in filterd.events("message_processed")
            if e.get("message_id") == f"<{token}@faults.test>"
        ]
        assert line["reply"].startswith(str(reply.code))
    assert dict(counted) == expected
    if case.relay_error:
        grown = value(after, "filterd_relay_errors_total", reason=case.relay_error) - value(
            before, "filterd_relay_errors_total", reason=case.relay_error
        )
        assert grown >= 1, f"{case.id}: relay error {case.relay_error!r} not counted"
        if case.relay_error.startswith("refused") and stage == "final":
            assert grown == 1, f"{case.id}: one refused message counted {grown} times"


@pytest.mark.parametrize("nth", [1, 2], ids=["first-recipient", "second-recipient"])
def test_a_relay_failure_at_a_recipient_never_turns_into_a_5xx_for_the_transaction(
    filterd: Daemon, hop: NextHop, nth: int
) -> None:
    # The next hop drops the connection at the nth RCPT. That recipient gets 451; the ones
    # after it and the DATA must be 4xx too: a 5xx makes the MTA bounce mail that a retry
    # would have delivered (an MTA pipelines its RCPTs and DATA and reads the replies later).
    hop.behaviour.faults = always(Fault("rcpt", "close", nth=nth))
    with RawClient(filterd.port) as client:
        client.ehlo()
        assert client.command("MAIL FROM:<sender@example.org>").code == 250
        replies = [client.command(f"RCPT TO:<r{i}@example.net>") for i in range(1, 4)]
        data = client.command("DATA")
        accepted = [r.code for r in replies[: nth - 1]]
        failed, after = replies[nth - 1], replies[nth:]
        assert accepted == [250] * (nth - 1)
        assert (failed.code, failed.last[:5]) == (451, "4.3.0"), str(failed)
        assert [r.code for r in after if not 400 <= r.code < 500] == [], (
            f"recipients after the relay failure got {[str(r) for r in after]}"
        )
        if accepted:
            assert 400 <= data.code < 500, f"DATA after an accepted recipient got {data}"
        else:
            assert data.code == 554 or 400 <= data.code < 500, str(data)
        if data.code == 354:
            client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
            client.read_reply()
        hop.behaviour.faults = None
        assert_still_serving(filterd, hop, client)


def test_a_next_hop_that_refuses_connections_gives_451_and_is_used_again_when_back(
    filterd: Daemon, hop: NextHop
) -> None:
    assert_still_serving(filterd, hop)  # filterd now holds a pooled connection
    hop.refuse_connections()
    hop.drop_connections()
    with RawClient(filterd.port) as client:
        client.ehlo()
        for _ in range(3):  # and again: nothing is cached that makes it worse
            assert client.command("MAIL FROM:<sender@example.org>").code == 250
            reply = client.command("RCPT TO:<rcpt@example.net>")  # MAIL goes out with it
            assert (reply.code, reply.last[:5]) == (451, "4.3.0"), str(reply)
            assert client.command("RSET").code == 250
        hop.accept_connections()
        assert_still_serving(filterd, hop, client)


def test_pooled_connections_the_next_hop_dropped_while_idle_are_replaced(
    filterd: Daemon, hop: NextHop
) -> None:
    with RawClient(filterd.port) as client:
        client.ehlo()
        for _ in range(3):
            assert_still_serving(filterd, hop, client)
            hop.drop_connections()  # a next hop restart between two messages


def test_a_next_hop_that_trickles_its_replies_within_the_timeout_delivers_intact(
    filterd: Daemon, hop: NextHop
) -> None:
    slow = Fault("greeting", "trickle", seconds=0.003)
    hop.behaviour.faults = lambda where: slow
    hop.drop_connections()
    token = new_token("trickle")
    body = message(token, body=b"..a leading dot\r\n.\r\nend\r\n")
    with RawClient(filterd.port) as client:
        client.ehlo()
        reply = client.sendmail("sender@example.org", ["rcpt@example.net"], body)
    assert reply.code == 250, str(reply)
    [received] = [m for m in hop.messages if token_of(m.data) == token]
    assert received.data == body
    assert received.fault == slow


def test_a_next_hop_too_slow_to_greet_gives_451(filterd: Daemon, hop: NextHop) -> None:
    hop.behaviour.faults = lambda where: Fault("greeting", "trickle", seconds=0.5)
    hop.drop_connections()
    with RawClient(filterd.port) as client:
        client.ehlo()
        assert client.command("MAIL FROM:<sender@example.org>").code == 250
        reply = client.command("RCPT TO:<rcpt@example.net>")  # MAIL goes out with it
        assert (reply.code, reply.last[:5]) == (451, "4.3.0"), str(reply)
        assert client.command("RSET").code == 250
        hop.behaviour.faults = None
        assert_still_serving(filterd, hop, client)


def test_a_trickled_multiline_final_reply_cannot_hold_the_client_past_the_relay_bound(
    filterd: Daemon, hop: NextHop
) -> None:
    # docs/postfix.md promises the MTA that filterd answers the end of DATA within
    # 3 x relay_timeout (DATA, content, final reply). A next hop that sends a long multi-line
    # reply, each line just inside relay_timeout, must not stretch that.
    lines = [f"451-4.3.0 still thinking {i:02d}" for i in range(10)] + ["451 4.3.0 giving up"]
    per_byte = (RELAY_TIMEOUT * 0.6) / (len(lines[0]) + 2)
    hop.behaviour.faults = always(Fault("dot", "reply", "\r\n".join(lines), seconds=per_byte))
    with RawClient(filterd.port, timeout=60) as client:
        client.ehlo()
        assert client.command("MAIL FROM:<sender@example.org>").code == 250
        assert client.command("RCPT TO:<rcpt@example.net>").code == 250
        assert client.command("DATA").code == 354
        started = time.monotonic()
        client.send(b"Subject: slow\r\n\r\nbody\r\n.\r\n")
        reply = client.read_reply()
        elapsed = time.monotonic() - started
    assert 400 <= reply.code < 500, str(reply)
    bound = 3 * RELAY_TIMEOUT
    assert elapsed < bound + 2.0, (
        f"the client waited {elapsed:.1f}s for the end-of-data reply; the documented bound is "
        f"3 x relay_timeout = {bound:.0f}s"
    )
