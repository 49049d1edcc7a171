"""The per-command path of the ingress decides as aiosmtpd's own loop would, with less work.

The command loop looks a command up in a table made once per protocol class (the command
method and what the loop decides per command), tests a line against the extended length limits
only when it is longer than the basic one, and ``push`` writes a reply itself when nothing held
waits for the next hop. Each is checked here against the decision it replaces, through the real
ingress served in-process against a real next hop.
"""

from __future__ import annotations

import socket
import string
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.app import Daemon
from filterd.smtp_protocol import _GROUPABLE_REPLIES, FilterdSMTP
from tests.support.inprocess import serve_in_process
from tests.support.nexthop import NextHop

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nhi\r\n"


def _reply(reader: Any) -> bytes:
    """One whole reply (its last line), multi-line or not."""
    while (line := reader.readline())[3:4] == b"-":
        pass
    assert line, "connection closed"
    return bytes(line.rstrip(b"\r\n"))


def _exchange(port: int, greeting: bytes, line: bytes) -> bytes:
    """The reply to ``line`` after ``greeting`` (HELO or EHLO), in a session of its own."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        _reply(reader)
        sock.sendall(greeting + b" client.example\r\n")
        _reply(reader)
        sock.sendall(line + b"\r\n")
        reply = _reply(reader)
        sock.sendall(b"QUIT\r\n")
        _reply(reader)
        reader.close()
    return reply


def _limit_as_aiosmtpd_sets_it(greeting: bytes, command: bytes) -> int:
    """RFC 5321's 512 bytes; after EHLO, MAIL may be longer by its announced parameters (SIZE
    and SMTPUTF8) and filterd takes XFORWARD lines of up to 1000."""
    if greeting != b"EHLO":
        return 512
    return {b"MAIL": 512 + 26 + 10, b"XFORWARD": 1000}.get(command.upper(), 512)


def test_command_lines_are_held_to_the_limit_of_their_command(
    tmp_path: Path, nexthop: NextHop
) -> None:
    @settings(deadline=None, max_examples=60, database=None)
    @given(
        greeting=st.sampled_from([b"HELO", b"EHLO"]),
        command=st.sampled_from([b"MAIL", b"mail", b"RCPT", b"XFORWARD", b"Xforward", b"NOOP"]),
        length=st.one_of(
            st.sampled_from([511, 512, 513, 547, 548, 549, 999, 1000, 1001]),
            st.integers(min_value=400, max_value=1100),
        ),
    )
    def check(port: int, greeting: bytes, command: bytes, length: int) -> None:
        line = command + b" " + b"x" * (length - len(command) - 1)
        assert len(line) == length
        reply = _exchange(port, greeting, line)
        too_long = length > _limit_as_aiosmtpd_sets_it(greeting, command)
        assert (reply == b"500 5.5.2 Command line too long") is too_long, (reply, length)

    def client(port: int) -> None:
        check(port)  # type: ignore[call-arg]  # (hypothesis supplies the rest)

    serve_in_process(tmp_path, nexthop, client)


def _unknown_word() -> st.SearchStrategy[str]:
    return st.text(alphabet=string.ascii_uppercase + string.digits + "_", max_size=12)


def test_the_command_table_decides_as_the_loop_did_per_line(
    tmp_path: Path, nexthop: NextHop
) -> None:
    """For every command word, the table holds what the loop used to work out for each line:
    the protocol's own ``smtp_*`` method for the commands aiosmtpd knows (none for any other
    word), whether its reply may be held, whether its replies go without an enhanced code,
    and whether it waits for the next hop's replies to held RCPTs."""

    def compare(daemon: Daemon) -> None:
        protocol = FilterdSMTP(daemon.handler, daemon.handler.policy)
        table = protocol._command_table()
        known = sorted(protocol._smtp_method_names)
        assert "MAIL" in known
        assert "XFORWARD" in known

        @settings(deadline=None, max_examples=300, database=None)
        @given(st.one_of(st.sampled_from(known), _unknown_word()))
        def check(command: str) -> None:
            spec = table.get(command)
            if command not in protocol._smtp_method_names:
                assert spec is None
                return
            assert spec is not None
            method, groupable, plain_replies, settles_recipients = spec
            assert method is getattr(protocol, "smtp_" + command).__func__
            assert groupable is (command in _GROUPABLE_REPLIES)
            assert plain_replies is (command in ("HELO", "EHLO"))
            assert settles_recipients is (command != "RCPT")

        check()

    serve_in_process(tmp_path, nexthop, lambda port: None, after=compare)


class _FlushCountingSMTP(FilterdSMTP):  # type: ignore[misc]
    """The real protocol, counting the replies that take the general way out (_flush)."""

    flushes: ClassVar[int] = 0

    async def _flush(self) -> None:
        _FlushCountingSMTP.flushes += 1
        await super()._flush()


def _lock_step(port: int, lines: list[bytes]) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        replies = [_reply(reader)]
        for line in lines:
            sock.sendall(line)
            replies.append(_reply(reader))
        reader.close()
    return replies


def test_a_reply_with_nothing_held_is_written_by_push_itself(
    tmp_path: Path, nexthop: NextHop
) -> None:
    """Lock-step commands that need no next hop: their replies go out from push."""
    _FlushCountingSMTP.flushes = 0
    lines = [
        b"EHLO client.example\r\n",
        b"NOOP\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RSET\r\n",
        b"HELO client.example\r\n",
        b"QUIT\r\n",
    ]
    replies, _ = serve_in_process(
        tmp_path, nexthop, lambda port: _lock_step(port, lines), protocol=_FlushCountingSMTP
    )
    assert [reply[:3] for reply in replies[1:]] == [b"250", b"250", b"250", b"250", b"250", b"221"]
    assert replies[3].startswith(b"250 2.1.0 ")  # MAIL's, with its enhanced code
    # Only EHLO's, which writes its assembled lines with _flush itself.
    assert _FlushCountingSMTP.flushes == 1


def test_a_reply_held_for_the_next_hop_still_goes_the_general_way(
    tmp_path: Path, nexthop: NextHop
) -> None:
    """A RCPT's reply comes from the next hop: push leaves it to _flush, which settles it."""
    _FlushCountingSMTP.flushes = 0
    lines = [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.net>\r\n",
        b"DATA\r\n",
        MESSAGE + b".\r\n",
        b"QUIT\r\n",
    ]
    replies, _ = serve_in_process(
        tmp_path, nexthop, lambda port: _lock_step(port, lines), protocol=_FlushCountingSMTP
    )
    assert [reply[:3] for reply in replies[1:]] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    assert _FlushCountingSMTP.flushes == 2  # EHLO's and the RCPT's
    assert len(nexthop.messages) == 1
