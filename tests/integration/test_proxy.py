"""The proxy core over real loopback sockets: filterd as a subprocess, a real next hop."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import CORPUS, corpus_manifest
from tests.support.daemon import Daemon
from tests.support.faultclient import RawClient
from tests.support.nexthop import NextHop

EMPTY_RULES = "rules: []\n"
PLAIN = (
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\nhello\r\n"
)


@pytest.fixture
def empty_rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(EMPTY_RULES)
    return path


@pytest.fixture
def daemon(tmp_path: Path, nexthop: NextHop, empty_rules: Path):
    with Daemon(tmp_path, nexthop.port, rules=empty_rules) as running:
        yield running


def client(port: int) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=20)
    smtp.ehlo("client.test")
    return smtp


def normalise(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_ehlo_announces_the_extensions(daemon: Daemon) -> None:
    with client(daemon.port) as smtp:
        for extension in (
            "size",
            "8bitmime",
            "smtputf8",
            "enhancedstatuscodes",
            "xforward",
            "pipelining",
        ):
            assert smtp.has_extn(extension), extension
        assert smtp.esmtp_features["size"] == str(10485760)


def test_plain_message_is_relayed_byte_for_byte(daemon: Daemon, nexthop: NextHop) -> None:
    with client(daemon.port) as smtp:
        refused = smtp.sendmail("a@example.org", ["b@example.net"], PLAIN)
    assert refused == {}
    [received] = nexthop.wait_for(1)
    assert received.data == PLAIN
    assert received.sender == "a@example.org"
    assert received.recipients == ["b@example.net"]
    [line] = daemon.wait_event("message_processed")
    assert line["action"] == "accept"
    assert line["message_id"] == "<m1@example.org>"
    assert line["next_hop_reply"].startswith("250")


@pytest.mark.parametrize("entry", corpus_manifest(), ids=lambda e: str(e["file"]))
def test_every_corpus_message_arrives_intact_without_rules(
    tmp_path: Path, nexthop: NextHop, empty_rules: Path, entry: dict
) -> None:
    raw = (CORPUS / str(entry["file"])).read_bytes()
    sender = "" if "null-sender" in str(entry["file"]) else "sender@example.org"
    recipient = "bob@example.net"
    options = ["SMTPUTF8"] if "smtputf8" in str(entry["file"]) else []
    with Daemon(tmp_path, nexthop.port, rules=empty_rules) as daemon, client(daemon.port) as smtp:
        smtp.sendmail(sender, [recipient], raw, mail_options=options)
    [received] = nexthop.wait_for(1)
    # smtplib sends bytes as they are and appends CRLF unless the message already ends in CRLF
    assert received.data == normalise(raw) + (b"" if raw.endswith(b"\r\n") else b"\r\n")
    assert received.sender == sender


def test_a_recipient_refused_by_the_next_hop_is_refused_and_the_other_delivered(
    daemon: Daemon, nexthop: NextHop
) -> None:
    nexthop.behaviour.refuse_rcpt["nobody@example.net"] = (
        "550 5.1.1 <nobody@example.net>: User unknown"
    )
    with client(daemon.port) as smtp:
        refused = smtp.sendmail("a@example.org", ["b@example.net", "nobody@example.net"], PLAIN)
    assert refused == {"nobody@example.net": (550, b"5.1.1 <nobody@example.net>: User unknown")}
    [received] = nexthop.wait_for(1)
    assert received.recipients == ["b@example.net"]


def test_a_next_hop_recipient_reply_without_an_enhanced_code_gets_one(
    daemon: Daemon, nexthop: NextHop
) -> None:
    # ENHANCEDSTATUSCODES is filterd's promise to its client, whatever the next hop says.
    nexthop.behaviour.refuse_rcpt["nobody@example.net"] = "550 No such user here"
    with client(daemon.port) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@example.org")[0] == 250
        assert smtp.rcpt("nobody@example.net") == (550, b"5.0.0 No such user here")


def test_next_hop_down_gives_451_at_the_first_rcpt(tmp_path: Path, empty_rules: Path) -> None:
    from tests.support.daemon import free_port

    # MAIL travels to the next hop with the first RCPT, so that is where its failure shows.
    with Daemon(tmp_path, free_port(), rules=empty_rules) as daemon, client(daemon.port) as smtp:
        assert smtp.mail("a@example.org")[0] == 250
        code, text = smtp.rcpt("b@example.net")
        assert smtp.docmd("DATA")[0] == 451
    assert code == 451
    assert text.startswith(b"4.3.0")


def test_a_sender_the_next_hop_refuses_is_refused_at_rcpt(daemon: Daemon, nexthop: NextHop) -> None:
    nexthop.behaviour.mail_reply = "550 5.7.1 Sender refused here"
    with client(daemon.port) as smtp:
        assert smtp.mail("a@example.org")[0] == 250
        first = smtp.rcpt("b@example.net")
        second = smtp.rcpt("c@example.net")  # MAIL is tried again, and refused again
        assert smtp.docmd("DATA")[0] == 554  # no recipient was accepted
    assert first == (550, b"5.7.1 Sender refused here")
    assert second == first
    assert nexthop.messages == []


@pytest.mark.parametrize(
    ("final", "expected"),
    [
        ("452 4.3.1 Insufficient system storage", 452),
        ("554 5.7.1 Rejected by the next hop", 554),
    ],
)
def test_the_next_hops_final_reply_is_passed_on(
    daemon: Daemon, nexthop: NextHop, final: str, expected: int
) -> None:
    nexthop.behaviour.final_reply = final
    with client(daemon.port) as smtp, pytest.raises(smtplib.SMTPDataError) as error:
        smtp.sendmail("a@example.org", ["b@example.net"], PLAIN)
    assert error.value.smtp_code == expected
    assert nexthop.messages == []


@pytest.mark.parametrize("stage", ["mid-data", "dot", "data"])
def test_next_hop_closing_during_data_gives_451(
    daemon: Daemon, nexthop: NextHop, stage: str
) -> None:
    nexthop.behaviour.close_at = stage
    with client(daemon.port) as smtp, pytest.raises(smtplib.SMTPDataError) as error:
        smtp.sendmail("a@example.org", ["b@example.net"], PLAIN * 3)
    assert error.value.smtp_code == 451
    [line] = daemon.wait_event("message_processed")
    assert line["action"] == "tempfail"


def test_next_hop_stalling_gives_451_after_relay_timeout(daemon: Daemon, nexthop: NextHop) -> None:
    nexthop.behaviour.stall_at = "dot"
    started = time.monotonic()
    with client(daemon.port) as smtp, pytest.raises(smtplib.SMTPDataError) as error:
        smtp.sendmail("a@example.org", ["b@example.net"], PLAIN)
    assert error.value.smtp_code == 451
    assert time.monotonic() - started >= 4  # relay_timeout is 5 s in the test config


def test_null_sender_survives(daemon: Daemon, nexthop: NextHop) -> None:
    with client(daemon.port) as smtp:
        smtp.sendmail("<>", ["b@example.net"], PLAIN)
    [received] = nexthop.wait_for(1)
    assert received.sender == ""


def test_smtputf8_address_survives(daemon: Daemon, nexthop: NextHop) -> None:
    with client(daemon.port) as smtp:
        smtp.sendmail(
            "jörg@例え.jp",
            ["bøb@example.net"],
            "Subject: ü\r\n\r\nbody\r\n".encode(),
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    [received] = nexthop.wait_for(1)
    assert received.sender == "jörg@例え.jp"
    assert received.recipients == ["bøb@example.net"]
    assert "SMTPUTF8" in received.mail_params


def test_size_over_the_limit_is_refused_at_mail_and_at_data(
    tmp_path: Path, nexthop: NextHop, empty_rules: Path
) -> None:
    extra = {"limits": {"max_message_size": 2000}}
    with (
        Daemon(tmp_path, nexthop.port, rules=empty_rules, extra=extra) as daemon,
        client(daemon.port) as smtp,
    ):
        code, text = smtp.mail("a@example.org", ["SIZE=5000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        smtp.rset()
        # without SIZE= the limit is enforced on the data itself
        assert smtp.mail("a@example.org")[0] == 250
        assert smtp.rcpt("b@example.net")[0] == 250
        code, text = smtp.data(PLAIN + b"x" * 5000 + b"\r\n")
        assert (code, text[:5]) == (552, b"5.3.4")
        # the session is still usable afterwards
        assert smtp.sendmail("a@example.org", ["b@example.net"], PLAIN) == {}
        # The refused message has its one line too (and its count): every message whose
        # data came in is accounted for, also one no rule ever saw.
        refused, delivered = daemon.wait_event("message_processed", 2)
    assert len(nexthop.wait_for(1)) == 1
    assert refused["action"] == refused["verdict"] == "reject"
    assert refused["reply"].startswith("552 5.3.4")
    assert refused["reason"] == "larger than max_message_size"
    assert refused["size"] > 5000
    assert (refused["sender"], refused["recipients"]) == ("a@example.org", 1)
    assert delivered["action"] == "accept"


def test_help_lists_every_command_a_client_uses(daemon: Daemon) -> None:
    with client(daemon.port) as smtp:
        code, text = smtp.docmd("HELP")
        assert code == 250
        listed = set(text.decode().removeprefix("2.0.0 Supported commands: ").split())
        assert {
            "EHLO",
            "HELO",
            "MAIL",
            "RCPT",
            "DATA",
            "RSET",
            "NOOP",
            "QUIT",
            "XFORWARD",
        } <= listed
        assert "STARTTLS" not in listed  # no TLS configured here
        assert smtp.docmd("HELP MAIL") == (
            250,
            b"2.0.0 Syntax: MAIL FROM: <address> [SP <mail-parameters>]",
        )
        assert smtp.docmd("HELP DATA") == (250, b"2.0.0 Syntax: DATA")


def test_every_reply_but_the_greeting_and_helo_carries_an_enhanced_code(daemon: Daemon) -> None:
    """ENHANCEDSTATUSCODES is announced, so (RFC 2034) every reply but the greeting and the
    replies to HELO/EHLO carries an RFC 3463 code: also aiosmtpd's own refusals."""
    commands = [
        "RCPT TO:<b@example.net>",  # 503 need MAIL
        "MAIL FROM:<a@example.org>",
        "MAIL FROM:<a@example.org>",  # 503 nested MAIL
        "RCPT TO:<b@example.net> NOTIFY=NEVER",  # 501: parameters after HELO
        "RCPT TO:<b@example.net>",
        "BOGUS",  # 500 not recognized
        "VRFY someone",  # 252
        "EXPN list",  # 502
        "NOOP",
        "RSET",
        "QUIT now",  # 501 syntax
    ]
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        sock.sendall(b"HELO client.example.org\r\n")
        helo = reader.readline()
        replies = []
        for command in commands:
            sock.sendall(command.encode() + b"\r\n")
            replies.append(reader.readline().decode().rstrip("\r\n"))
        sock.sendall(b"QUIT\r\n")
        replies.append(reader.readline().decode().rstrip("\r\n"))
    assert greeting.startswith(b"220 ")
    assert not greeting[4:5].isdigit()
    assert helo.startswith(b"250 ")
    assert not helo[4:5].isdigit()
    for command, reply in zip([*commands, "QUIT"], replies, strict=True):
        assert re.fullmatch(r"\d{3} [245]\.\d{1,3}\.\d{1,3} .+", reply), (command, reply)
        assert reply[4] == reply[0], (command, reply)  # the same class
    assert [reply[:3] for reply in replies] == [
        "503",
        "250",
        "503",
        "501",
        "250",
        "500",
        "252",
        "502",
        "250",
        "250",
        "501",
        "221",
    ]


