"""A misbehaving client: vanishing mid-DATA or right after the final dot, commands out of order,
pipelining it was not offered, end-of-data smuggling, 10,000 recipients, 1 MB lines, NUL bytes.

Each must leave exactly the messages the client was told 250 for (one per transaction, never a
smuggled second one), keep the accounting (log line and metrics per message that reached the
next hop) and leave the daemon serving.
"""

from __future__ import annotations

import re
import socket
import time
from collections import Counter
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path

import pytest

from tests.faults.accounting import delta, message, messages_by_action, token_of
from tests.faults.conftest import assert_still_serving, new_token, write_rules
from tests.support.daemon import Daemon
from tests.support.faultclient import RawClient, ServerClosed, scrape, stuff, value, wait_until
from tests.support.nexthop import NextHop

# A place where a lenient receiver (one that takes a bare CR or LF as a line end) sees the end
# of the data: a lone dot between any two line endings.
_LENIENT_END = re.compile(rb"(?:\r\n|\r|\n)\.(?:\r\n|\r|\n)")


def _delivered(hop: NextHop, token: str) -> list[bytes]:
    return [m.data for m in list(hop.messages) if token_of(m.data) == token]


def _processed(daemon: Daemon, token: str) -> list[dict[str, object]]:
    return [
        e
        for e in daemon.events("message_processed")
        if e.get("message_id") == f"<{token}@faults.test>"
    ]


def _sessions(daemon: Daemon) -> float:
    assert daemon.metrics_port is not None
    return value(scrape(daemon.metrics_port), "filterd_sessions_active")


def _open_transaction(client: RawClient) -> None:
    client.ehlo()
    assert client.command("MAIL FROM:<sender@example.org>").code == 250
    assert client.command("RCPT TO:<rcpt@example.net>").code == 250
    assert client.command("DATA").code == 354


# --- vanishing clients ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["reset", "close"])
@pytest.mark.parametrize("where", ["after-354", "mid-data", "mid-line"])
def test_a_client_vanishing_during_data_leaves_nothing_behind(
    filterd: Daemon, hop: NextHop, where: str, how: str
) -> None:
    # no other session is open in this module between tests (the daemon's start-up probe and
    # the previous test's sessions may take a moment to be counted out)
    assert wait_until(lambda: _sessions(filterd) == 0, timeout=5)
    token = new_token("vanish")
    client = RawClient(filterd.port)
    _open_transaction(client)
    if where != "after-354":
        partial = message(token, body=b"line\r\n" * 2000)
        client.send(partial if where == "mid-data" else partial + b"an unfinished li")
    time.sleep(0.2)
    client.abort() if how == "reset" else client.close()

    assert wait_until(lambda: _sessions(filterd) == 0, timeout=5), "the session was not closed"
    time.sleep(0.3)
    assert _delivered(hop, token) == []
    assert _processed(filterd, token) == []  # nothing was decided: the client was told nothing
    assert_still_serving(filterd, hop)


def test_a_client_vanishing_after_the_final_dot_is_still_accounted(
    filterd: Daemon, hop: NextHop
) -> None:
    # The client gives up while filterd waits for the next hop's final reply. Whatever happens
    # to the message then, the books must agree: if the next hop has it, filterd must have
    # logged and counted it (an MTA retries, and the operator must be able to see why the
    # recipient got it twice).
    assert filterd.metrics_port is not None
    before = messages_by_action(scrape(filterd.metrics_port))
    hop.behaviour.delay["dot"] = 1.0
    token = new_token("gone")
    ends = hop.data_ends
    client = RawClient(filterd.port)
    _open_transaction(client)
    client.send(stuff(message(token)))
    assert wait_until(lambda: hop.data_ends > ends, timeout=5), (
        "the message never reached the next hop"
    )
    client.abort()  # the next hop has the whole message and is about to say 250
    time.sleep(2.0)

    delivered = len(_delivered(hop, token))
    counted = delta(messages_by_action(scrape(filterd.metrics_port)), before)
    logged = _processed(filterd, token)
    assert delivered == 1, "the next hop should have queued it"
    assert [line.get("action") for line in logged] == ["accept"], (
        "the next hop delivered a message that filterd never logged"
    )
    assert dict(counted) == {"accept": 1}, (
        f"metrics counted {dict(counted)} for a delivered message"
    )


