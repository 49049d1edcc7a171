"""The e2e harness itself, proven with a stand-in passthrough filter instead of filterd.

If these fail, the Postfix wiring (or the machine) is at fault, not filterd: they check that mail
flows client → Postfix → filter → re-injection → sink in both modes, that Postfix sends XFORWARD
and the re-injection listener takes it, and that mail waits in the queue while the filter is down.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator

import pytest

from .mailsink import Delivery
from .postfix import Mode
from .stack import (
    CLIENT_HELO,
    HOLD_RECIPIENT,
    RECIPIENT,
    Stack,
    new_message_id,
    requires_postfix,
    requires_root,
    running_stack,
    simple_message,
    smtp_error_codes,
)

pytestmark = [pytest.mark.e2e, requires_postfix, requires_root]


@pytest.fixture(scope="module", params=list(Mode), ids=lambda m: m.value)
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with running_stack(request.param, filter_kind="passthrough") as running:
        yield running


def _mid_is(message_id: str) -> Callable[[Delivery], bool]:
    return lambda d: d.header("Message-ID") == message_id


def test_mail_flows_through_the_filter_to_the_sink(stack: Stack) -> None:
    mid = new_message_id()
    assert stack.send(simple_message(mid, "harness ham")) == {}
    delivery = stack.sink.wait_for(_mid_is(mid))
    assert delivery.rcpt_tos == (RECIPIENT,)
    assert b"Hello from the e2e test." in delivery.data
    assert stack.passthrough is not None
    assert any(x.get("HELO") == CLIENT_HELO for x in stack.passthrough.seen_xforward)


def test_xforward_reaches_the_reinjection_listener(stack: Stack) -> None:
    mid = new_message_id()
    stack.send(simple_message(mid, "harness hold"), recipients=(HOLD_RECIPIENT,))
    stack.postfix.wait_log(rf"hold: RCPT .*to=<{HOLD_RECIPIENT}>")
    if stack.mode is Mode.AFTER_QUEUE:
        first = stack.postfix.queue_id_for(mid)
        second = stack.reinjected_queue_id(first)
        stack.postfix.wait_in_queue(second, "hold")
        attrs = stack.postcat_attributes(second)
        assert attrs["log_ident"] == first
    else:
        second = stack.postfix.queue_id_for(mid)
        stack.postfix.wait_in_queue(second, "hold")
        attrs = stack.postcat_attributes(second)
    assert attrs["log_helo_name"] == CLIENT_HELO
    assert attrs["log_client_address"] == "127.0.0.1"
    assert attrs["helo_name"] != CLIENT_HELO  # the filter's own EHLO: XFORWARD made the change


def test_filter_down_defers_then_delivers(stack: Stack) -> None:
    assert stack.passthrough is not None
    mid = new_message_id()
    stack.passthrough.stop()
    try:
        if stack.mode is Mode.AFTER_QUEUE:
            stack.send(simple_message(mid, "harness deferred"))
            qid = stack.postfix.queue_id_for(mid)
            stack.postfix.wait_log(rf"{qid}: to=<{RECIPIENT}>.*status=deferred")
            stack.postfix.wait_in_queue(qid, "deferred")
        else:
            with pytest.raises(smtplib.SMTPException) as refused:
                stack.send(simple_message(mid, "harness deferred"))
            codes = smtp_error_codes(refused.value)
            assert codes
            assert all(400 <= code < 500 for code in codes)
    finally:
        stack.passthrough.start()
    if stack.mode is Mode.AFTER_QUEUE:
        stack.postfix.flush()
    else:
        stack.send(simple_message(mid, "harness deferred"))
    stack.sink.wait_for(_mid_is(mid))
    assert len(stack.sink.matching(_mid_is(mid))) == 1