def test_command_line_limits_hold_in_every_session(daemon: Daemon) -> None:
    """RFC 5321's 512 bytes per command line, plus what SIZE and SMTPUTF8 add to MAIL (26 and
    10): the same in the hundredth session as in the first, however many EHLOs came before."""
    mail_limit = 512 + 26 + 10
    for _ in range(5):
        with client(daemon.port) as smtp:
            smtp.ehlo("again.test")
    for _ in range(2):
        with client(daemon.port) as smtp:
            # The line is "MAIL FROM:<...>" plus CRLF; its length without CRLF is what counts.
            fits = "a" * (mail_limit - len("MAIL FROM:<@example.org>")) + "@example.org"
            assert smtp.mail(fits)[0] == 250
            smtp.rset()
            assert smtp.mail(fits + "a")[0] == 500
            assert smtp.noop()[0] == 250  # the session goes on
            # 512 bytes exactly pass (NOOP may carry a string), one more does not.
            assert smtp.docmd("NOOP " + "x" * 507)[0] == 250
            assert smtp.docmd("NOOP " + "x" * 508)[0] == 500


def test_long_lines_bare_lf_and_a_lone_dot_pass(daemon: Daemon, nexthop: NextHop) -> None:
    long_line = b"x" * 5000
    raw = b"Subject: odd\r\n\r\n" + long_line + b"\r\n.\r\n..two\r\nend\r\n"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        f = sock.makefile("rwb")
        f.readline()
        for command in (
            b"EHLO c.test",
            b"MAIL FROM:<a@example.org>",
            b"RCPT TO:<b@example.net>",
            b"DATA",
        ):
            f.write(command + b"\r\n")
            f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
        assert reply.startswith(b"354")
        # dot-stuffed as a client must send it; a bare-LF line inside too
        f.write(
            b"Subject: odd\r\n\r\n" + long_line + b"\r\n..\r\n...two\r\nbare\nlf\r\nend\r\n.\r\n"
        )
        f.flush()
        assert f.readline().startswith(b"250")
    [received] = nexthop.wait_for(1)
    assert received.data == raw.replace(b"end\r\n", b"bare\r\nlf\r\nend\r\n")


