"""STARTTLS on ingress (optional or required) and TLS to the next hop, with real handshakes."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest

from tests.support.certs import self_signed
from tests.support.daemon import Daemon
from tests.support.faultclient import RawClient
from tests.support.nexthop import NextHop

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is needed to make certificates"
)
PLAIN = b"From: a@example.org\r\nSubject: tls\r\n\r\nhello\r\n"


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text("rules: []\n")
    return path


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def test_starttls_on_ingress(tmp_path: Path, nexthop: NextHop, rules: Path) -> None:
    cert, key = self_signed(tmp_path)
    extra = {"tls": {"cert": str(cert), "key": str(key)}}
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            assert smtp.has_extn("starttls")
            smtp.starttls(context=client_context(cert))
            smtp.ehlo("client.test")
            assert not smtp.has_extn("starttls")
            assert smtp.sendmail("a@example.org", ["b@example.net"], PLAIN) == {}
    assert nexthop.wait_for(1)[0].data == PLAIN


def test_require_tls_refuses_mail_in_the_clear(
    tmp_path: Path, nexthop: NextHop, rules: Path
) -> None:
    cert, key = self_signed(tmp_path)
    extra = {"tls": {"cert": str(cert), "key": str(key), "require": True}}
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            code, _ = smtp.mail("a@example.org")
            assert code == 530
            smtp.starttls(context=client_context(cert))
            smtp.ehlo("client.test")
            assert smtp.sendmail("a@example.org", ["b@example.net"], PLAIN) == {}
    assert len(nexthop.wait_for(1)) == 1


def test_relay_tls_verified(tmp_path: Path, nexthop: NextHop, rules: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    nexthop.behaviour.tls_context = server
    extra = {"relay_tls": {"mode": "required", "ca_file": str(cert), "server_name": "localhost"}}
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp:
            assert smtp.sendmail("a@example.org", ["b@example.net"], PLAIN) == {}
    assert len(nexthop.wait_for(1)) == 1
    assert nexthop.tls_sessions == 1


def test_relay_tls_with_an_untrusted_certificate_is_a_451(
    tmp_path: Path, nexthop: NextHop, rules: Path
) -> None:
    cert, key = self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    nexthop.behaviour.tls_context = server
    extra = {"relay_tls": {"mode": "required"}}  # system CAs only: the self-signed cert fails
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@example.org")[0] == 250
            code, text = smtp.rcpt("b@example.net")
    assert (code, text[:5]) == (451, b"4.3.0")
    assert nexthop.messages == []


def test_relay_tls_required_but_not_offered_is_a_451(
    tmp_path: Path, nexthop: NextHop, rules: Path
) -> None:
    extra = {"relay_tls": {"mode": "required"}}
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@example.org")[0] == 250
            code, _ = smtp.rcpt("b@example.net")
    assert code == 451


def test_a_tls_client_vanishing_after_the_final_dot_still_gets_its_message_delivered(
    tmp_path: Path, nexthop: NextHop, rules: Path
) -> None:
    # The next hop may already have the message when the client goes, so the delivery must
    # complete and be logged once, over TLS as in the clear (the plain case, with its metrics,
    # is in tests/faults/test_client_faults.py).
    cert, key = self_signed(tmp_path)
    extra = {"tls": {"cert": str(cert), "key": str(key)}}
    nexthop.behaviour.delay["dot"] = 1.0
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        smtp = smtplib.SMTP("127.0.0.1", daemon.port, timeout=20)
        smtp.ehlo("client.test")
        smtp.starttls(context=client_context(cert))
        smtp.ehlo("client.test")
        assert smtp.mail("a@example.org")[0] == 250
        assert smtp.rcpt("b@example.net")[0] == 250
        smtp.putcmd("data")
        assert smtp.getreply()[0] == 354
        smtp.send(PLAIN + b".\r\n")
        deadline = time.monotonic() + 10
        while nexthop.data_ends < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert nexthop.data_ends == 1, "the message never reached the next hop"
        assert smtp.sock is not None
        # Gone (a reset) while the next hop holds its reply to the dot.
        smtp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        smtp.sock.close()
        [line] = daemon.wait_event("message_processed")
        assert line["action"] == "accept"
        assert line["reply"].startswith("250")
    assert [m.data for m in nexthop.wait_for(1)] == [PLAIN]


def test_a_client_silent_after_starttls_gives_its_connection_slot_back(
    tmp_path: Path, nexthop: NextHop, rules: Path
) -> None:
    """The session timer closes a connection whose TLS handshake never starts; asyncio then
    reports that handshake as finished, without an error, and no connection_lost follows.
    The session must still end, and give back its slot under max_connections."""
    cert, key = self_signed(tmp_path)
    extra = {
        "tls": {"cert": str(cert), "key": str(key)},
        "limits": {"session_timeout": 1, "max_connections": 1},
    }
    with Daemon(tmp_path, nexthop.port, rules=rules, extra=extra) as daemon:
        time.sleep(0.5)  # the start-up check's own connection is gone
        silent = RawClient(daemon.port)
        silent.ehlo()
        assert silent.command("STARTTLS").code == 220
        time.sleep(3)  # past the session timeout; the client never starts the handshake
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as next_client:
            banner = next_client.makefile("rb").readline()
        assert banner.startswith(b"220"), banner  # not 421: the slot is free again
        silent.close()
