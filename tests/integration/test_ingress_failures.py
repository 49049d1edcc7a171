"""Faults inside filterd while a session runs, and clients that stop playing along.

Each test serves the real ingress in-process against a real next hop on loopback and checks
what the client hears and what the next hop gets afterwards: an internal failure is answered
once, with a 4xx, and leaves the session in a state where the next command means what it says.
"""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

import pytest

import filterd.smtp
from filterd.actions.relay import RelayTransaction
from filterd.app import Daemon
from tests.support.faultclient import RawClient
from tests.support.inprocess import serve_in_process
from tests.support.nexthop import NextHop

# 144 KB: more than one chunk of the DATA reader, so the spool threshold below applies
BIG = b"From: a@example.org\r\nSubject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 2000
SMALL = b"From: c@example.org\r\nSubject: small\r\n\r\nhello\r\n"


def test_a_message_that_fails_inside_its_delivery_ends_its_transaction(
    tmp_path: Path, nexthop: NextHop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 5321: the final reply to DATA ends the transaction, whatever it is. After a 451 for
    a message filterd failed to read back from its spool, the client's next MAIL starts a new
    transaction: not a "503 nested MAIL", and no RCPT of it joins the failed one."""

    def unreadable_spool(path: str, limit: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(filterd.smtp, "read_prefix", unreadable_spool)

    def client(port: int) -> list[int]:
        with RawClient(port) as smtp:
            smtp.ehlo()
            codes = [smtp.command("MAIL FROM:<a@example.org>").code]
            codes.append(smtp.command("RCPT TO:<b@example.net>").code)
            codes.append(smtp.data(BIG).code)
            codes.append(smtp.command("MAIL FROM:<c@example.org>").code)
            codes.append(smtp.command("RCPT TO:<d@example.net>").code)
            codes.append(smtp.data(SMALL).code)
            smtp.command("QUIT")
        return codes

    codes, _ = serve_in_process(tmp_path, nexthop, client, limits={"spool_threshold": 1024})
    assert codes == [250, 250, 451, 250, 250, 250]
    [received] = nexthop.messages
    assert (received.sender, received.recipients) == ("c@example.org", ["d@example.net"])
    assert received.data.endswith(b"hello\r\n")


def test_a_fault_while_recipients_go_to_the_next_hop_is_answered_once(
    tmp_path: Path, nexthop: NextHop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of filterd's own (not a next-hop failure) while the held RCPTs go out: each
    command still gets exactly one reply, so the replies after it answer the right commands."""

    async def broken(self: RelayTransaction, recipients: list[str]) -> list[object]:
        raise RuntimeError("a fault in the relay client")

    monkeypatch.setattr(RelayTransaction, "add_recipients", broken)

    def client(port: int) -> tuple[list[str], int]:
        with RawClient(port) as smtp:
            smtp.ehlo()
            replies = [str(smtp.command("MAIL FROM:<a@example.org>"))]
            replies.append(str(smtp.command("RCPT TO:<b@example.net>")))
            replies.append(str(smtp.command("NOOP")))
            unasked = len(smtp.unasked_replies(0.5))
            smtp.command("QUIT")
        return replies, unasked

    (replies, unasked), _ = serve_in_process(tmp_path, nexthop, client)
    assert [reply[:3] for reply in replies] == ["250", "451", "250"]
    assert unasked == 0


def test_a_helo_name_that_is_not_utf8_travels_in_xforward(tmp_path: Path, nexthop: NextHop) -> None:
    """The name goes on to the next hop as the bytes the client sent (xtext-encoded), and the
    message is relayed."""

    def client(port: int) -> int:
        with RawClient(port) as smtp:
            smtp.command(b"EHLO h\xe9llo.example")
            code = smtp.sendmail("a@example.org", ["b@example.net"], SMALL).code
            smtp.command("QUIT")
        return code

    code, _ = serve_in_process(tmp_path, nexthop, client)
    assert code == 250
    [received] = nexthop.messages
    assert received.xforward["HELO"] == "h+E9llo.example"


QUARANTINE_ALL = """
rules:
  - {name: hold, if: {subject: {contains: hold}}, then: {action: quarantine}}
"""


def test_a_client_lost_after_its_message_leaves_the_next_hop_connection_pooled(
    tmp_path: Path, nexthop: NextHop
) -> None:
    """The delivery ends its next-hop transaction (an RSET, after a quarantine) as part of the
    delivery: a client that vanishes meanwhile must not cut that short and leave the
    connection neither pooled nor closed. The next message then reuses it."""
    quarantine = tmp_path / "state" / "quarantine"

    def client(port: int) -> int:
        smtp = RawClient(port)
        smtp.ehlo()
        smtp.command("MAIL FROM:<a@example.org>")
        smtp.command("RCPT TO:<b@example.net>")
        assert smtp.command("DATA").code == 354
        nexthop.behaviour.trickle = 0.1  # the RSET's reply now takes over a second
        smtp.send(b"Subject: hold this\r\n\r\nbody\r\n.\r\n")
        for _ in range(500):  # until the entry is on disk: filterd is at its RSET now
            if any(quarantine.glob("*.eml")):
                break
            time.sleep(0.01)
        smtp.abort()
        time.sleep(2.5)  # the RSET's reply has come in
        nexthop.behaviour.trickle = 0.0
        with RawClient(port) as second:
            second.ehlo()
            code = second.sendmail("c@example.org", ["d@example.net"], SMALL).code
            second.command("QUIT")
        return code

    code, _ = serve_in_process(tmp_path, nexthop, client, rules=QUARANTINE_ALL)
    assert code == 250
    assert len(nexthop.messages) == 1
    assert nexthop.connections == 1


def test_a_client_that_stops_reading_is_cut_off_at_the_session_timeout(
    tmp_path: Path, nexthop: NextHop
) -> None:
    """Once filterd's replies pile up unread, closing the connection would wait for ever for
    them to be taken: the session, and its connection slot, would never end."""

    def client(port: int) -> str:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(0.2)
        commands = b"HELP\r\n" * 10000
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline:  # write until filterd stops reading, then on
                try:
                    sock.send(commands)
                except TimeoutError:
                    time.sleep(0.2)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        finally:
            sock.close()
        return "still open after 15 s"

    def sessions(daemon: Daemon) -> int:
        return len(daemon.handler.protocols)

    (outcome, left), _ = serve_in_process(
        tmp_path, nexthop, client, limits={"session_timeout": 1.0}, after=sessions
    )
    assert outcome == "reset"
    assert left == 0