def test_smuggled_end_of_data_does_not_split_the_message(daemon: Daemon, nexthop: NextHop) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        f = sock.makefile("rwb")
        f.readline()
        for command in (
            b"EHLO c.test",
            b"MAIL FROM:<a@example.org>",
            b"RCPT TO:<b@example.net>",
            b"DATA",
        ):
            f.write(command + b"\r\n")
            f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
        f.write(
            b"Subject: one\r\n\r\nbody\n.\r\n"
            b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<x@example.net>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\n.\r\n"
        )
        f.flush()
        assert f.readline().startswith(b"250")
    received = nexthop.wait_for(2, timeout=2)
    assert len(received) == 1
    assert b"smuggled" in received[0].data  # it stayed part of the one message


def test_xforward_from_the_client_is_logged_and_passed_on(daemon: Daemon, nexthop: NextHop) -> None:
    with client(daemon.port) as smtp:
        code, _ = smtp.docmd(
            "XFORWARD", "NAME=mx.example.org ADDR=192.0.2.7 PROTO=ESMTP HELO=mx.example.org"
        )
        assert code == 250
        code, _ = smtp.docmd("XFORWARD", "IDENT=4AbCdE SOURCE=REMOTE PORT=[UNAVAILABLE]")
        assert code == 250
        smtp.sendmail("a@example.org", ["b@example.net"], PLAIN)
        smtp.sendmail(
            "a@example.org", ["b@example.net"], PLAIN
        )  # XFORWARD is reset per transaction
    first, second = nexthop.wait_for(2)
    assert first.xforward["ADDR"] == "192.0.2.7"
    assert first.xforward["HELO"] == "mx.example.org"
    assert first.xforward["IDENT"] == "4AbCdE"
    assert "PORT" not in first.xforward
    assert second.xforward["ADDR"] == "127.0.0.1"
    lines = daemon.wait_event("message_processed", 2)
    assert lines[0]["queue_id"] == "4AbCdE"
    assert lines[0]["client_ip"] == "192.0.2.7"
    assert lines[0]["helo"] == "mx.example.org"
    assert lines[1]["queue_id"] is None


