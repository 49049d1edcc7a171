"""filterd in front of the queue as a Postfix before-queue proxy (SMTPD_PROXY_README).

client → Postfix smtpd (smtpd_proxy_filter=127.0.0.1:F) → filterd serve (shipped rules) →
re-injection smtpd 127.0.0.1:R → queue → sink. filterd's answers reach the client in the SMTP
dialogue: a reject is a 5xx at end of DATA, a refused recipient a 5xx at RCPT, and no bounce is
ever made.
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
    REFUSED_RECIPIENT,
    SENDER,
    Stack,
    body_of,
    corpus_message,
    delivered,
    header_of,
    manifest_files,
    new_message_id,
    requires_postfix,
    requires_root,
    running_stack,
    simple_message,
    smtp_error_codes,
)

pytestmark = [pytest.mark.e2e, requires_postfix, requires_root]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(Mode.BEFORE_QUEUE) as running:
        yield running


def any_copy(message_id: str) -> Callable[[Delivery], bool]:
    """Any sink delivery that carries the message, as itself or inside a bounce."""
    return lambda d: message_id.encode() in d.data


@pytest.mark.parametrize(
    ("name", "sender"), [("ham-plain.eml", SENDER), ("ham-bounce-null-sender.eml", "")]
)
def test_ham_is_delivered_unchanged(stack: Stack, name: str, sender: str) -> None:
    mid = new_message_id()
    raw = corpus_message(name, mid)
    assert stack.send(raw, sender=sender) == {}
    delivery = stack.sink.wait_for(delivered(mid))
    assert delivery.rcpt_tos == (RECIPIENT,)
    assert delivery.mail_from in ((sender,) if sender else ("", "<>"))
    assert body_of(delivery.data) == body_of(raw)
    assert delivery.header("Subject") == header_of(raw, "Subject")
    assert stack.running_filterd.message_event(mid)["action"] == "accept"


@pytest.mark.parametrize("name", manifest_files("reject"))
def test_reject_reaches_the_client_in_the_dialogue(stack: Stack, name: str) -> None:
    mid = new_message_id()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        stack.send(corpus_message(name, mid))
    assert 500 <= refused.value.smtp_code < 600
    event = stack.running_filterd.message_event(mid)
    assert event["action"] == "reject"
    # Refused in the dialogue: nothing queued (the hold queue has other tests' mail), nothing
    # delivered, no bounce.
    assert [m for m in stack.postfix.queue() if m["queue_name"] != "hold"] == []
    assert stack.sink.matching(any_copy(mid)) == []


@pytest.mark.parametrize("name", manifest_files("quarantine"))
def test_quarantine_accepts_and_keeps_the_message(stack: Stack, name: str) -> None:
    mid = new_message_id()
    raw = corpus_message(name, mid)
    assert stack.send(raw) == {}  # the client sees 250: the quarantine copy is safe
    assert stack.running_filterd.message_event(mid)["action"] == "quarantine"
    assert stack.sink.matching(any_copy(mid)) == []
    subject = header_of(raw, "Subject")
    entries = stack.running_filterd.quarantine_list()
    assert any(
        e["sender"] == SENDER and RECIPIENT in e["recipients"] and e["subject"] == subject
        for e in entries
    ), entries


def test_xforward_is_seen_logged_and_passed_on(stack: Stack) -> None:
    mid = new_message_id()
    assert stack.send(simple_message(mid, "xforward check"), recipients=(HOLD_RECIPIENT,)) == {}
    event = stack.running_filterd.message_event(mid)
    assert event["helo"] == CLIENT_HELO
    assert event["client_ip"] == "127.0.0.1"
    # Before the queue there is no queue id yet: Postfix sends IDENT=[UNAVAILABLE], which
    # is "no value" (XFORWARD_README), not an id to log.
    assert event.get("queue_id") != "[UNAVAILABLE]"
    queued = stack.postfix.queue_id_for(mid)  # made by the re-injection listener
    stack.postfix.wait_in_queue(queued, "hold")
    attrs = stack.postcat_attributes(queued)
    assert attrs["log_helo_name"] == CLIENT_HELO
    assert attrs["log_client_address"] == "127.0.0.1"


def test_recipient_refused_by_reinjection_reaches_the_client(stack: Stack) -> None:
    mid = new_message_id()
    refused = stack.send(
        simple_message(mid, "one refused"), recipients=(RECIPIENT, REFUSED_RECIPIENT)
    )
    assert set(refused) == {REFUSED_RECIPIENT}
    code, text = refused[REFUSED_RECIPIENT]
    assert code == 550
    assert b"5.1.1" in text
    stack.sink.wait_for(delivered(mid))
    assert [d.rcpt_tos for d in stack.sink.matching(any_copy(mid))] == [(RECIPIENT,)]


def test_filterd_down_tempfails_and_nothing_is_lost(stack: Stack) -> None:
    filterd = stack.running_filterd
    mid = new_message_id()
    raw = corpus_message("ham-plain.eml", mid)
    assert filterd.stop() == 0
    try:
        with pytest.raises(smtplib.SMTPException) as refused:
            stack.send(raw)
        codes = smtp_error_codes(refused.value)
        assert codes
        assert all(400 <= code < 500 for code in codes)  # the client keeps it and retries
    finally:
        filterd.start()
    assert stack.send(raw) == {}  # the client's retry
    stack.sink.wait_for(delivered(mid))
    assert len(stack.sink.matching(any_copy(mid))) == 1