# --- protocol abuse -------------------------------------------------------------------------------


def test_commands_out_of_order_are_refused_and_the_session_goes_on(
    filterd: Daemon, hop: NextHop
) -> None:
    before = hop.count()
    with RawClient(filterd.port) as client:
        replies = {
            "MAIL before EHLO": client.command("MAIL FROM:<sender@example.org>"),
            "RCPT before EHLO": client.command("RCPT TO:<rcpt@example.net>"),
            "DATA before EHLO": client.command("DATA"),
        }
        client.ehlo()
        replies |= {
            "RCPT before MAIL": client.command("RCPT TO:<rcpt@example.net>"),
            "DATA before MAIL": client.command("DATA"),
            "BDAT unoffered": client.command("BDAT 10 LAST"),
            "AUTH unoffered": client.command("AUTH PLAIN AGZvbwBiYXI="),
            "garbage": client.command("\x01\x02 what"),
        }
        assert client.command("MAIL FROM:<sender@example.org>").code == 250
        replies |= {
            "nested MAIL": client.command("MAIL FROM:<other@example.org>"),
            "DATA before RCPT": client.command("DATA"),
            "XFORWARD inside a transaction": client.command("XFORWARD ADDR=192.0.2.1"),
        }
        client.ehlo()  # EHLO resets the transaction
        replies["DATA after EHLO reset"] = client.command("DATA")
        for what, reply in replies.items():
            assert 500 <= reply.code < 600, f"{what}: {reply}"
        assert_still_serving(filterd, hop, client)
    assert hop.count() == before + 1  # only the clean message