def test_clients_outside_networks_get_554(
    tmp_path: Path, nexthop: NextHop, empty_rules: Path
) -> None:
    extra = {"networks": ["10.0.0.0/8"]}
    with Daemon(tmp_path, nexthop.port, rules=empty_rules, extra=extra) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
            assert sock.makefile("rb").readline().startswith(b"554 5.7.1")
        lines = daemon.wait_event("connection_refused")  # the launcher's port probe counts too
        assert lines
        assert {line["reason"] for line in lines} == {"acl"}


def test_max_connections_gives_421(tmp_path: Path, nexthop: NextHop, empty_rules: Path) -> None:
    extra = {"limits": {"max_connections": 2}}
    with Daemon(tmp_path, nexthop.port, rules=empty_rules, extra=extra) as daemon:
        held = [client(daemon.port) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
            assert sock.makefile("rb").readline().startswith(b"421 4.7.0")
        for smtp in held:
            smtp.quit()


def test_max_recipients_gives_452(tmp_path: Path, nexthop: NextHop, empty_rules: Path) -> None:
    extra = {"limits": {"max_recipients": 3}}
    with (
        Daemon(tmp_path, nexthop.port, rules=empty_rules, extra=extra) as daemon,
        client(daemon.port) as smtp,
    ):
        smtp.mail("a@example.org")
        codes = [smtp.rcpt(f"r{i}@example.net")[0] for i in range(5)]
    assert codes == [250, 250, 250, 452, 452]


def test_idle_session_times_out(tmp_path: Path, nexthop: NextHop, empty_rules: Path) -> None:
    extra = {"limits": {"session_timeout": 1}}
    with Daemon(tmp_path, nexthop.port, rules=empty_rules, extra=extra) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            time.sleep(2)
            assert reader.readline() == b""  # closed by the server


def test_each_command_restarts_the_session_timeout(
    tmp_path: Path, nexthop: NextHop, empty_rules: Path
) -> None:
    extra = {"limits": {"session_timeout": 1}}
    with Daemon(tmp_path, nexthop.port, rules=empty_rules, extra=extra) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            started = time.monotonic()
            for _ in range(6):  # 2.4 s of activity, more than two timeout periods
                time.sleep(0.4)
                sock.sendall(b"NOOP\r\n")
                assert reader.readline().startswith(b"250")
            assert time.monotonic() - started > 2
            time.sleep(1.6)  # then idle for longer than the timeout
            assert reader.readline() == b""


def test_sigterm_lets_an_in_flight_message_finish_and_exits_0(
    tmp_path: Path, nexthop: NextHop, empty_rules: Path
) -> None:
    nexthop.behaviour.delay["dot"] = 1.5
    result: dict[str, object] = {}
    daemon = Daemon(tmp_path, nexthop.port, rules=empty_rules).start()

    def send() -> None:
        smtp = client(daemon.port)
        result["refused"] = smtp.sendmail("a@example.org", ["b@example.net"], PLAIN)
        # No QUIT: the draining daemon may already have said 421 and closed the session.
        smtp.close()

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.7)  # the message now waits for the next hop's final reply
    daemon.signal(signal.SIGTERM)
    sender.join(15)
    assert result["refused"] == {}
    assert len(nexthop.wait_for(1)) == 1
    assert daemon.wait() == 0
    assert daemon.events("daemon_stopped")


