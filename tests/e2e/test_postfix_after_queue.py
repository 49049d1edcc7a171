"""filterd behind a real Postfix as an after-queue filter (FILTER_README).

client → Postfix smtpd (content_filter=filterd:[127.0.0.1]:F) → queue → smtp transport "filterd"
(XFORWARD on) → filterd serve (shipped rules) → re-injection smtpd 127.0.0.1:R → queue → sink.
A message the filter refuses is bounced by Postfix (a DSN to the sender reaches the sink).
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator

import pytest

from .mailsink import Delivery, MailSink
from .postfix import Mode, Ports, PostfixInstance
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
)

pytestmark = [pytest.mark.e2e, requires_postfix, requires_root]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(Mode.AFTER_QUEUE) as running:
        yield running


def bounce_for(message_id: str, sender: str = SENDER) -> Callable[[Delivery], bool]:
    """A Postfix DSN (null sender) to ``sender`` that returns the message ``message_id``."""
    return lambda d: (
        d.mail_from in ("", "<>") and sender in d.rcpt_tos and message_id.encode() in d.data
    )


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
    event = stack.running_filterd.message_event(mid)
    assert event["action"] == "accept"


@pytest.mark.parametrize("name", manifest_files("reject"))
def test_reject_is_bounced_by_postfix(stack: Stack, name: str) -> None:
    mid = new_message_id()
    assert stack.send(corpus_message(name, mid)) == {}  # after-queue: Postfix took it
    event = stack.running_filterd.message_event(mid)
    assert event["action"] == "reject"
    dsn = stack.sink.wait_for(bounce_for(mid))
    report = dsn.data.decode("utf-8", "replace")
    assert "Action: failed" in report
    assert "Status: 5." in report
    first = stack.postfix.queue_id_for(mid)
    stack.postfix.wait_log(rf"{first}: removed")
    assert stack.sink.matching(delivered(mid)) == []


@pytest.mark.parametrize("name", manifest_files("quarantine"))
def test_quarantine_keeps_the_message_out_of_the_mailbox(stack: Stack, name: str) -> None:
    mid = new_message_id()
    raw = corpus_message(name, mid)
    assert stack.send(raw) == {}
    event = stack.running_filterd.message_event(mid)
    assert event["action"] == "quarantine"
    first = stack.postfix.queue_id_for(mid)
    # Postfix handed it over with a 250: the filter owns it now, nothing is retried or bounced.
    stack.postfix.wait_log(rf"{first}: to=<{RECIPIENT}>, relay=127\.0\.0\.1.*status=sent")
    stack.postfix.wait_log(rf"{first}: removed")
    assert stack.sink.matching(delivered(mid)) == []
    assert stack.sink.matching(bounce_for(mid)) == []
    subject = header_of(raw, "Subject")
    entries = stack.running_filterd.quarantine_list()
    assert any(
        e["sender"] == SENDER and RECIPIENT in e["recipients"] and e["subject"] == subject
        for e in entries
    ), entries


def test_xforward_is_seen_logged_and_passed_on(stack: Stack) -> None:
    mid = new_message_id()
    stack.send(simple_message(mid, "xforward check"), recipients=(HOLD_RECIPIENT,))
    first = stack.postfix.queue_id_for(mid)
    # Seen: filterd's line carries Postfix's queue id and the original client's HELO.
    event = stack.running_filterd.message_event(mid)
    assert event["queue_id"] == first
    assert event["helo"] == CLIENT_HELO
    assert event["client_ip"] == "127.0.0.1"
    # Passed on: the re-injection listener got the original client, HELO and queue id.
    second = stack.reinjected_queue_id(first)
    stack.postfix.wait_in_queue(second, "hold")
    attrs = stack.postcat_attributes(second)
    assert attrs["log_ident"] == first
    assert attrs["log_helo_name"] == CLIENT_HELO
    assert attrs["log_client_address"] == "127.0.0.1"


def test_recipient_refused_by_reinjection_is_bounced_alone(stack: Stack) -> None:
    mid = new_message_id()
    assert (
        stack.send(simple_message(mid, "one refused"), recipients=(RECIPIENT, REFUSED_RECIPIENT))
        == {}
    )
    first = stack.postfix.queue_id_for(mid)
    stack.sink.wait_for(delivered(mid))
    dsn = stack.sink.wait_for(bounce_for(mid))
    report = dsn.data.decode("utf-8", "replace")
    assert f"Final-Recipient: rfc822; {REFUSED_RECIPIENT}" in report
    assert "Status: 5.1.1" in report
    stack.postfix.wait_log(rf"{first}: removed")
    # Exactly one copy for the accepted recipient: no retry of the whole message.
    copies = stack.sink.matching(delivered(mid))
    assert [c.rcpt_tos for c in copies] == [(RECIPIENT,)]


def test_filterd_down_defers_and_nothing_is_lost(stack: Stack) -> None:
    filterd = stack.running_filterd
    mid = new_message_id()
    assert filterd.stop() == 0  # SIGTERM: drain and exit 0
    try:
        assert stack.send(corpus_message("ham-plain.eml", mid)) == {}
        first = stack.postfix.queue_id_for(mid)
        stack.postfix.wait_log(rf"{first}: to=<{RECIPIENT}>.*status=deferred")
        stack.postfix.wait_in_queue(first, "deferred")
    finally:
        filterd.start()
    stack.postfix.flush()
    stack.sink.wait_for(delivered(mid))
    stack.postfix.wait_log(rf"{first}: removed")
    assert len(stack.sink.matching(delivered(mid))) == 1
    assert filterd.message_event(mid)["queue_id"] == first


def test_undo_releases_mail_queued_for_filterd() -> None:
    """docs/postfix.md's undo: mail already queued for filterd goes straight out after it."""
    ports = Ports.pick()  # filterd never listens on ports.filter here: it is "gone"
    with MailSink(ports.sink) as sink, PostfixInstance(Mode.AFTER_QUEUE, ports) as postfix:
        mid = new_message_id()
        with smtplib.SMTP("127.0.0.1", ports.smtp, local_hostname=CLIENT_HELO) as client:
            client.sendmail(SENDER, [RECIPIENT], simple_message(mid, "queued for filterd"))
        first = postfix.queue_id_for(mid)
        # The try at filterd failed and the message waits, queued for filterd. Usually in the
        # deferred queue; right after `postfix start` qmgr has been seen to put it back into
        # incoming instead ("skipped, still being delivered": see kick_incoming_scan). The
        # undo requeues both.
        postfix.wait_log(rf"{first}: to=<{RECIPIENT}>.*status=deferred")
        postfix.wait_in_queue(first, "deferred", or_in="incoming")
        started = time.monotonic()
        postfix.undo_filter()
        delivery = sink.wait_for(delivered(mid), timeout=90)
        print(f"delivered {time.monotonic() - started:.1f}s after the undo")
        assert delivery.rcpt_tos == (RECIPIENT,)
        assert postfix.queue() == []
