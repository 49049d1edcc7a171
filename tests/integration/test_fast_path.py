"""The fast path answers exactly as the command loop does.

``FilterdSMTP`` answers the common commands (MAIL, RCPT within a group, RSET, NOOP, HELO,
XFORWARD, QUIT) right in ``data_received`` and hands everything else to aiosmtpd's command
methods. Each session below runs twice, against a real next hop: with the fast path and with
every command going through the command loop. What the client hears (every reply line, and in
how many writes) and what the next hop receives must be the same, for the common forms and for
the uncommon ones the fast path must leave to the command loop.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from filterd.smtp_protocol import FilterdSMTP
from tests.support.inprocess import serve_in_process
from tests.support.nexthop import NextHop

BODY = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"


class CommandLoopOnly(FilterdSMTP):
    fast_path = False


@dataclass(frozen=True)
class Step:
    """Bytes to send, then how many replies to read before the next step."""

    send: bytes
    replies: int


def _session(*steps: Step) -> tuple[Step, ...]:
    return steps


SESSIONS: dict[str, tuple[Step, ...]] = {
    "lock-step, as smtp-source": _session(
        Step(b"HELO client.example.org\r\n", 1),
        Step(b"MAIL FROM:<a@example.org>\r\n", 1),
        Step(b"RCPT TO:<b@example.net>\r\n", 1),
        Step(b"DATA\r\n", 1),
        Step(BODY, 1),
        Step(b"QUIT\r\n", 1),
    ),
    "pipelined, as Postfix": _session(
        Step(b"EHLO client.example.org\r\n", 1),
        Step(
            b"XFORWARD NAME=mx.example.org ADDR=192.0.2.1\r\n"
            b"XFORWARD PROTO=ESMTP HELO=mx.example.org IDENT=4Q1\r\n"
            b"MAIL FROM:<a@example.org> SIZE=45 BODY=8BITMIME\r\n"
            b"RCPT TO:<b@example.net>\r\nRCPT TO:<refused@example.net>\r\n"
            b"RCPT TO:<c@example.net>\r\nDATA\r\n",
            7,
        ),
        Step(BODY, 1),
        Step(b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n", 4),
        Step(BODY, 1),
        Step(b"QUIT\r\n", 1),
    ),
    "uncommon but valid forms": _session(
        Step(b"helo client.example.org\n", 1),
        Step(b"mail from: <a@example.org>\n", 1),
        Step(b'rcpt to:<"quoted local"@example.net>\r\n', 1),
        Step(b"RCPT TO:<b@example.net>\r\n", 1),
        Step(b"NOOP anything\r\nNOOP\r\n", 2),
        Step(b"RSET\r\n", 1),
        Step(b"EHLO client.example.org\r\n", 1),
        Step(b"MAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT TO:<b@example.net>\r\nDATA\r\n", 3),
        Step(BODY, 1),
        Step(b"MAIL FROM:<a@example.org>SIZE=10\r\nRSET\r\n", 2),
        Step(b"HELO again.example.org\r\nQUIT\r\n", 2),
    ),
    "refusals": _session(
        Step(b"MAIL FROM:<a@example.org>\r\n", 1),
        Step(b"XFORWARD ADDR=192.0.2.1\r\n", 1),
        Step(b"HELO\r\n", 1),
        Step(b"EHLO client.example.org\r\n", 1),
        Step(b"RCPT TO:<b@example.net>\r\nNOOP\r\n", 2),
        Step(b"XFORWARD BOGUS=1\r\nXFORWARD ADDR\r\n", 2),
        Step(b"MAIL FROM:<a@example.org> SIZE=999999999999\r\n", 1),
        Step(b"MAIL FROM:<a@example.org> FOO=1\r\nMAIL FROM:<a@example.org> BODY=9BIT\r\n", 2),
        Step(b"MAIL FROM:<a@example.org>\r\nMAIL FROM:<c@example.org>\r\n", 2),
        Step(b"XFORWARD ADDR=192.0.2.9\r\nRCPT TO:<b@example.net> NOTIFY=NEVER\r\n", 2),
        Step(b"RCPT TO:<>\r\nRCPT TO:<c@example.net>\r\n", 2),
        Step(b"RSET now\r\nQUIT now\r\n\r\nBOGUS\r\n", 4),
        Step(b"RCPT TO:<x@example.net>\r\nRCPT TO:<y@example.net>\r\nRSET\r\n", 3),
        Step(b"QUIT\r\nNOOP\r\n", 1),
    ),
    "too many recipients in one group": _session(
        Step(b"EHLO client.example.org\r\n", 1),
        Step(
            b"MAIL FROM:<a@example.org>\r\n"
            + b"".join(b"RCPT TO:<r%d@example.net>\r\n" % n for n in range(5))
            + b"DATA\r\n",
            7,
        ),
        Step(BODY, 1),
        Step(b"QUIT\r\n", 1),
    ),
}


def _talk(port: int, steps: tuple[Step, ...]) -> list[bytes]:
    """Every reply line the client reads, then what comes after its last step."""
    lines: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        buffer = b""

        def read_replies(count: int) -> None:
            nonlocal buffer
            finals = 0
            while finals < count:
                while b"\n" not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        lines.append(b"<closed>")
                        return
                    buffer += chunk
                line, _, buffer = buffer.partition(b"\n")
                lines.append(line)
                if line[3:4] != b"-":
                    finals += 1

        read_replies(1)  # the greeting
        for step in steps:
            sock.sendall(step.send)
            read_replies(step.replies)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            lines.append(b"<after> " + chunk)
    return lines


def _run(
    tmp_path: Path, nexthop: NextHop, protocol: type[FilterdSMTP], steps: tuple[Step, ...]
) -> tuple[list[bytes], list[tuple[str, list[str], bytes, dict[str, str], list[str]]]]:
    nexthop.messages.clear()
    nexthop.behaviour.refuse_rcpt = {"refused@example.net": "550 5.1.1 No such user"}
    transcript, _ = serve_in_process(
        tmp_path,
        nexthop,
        lambda port: _talk(port, steps),
        protocol=protocol,
        limits={"max_recipients": 3},
    )
    received = [
        (m.sender, m.recipients, m.data, m.xforward, m.mail_params) for m in nexthop.messages
    ]
    return transcript, received


@pytest.mark.parametrize("name", SESSIONS)
def test_the_fast_path_answers_as_the_command_loop_does(
    tmp_path: Path, nexthop: NextHop, name: str
) -> None:
    steps = SESSIONS[name]
    fast = _run(tmp_path / "fast", nexthop, FilterdSMTP, steps)
    loop_only = _run(tmp_path / "loop", nexthop, CommandLoopOnly, steps)
    assert fast == loop_only
    finals = [line for line in fast[0] if line[:1].isdigit() and line[3:4] != b"-"]
    assert len(finals) == 1 + sum(step.replies for step in steps)  # the session really ran


def test_the_common_commands_never_reach_aiosmtpd(
    tmp_path: Path, nexthop: NextHop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a message costs at one session is mostly the commands around it: in their common
    forms they are answered without aiosmtpd's command methods (and the coroutines, the
    stream reader and the hooks they bring). DATA and a lone RCPT still are its: they wait."""
    called: list[str] = []
    for command in ("HELO", "MAIL", "RCPT", "RSET", "NOOP", "QUIT", "XFORWARD", "DATA"):
        original = getattr(FilterdSMTP, "smtp_" + command)

        def counting(self: FilterdSMTP, arg: str | None, _o=original, _c=command) -> object:
            called.append(_c)
            return _o(self, arg)

        monkeypatch.setattr(FilterdSMTP, "smtp_" + command, counting)
    steps = (
        Step(b"HELO client.example.org\r\n", 1),
        Step(b"NOOP\r\nRSET\r\n", 2),
        Step(b"XFORWARD ADDR=192.0.2.1\r\nMAIL FROM:<a@example.org>\r\n", 2),
        Step(b"RCPT TO:<b@example.net>\r\n", 1),
        Step(b"DATA\r\n", 1),
        Step(BODY, 1),
        Step(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRSET\r\n", 3),
        Step(b"QUIT\r\n", 1),
    )
    _, received = _run(tmp_path, nexthop, FilterdSMTP, steps)
    assert called == ["RCPT", "DATA", "RSET"]
    assert len(received) == 1