def test_sigterm_answers_421_to_idle_sessions(
    tmp_path: Path, nexthop: NextHop, empty_rules: Path
) -> None:
    daemon = Daemon(tmp_path, nexthop.port, rules=empty_rules).start()
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()
    daemon.signal(signal.SIGTERM)
    assert reader.readline().startswith(b"421")
    sock.close()
    assert daemon.wait() == 0


def test_a_client_that_half_closes_after_quit_still_gets_its_replies(
    daemon: Daemon, nexthop: NextHop
) -> None:
    """Exim writes the end of data and QUIT, then shuts down its sending side."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO exim.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        replies = [reader.readline() for _ in range(3)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"354"]
        sock.sendall(PLAIN + b".\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert reader.readline().startswith(b"250")
        assert reader.readline().startswith(b"221")
        assert reader.readline() == b""
    assert len(nexthop.wait_for(1)) == 1
    time.sleep(0.3)
    assert len(nexthop.messages) == 1


def test_an_address_with_a_line_break_is_refused(daemon: Daemon, nexthop: NextHop) -> None:
    # A quoted local part may carry a bare CR, and aiosmtpd's parser drops the quotes: relayed,
    # it would split the next hop's command line at a next hop that ends lines at a bare CR.
    with RawClient(daemon.port) as smtp:
        smtp.ehlo()
        assert smtp.command(b'MAIL FROM:<"a\rRSET"@example.org>').code == 501
        assert smtp.command("MAIL FROM:<a@example.org>").code == 250
        assert smtp.command(b'RCPT TO:<"b\rRSET"@example.net>').code == 501
        assert smtp.command("RCPT TO:<b@example.net>").code == 250
        assert smtp.data(PLAIN).code == 250
    [received] = nexthop.wait_for(1)
    assert received.recipients == ["b@example.net"]
    assert not any(b"\r" in line.rstrip(b"\r\n") for line in nexthop.commands)