@pytest.mark.parametrize("greet", ["HELO", "EHLO-before-greeting"])
def test_pipelining_without_being_offered_gives_one_reply_per_command_and_one_message_each(
    filterd: Daemon, hop: NextHop, greet: str
) -> None:
    tokens = [new_token("pipe"), new_token("pipe")]
    transactions = b"".join(
        b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
        + stuff(message(t))
        for t in tokens
    )
    with socket.create_connection(("127.0.0.1", filterd.port), timeout=15) as sock:
        reader = sock.makefile("rb")
        if greet == "HELO":  # HELO: no extensions at all, so no PIPELINING
            assert reader.readline().startswith(b"220")
            sock.sendall(b"HELO client.test\r\n" + transactions + b"QUIT\r\n")
        else:  # everything at once, before the greeting was even read
            sock.sendall(b"EHLO client.test\r\n" + transactions + b"QUIT\r\n")
            assert reader.readline().startswith(b"220")
        codes = []
        for _ in range(10):
            line = reader.readline()
            while line[3:4] == b"-":
                line = reader.readline()
            codes.append(int(line[:3]))
    assert codes == [250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
    for token in tokens:
        assert len(_delivered(hop, token)) == 1


SMUGGLING = {
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.LF": b"\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CR": b"\r.\r",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "CRLF.NUL-CRLF": b"\r\n.\x00\r\n",
}


def _wire(data: bytes) -> bytes:
    """The bytes filterd sent to the next hop for ``data`` (the next hop un-stuffed them)."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def _smuggle(filterd: Daemon, sequence: bytes) -> tuple[str, str]:
    """Send one message with ``sequence`` and a whole second transaction inside its data."""
    token = new_token("smuggle")
    evil = new_token("smuggled")
    payload = (
        message(token, body=b"before")
        + sequence
        + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        + message(evil, subject="smuggled")
        + b".\r\n"
    )
    with RawClient(filterd.port) as client:
        _open_transaction(client)
        client.send(payload)
        reply = client.read_reply()
        assert reply.code == 250, str(reply)
        assert client.command("NOOP").code == 250  # nothing is left over in the input
    return token, evil


@pytest.mark.parametrize("sequence", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_smuggled_end_of_data_yields_exactly_one_message(
    filterd: Daemon, hop: NextHop, sequence: bytes
) -> None:
    token, evil = _smuggle(filterd, sequence)
    time.sleep(0.2)
    [data] = _delivered(hop, token)
    assert _delivered(hop, evil) == [], "a second message was smuggled through"
    assert b"victim@example.net" in data  # the smuggled part stayed inside the one message
    assert not any(m.recipients == ["victim@example.net"] for m in hop.messages)
    assert b"\n" not in data.replace(b"\r\n", b"")  # no bare LF reaches the next hop


@pytest.mark.parametrize("sequence", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_no_end_of_data_a_lenient_next_hop_would_see_is_forwarded(
    filterd: Daemon, hop: NextHop, sequence: bytes
) -> None:
    # The next hop we pass the message to must not be able to see an end of data in it either,
    # even if it takes a bare CR or LF for a line end (Cisco Secure Email's "clean" mode turns
    # them into CRLF, which makes <CR>.<CR> an end of data; SMTP smuggling, SEC Consult 2023).
    token, _ = _smuggle(filterd, sequence)
    [data] = _delivered(hop, token)
    lenient = _LENIENT_END.search(_wire(data))
    assert lenient is None, (
        f"filterd forwarded {lenient.group()!r}: a next hop that accepts bare CR/LF line endings "
        "would end the message there and read the rest as SMTP commands"
    )


def test_ten_thousand_recipients_are_capped_and_one_message_goes_through(
    filterd: Daemon, hop: NextHop
) -> None:
    assert filterd.metrics_port is not None
    before = messages_by_action(scrape(filterd.metrics_port))
    token = new_token("rcpts")
    with RawClient(filterd.port, timeout=60) as client:
        client.ehlo()
        rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(10_000))
        client.send(b"MAIL FROM:<sender@example.org>\r\n" + rcpts)
        replies = client.read_replies(10_001)
        codes = Counter(r.code for r in replies[1:])
        assert replies[0].code == 250
        assert codes == {250: 1000, 452: 9000}  # limits.max_recipients defaults to 1000
        assert all(r.code == 250 for r in replies[1:1001])  # the first 1000, in order
        assert client.data(message(token)).code == 250
        assert_still_serving(filterd, hop, client)
    [received] = [m for m in hop.messages if token_of(m.data) == token]
    assert received.recipients == [f"r{i}@example.net" for i in range(1000)]
    assert delta(messages_by_action(scrape(filterd.metrics_port)), before) == {"accept": 2}


@pytest.mark.parametrize("subject", ["plain", "quarantine-me"])
def test_a_one_megabyte_header_line_is_kept_intact(
    filterd: Daemon, hop: NextHop, subject: str
) -> None:
    token = new_token("bighdr")
    body = message(token, subject=subject, extra_headers=b"X-Huge: " + b"h" * (1 << 20) + b"\r\n")
    with RawClient(filterd.port, timeout=60) as client:
        client.ehlo()
        reply = client.sendmail("sender@example.org", ["rcpt@example.net"], body)
    assert reply.code == 250, str(reply)
    if subject == "plain":
        assert _delivered(hop, token) == [body]
    else:
        [entry] = [
            p
            for p in (filterd.workdir / "state" / "quarantine").glob("*.eml")
            if token_of(p.read_bytes()) == token
        ]
        assert entry.read_bytes() == body


@pytest.mark.parametrize(
    "padding", [1000, 1100 * 1024], ids=["small-header", "header-past-spool-threshold"]
)
def test_forged_spam_headers_are_removed_wherever_they_sit_in_the_header(
    filterd: Daemon, hop: NextHop, padding: int
) -> None:
    # "Incoming X-Spam-* headers are removed first so senders cannot forge them": also when the
    # header block is longer than limits.spool_threshold (1 MiB), where the message is spooled.
    token = new_token("forged")
    forged = (
        b"X-Spam-Flag: NO\r\nX-Pad: "
        + b"p" * padding
        + b"\r\n"
        + b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-50\r\nx-spam-score:-50\r\n"
    )
    with RawClient(filterd.port, timeout=60) as client:
        client.ehlo()
        reply = client.sendmail(
            "sender@example.org", ["rcpt@example.net"], message(token, extra_headers=forged)
        )
    assert reply.code == 250, str(reply)
    [data] = _delivered(hop, token)
    survivors = [
        line[:60]
        for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        if line.lower().startswith(b"x-spam-")
    ]
    assert survivors == [], f"forged verdict headers reached the next hop: {survivors}"


def test_a_forged_spam_header_behind_a_bare_cr_does_not_reach_the_next_hop(
    filterd: Daemon, hop: NextHop
) -> None:
    # filterd's header editor splits lines at LF only, so "MIME-Version: 1.0<CR>X-Spam-Flag: NO"
    # is one field to it and survives; a reader that ends lines at a bare CR (Python's email
    # package, and whatever a next hop in "clean" mode turns bare CRs into) sees the forgery.
    token = new_token("cr-forged")
    forged = b"MIME-Version: 1.0\rX-Spam-Flag: NO\rX-Spam-Status: No, score=-50\r\n"
    with RawClient(filterd.port) as client:
        client.ehlo()
        reply = client.sendmail(
            "sender@example.org", ["rcpt@example.net"], message(token, extra_headers=forged)
        )
    assert reply.code == 250, str(reply)
    [data] = _delivered(hop, token)
    seen = [
        name
        for name in message_from_bytes(data, policy=compat32)
        if name.lower().startswith("x-spam")
    ]
    assert seen == [], f"a reader that ends lines at a bare CR sees forged {seen}"


def test_a_one_megabyte_command_line_is_refused_and_the_session_goes_on(
    filterd: Daemon, hop: NextHop
) -> None:
    with RawClient(filterd.port) as client:
        client.ehlo()
        assert client.command(b"MAIL FROM:<" + b"a" * (1 << 20) + b"@example.org>").code == 500
        assert client.command(b"NOOP " + b"x" * (1 << 20)).code == 500
        assert_still_serving(filterd, hop, client)


def test_nul_bytes_pass_in_content_and_are_refused_in_commands(
    filterd: Daemon, hop: NextHop
) -> None:
    token = new_token("nul")
    body = message(
        token, subject="n\x00l", extra_headers=b"X-N\x00l: a\x00b\r\n", body=b"b\x00dy\r\n\x00\r\n"
    )
    with RawClient(filterd.port) as client:
        client.ehlo()
        for line in (b"\x00", b"MA\x00IL FROM:<a@example.org>", b"\x00\x00\x00\x00 \x00"):
            reply = client.command(line)
            assert 500 <= reply.code < 600, f"{line!r}: {reply}"
        reply = client.sendmail("sender@example.org", ["rcpt@example.net"], body)
        assert reply.code == 250, str(reply)
        assert_still_serving(filterd, hop, client)
    assert _delivered(hop, token) == [body]


def test_a_client_flooding_unknown_commands_is_disconnected_and_others_are_served(
    filterd: Daemon, hop: NextHop
) -> None:
    with RawClient(filterd.port) as client:
        client.ehlo()
        client.send(b"".join(b"JUNK%d\r\n" % i for i in range(200)))
        last = None
        try:
            while True:
                last = client.read_reply()
        except ServerClosed:
            pass
    assert last is not None
    assert last.code in (421, 502), f"last reply before the close: {last}"
    assert_still_serving(filterd, hop)


def _peak_rss_kb(pid: int) -> int:
    found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert found is not None
    return int(found.group(1))


@pytest.mark.parametrize("line_end", [b"", b"\r"], ids=["no-line-end", "bare-cr"])
def test_an_oversized_message_without_line_feeds_is_dropped_as_it_comes(
    tmp_path_factory: pytest.TempPathFactory, hop: NextHop, line_end: bytes
) -> None:
    """Past max_message_size the rest of DATA is read and dropped, whatever its lines look
    like: data without a single LF (one long line, or bare CRs) used to stay in memory, and
    was searched again at every chunk."""
    work = tmp_path_factory.mktemp("oversized")
    extra = {"limits": {"max_message_size": "1M"}}
    with Daemon(work, hop.port, rules=write_rules(work), extra=extra) as daemon:
        assert daemon.proc is not None
        before = _peak_rss_kb(daemon.proc.pid)
        with RawClient(daemon.port) as client:
            client.ehlo()
            client.command("MAIL FROM:<a@example.org>")
            client.command("RCPT TO:<b@example.net>")
            assert client.command("DATA").code == 354
            chunk = (b"x" * 999 + line_end) * 1024  # 1 MB without a line feed
            for _ in range(60):
                client.send(chunk)
            client.send(b"\r\n.\r\n")
            reply = client.read_reply()
        assert reply.code == 552
        grown = _peak_rss_kb(daemon.proc.pid) - before
        assert grown < 20_000, f"peak RSS grew by {grown} kB for 60 MB of refused data"
