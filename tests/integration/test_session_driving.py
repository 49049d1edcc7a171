"""How a session's coroutine is driven: straight from the protocol's callbacks while it only
waits for the client, by a task while it waits on anything else (FilterdSMTP._advance).

Commands that need no I/O must be answered without any task (the point: each task step costs
an event-loop pass per command); a session that relays a message hands over to a task for the
next hop's replies and still delivers. This runs the real ingress in-process, so the tasks it
creates are visible, against a real next hop on loopback.
"""

from __future__ import annotations

import functools
import smtplib
import socket
import struct
from pathlib import Path
from typing import Any, ClassVar

from filterd.smtp_protocol import FilterdSMTP
from tests.support.inprocess import serve_in_process
from tests.support.nexthop import NextHop

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\nMessage-ID: <m@example.org>\r\n\r\nhi\r\n"


def _commands_only(port: int) -> list[int]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        codes = [smtp.ehlo()[0], smtp.noop()[0], smtp.mail("a@example.org")[0]]
        codes += [smtp.rset()[0], smtp.helo()[0]]
    return codes


def _one_message(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("a@example.org", ["b@example.net"], MESSAGE)


def test_commands_without_io_are_answered_without_any_task(
    tmp_path: Path, nexthop: NextHop
) -> None:
    codes, created = serve_in_process(tmp_path, nexthop, _commands_only)
    assert codes == [250, 250, 250, 250, 250]
    # aiosmtpd would have run this session in a task of its own (asyncio's own event loop
    # also makes one to accept each connection: not the session's).
    assert [name for name in created if "_accept_connection" not in name] == []


def test_waiting_on_the_next_hop_hands_the_session_to_a_task_and_back(
    tmp_path: Path, nexthop: NextHop
) -> None:
    _, created = serve_in_process(tmp_path, nexthop, _one_message)
    assert len(nexthop.messages) == 1
    # One task for the RCPT (connecting to the next hop and its reply), one for the delivery;
    # each ends when the session waits for the client again, so the commands in between run
    # without one. (Connecting may add asyncio's own helper task for its timeout.)
    resumptions = [name for name in created if name.startswith("_Resumption")]
    assert len(resumptions) == 2, created


def _reset_after_ehlo(port: int) -> int:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()  # the greeting
    sock.sendall(b"EHLO client.example\r\n")
    while (line := reader.readline())[3:4] == b"-":
        pass
    # Close with a reset (SO_LINGER 0) while the session waits for the next command.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reader.close()  # the socket's file descriptor closes only once its file object has
    sock.close()
    return int(line[:3])


def test_a_reset_while_waiting_for_a_command_ends_the_session_quietly(
    tmp_path: Path, nexthop: NextHop
) -> None:
    """The reset's error lands on the future the session waits on; ending the session must
    consume it, or asyncio reports "exception was never retrieved" for every such client."""
    reports: list[dict[str, Any]] = []
    code, _ = serve_in_process(tmp_path, nexthop, _reset_after_ehlo, reports)
    assert code == 250
    assert reports == []


class _WriteRecordingSMTP(FilterdSMTP):  # type: ignore[misc]
    """The real protocol, with every write it makes to its client recorded."""

    writes: ClassVar[list[bytes]] = []

    def _cb_client_connected(self, reader: Any, writer: Any) -> None:
        super()._cb_client_connected(reader, writer)
        write = writer.write

        def recording_write(data: bytes) -> None:
            _WriteRecordingSMTP.writes.append(bytes(data))
            write(data)

        writer.write = recording_write


def _ehlo_then_quit(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        return smtp.ehlo("client.example")


def test_the_ehlo_reply_is_written_at_once(tmp_path: Path, nexthop: NextHop) -> None:
    """Each write is a TCP segment that wakes the client: aiosmtpd wrote the EHLO reply a line
    at a time (eight writes), and an MTA says EHLO on every connection."""
    _WriteRecordingSMTP.writes = []
    (code, text), _ = serve_in_process(
        tmp_path, nexthop, _ehlo_then_quit, protocol=_WriteRecordingSMTP
    )
    assert code == 250
    assert b"PIPELINING" in text
    assert b"XFORWARD" in text
    replies = [w for w in _WriteRecordingSMTP.writes if w.startswith(b"250")]
    ehlo = replies[0]
    assert ehlo.startswith(b"250-"), replies
    assert ehlo.endswith(b"250 HELP\r\n"), replies
    assert ehlo.count(b"\r\n") == len(text.splitlines())  # every line of the reply


def _pipelined_transaction(port: int) -> list[bytes]:
    """As Postfix sends a message to a filter that offers PIPELINING: XFORWARD, MAIL, RCPT and
    DATA in one write, then the message once all four replies are in."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()  # the greeting
    sock.sendall(b"EHLO client.example\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    sock.sendall(
        b"XFORWARD NAME=mx.example.org ADDR=192.0.2.1\r\nMAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<b@example.net>\r\nDATA\r\n"
    )
    replies = [reader.readline() for _ in range(4)]
    sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
    replies += [reader.readline(), reader.readline()]
    reader.close()
    sock.close()
    return replies


def test_replies_to_a_pipelined_group_are_written_together(
    tmp_path: Path, nexthop: NextHop
) -> None:
    _WriteRecordingSMTP.writes = []
    replies, _ = serve_in_process(
        tmp_path, nexthop, _pipelined_transaction, protocol=_WriteRecordingSMTP
    )
    assert [reply[:3] for reply in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    assert len(nexthop.messages) == 1
    # XFORWARD, MAIL and RCPT wait for the 354 and go with it (RFC 2920, 3.2).
    grouped = [
        w
        for w in _WriteRecordingSMTP.writes
        if w.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    ]
    assert len(grouped) == 1, _WriteRecordingSMTP.writes
    assert grouped[0].count(b"\r\n") == 4


def _two_writes_after_helo(
    first: bytes, replies_to_first: int, then: bytes, replies_to_then: int, port: int
) -> list[bytes]:
    """HELO, then ``first`` in one write and its replies, then ``then`` and its replies."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()  # the greeting
    sock.sendall(b"HELO client.example\r\n")
    reader.readline()
    replies: list[bytes] = []
    for data, count in ((first, replies_to_first), (then, replies_to_then)):
        sock.sendall(data)
        replies += [reader.readline() for _ in range(count)]
    reader.close()
    sock.close()
    return replies


def test_a_reply_waits_only_for_a_whole_command(tmp_path: Path, nexthop: NextHop) -> None:
    # The reply to MAIL must not wait for a command that is not complete yet.
    client = functools.partial(
        _two_writes_after_helo,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@exa",
        1,
        b"mple.net>\r\nQUIT\r\n",
        2,
    )
    replies, _ = serve_in_process(tmp_path, nexthop, client)
    assert [reply[:3] for reply in replies] == [b"250", b"250", b"221"]


class _FailingEhloSMTP(FilterdSMTP):  # type: ignore[misc]
    """The real protocol, with an EHLO whose handler hook fails."""

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command == "EHLO":
            raise RuntimeError("EHLO hook failed")
        return await super()._call_handler_hook(command, *args)


def test_a_failed_ehlo_keeps_the_replies_held_before_it(tmp_path: Path, nexthop: NextHop) -> None:
    """MAIL's reply waits for the EHLO after it; EHLO failing drops its own lines, not that."""
    client = functools.partial(
        _two_writes_after_helo,
        b"MAIL FROM:<a@example.org>\r\nEHLO client.example\r\n",
        2,
        b"QUIT\r\n",
        1,
    )
    replies, _ = serve_in_process(tmp_path, nexthop, client, protocol=_FailingEhloSMTP)
    assert [reply[:3] for reply in replies] == [b"250", b"451", b"221"]
