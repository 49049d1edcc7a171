"""The whole mail path of an end-to-end test, started and stopped as one.

Owns: the "Internet" side (an SMTP client with a chosen HELO), the private Postfix, the filter
in the middle (``filterd serve`` or the passthrough stand-in), and the sink at the end; plus
helpers that load corpus messages under a fresh Message-ID, so every test can find its own mail
in the Postfix log, the filterd log and the sink.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from .filterd_proc import FilterdProcess
from .mailsink import Delivery, MailSink, PassthroughFilter
from .postfix import POSTFIX, Mode, Ports, PostfixInstance

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
CLIENT_HELO = "e2e-client.example"
SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
# The re-injection listener's access map: one recipient it refuses, one it puts on hold (so a
# test can read the queue file and see what XFORWARD carried).
REFUSED_RECIPIENT = "refused@example.net"
REFUSED_REPLY = "550 5.1.1 Recipient refused by the re-injection listener"
HOLD_RECIPIENT = "hold@example.net"
REINJECT_ACCESS = {
    REFUSED_RECIPIENT: REFUSED_REPLY,
    HOLD_RECIPIENT: "HOLD kept for inspection",
}

requires_postfix = pytest.mark.skipif(
    not (POSTFIX.exists() and shutil.which("postcat")),
    reason="Postfix is not installed (Debian package postfix; .ci/run installs it)",
)
requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="a private Postfix instance must be started as root"
)


def manifest_files(expect: str) -> list[str]:
    """Corpus files whose MANIFEST expectation is exactly ``expect`` ("reject", "quarantine")."""
    entries = json.loads((CORPUS / "MANIFEST.json").read_text())
    return [e["file"] for e in entries if e["expect"] == expect]


def header_of(raw: bytes, name: str) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return str(msg.get(name, ""))


def body_of(raw: bytes) -> bytes:
    """The bytes after the header block (CRLF-normalised)."""
    return raw.replace(b"\r\n", b"\n").partition(b"\n\n")[2]


def new_message_id() -> str:
    return f"<{uuid.uuid4().hex}@e2e.filterd.test>"


def corpus_message(name: str, message_id: str) -> bytes:
    """A corpus .eml with its Message-ID replaced (or added), CRLF line endings."""
    raw = (CORPUS / name).read_bytes().replace(b"\r\n", b"\n")
    head, sep, body = raw.partition(b"\n\n")
    lines = [ln for ln in head.split(b"\n") if not re.match(rb"(?i)message-id:", ln)]
    lines.insert(0, b"Message-ID: " + message_id.encode())
    return (b"\n".join(lines) + sep + body).replace(b"\n", b"\r\n")


def simple_message(
    message_id: str, subject: str, body: str = "Hello from the e2e test.\n"
) -> bytes:
    text = (
        f"From: Alice <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: {subject}\n"
        f"Message-ID: {message_id}\nDate: Mon, 30 Nov 2026 09:00:00 +0000\n"
        f"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n{body}"
    )
    return text.replace("\n", "\r\n").encode()


def smtp_error_codes(exc: smtplib.SMTPException) -> set[int]:
    """The reply codes a failed ``sendmail`` carried, whichever command refused it."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return {code for code, _ in exc.recipients.values()}
    if isinstance(exc, smtplib.SMTPResponseException):
        return {exc.smtp_code}
    return set()


def delivered(message_id: str, rcpt: str = RECIPIENT) -> Callable[[Delivery], bool]:
    """The sink delivery of message ``message_id`` to ``rcpt``."""
    return lambda d: d.header("Message-ID") == message_id and rcpt in d.rcpt_tos


@dataclass
class Stack:
    mode: Mode
    ports: Ports
    workdir: Path
    sink: MailSink
    postfix: PostfixInstance
    filterd: FilterdProcess | None = None
    passthrough: PassthroughFilter | None = None

    @property
    def running_filterd(self) -> FilterdProcess:
        """filterd of this stack (the harness self-test runs a stack without it)."""
        assert self.filterd is not None
        return self.filterd

    def send(
        self,
        raw: bytes,
        *,
        recipients: tuple[str, ...] = (RECIPIENT,),
        sender: str = SENDER,
        helo: str = CLIENT_HELO,
    ) -> dict[str, tuple[int, bytes]]:
        """Submit like a remote client would; returns the refused recipients (smtplib's dict)."""
        with smtplib.SMTP("127.0.0.1", self.ports.smtp, local_hostname=helo, timeout=60) as client:
            return client.sendmail(sender, list(recipients), raw)

    def postcat_attributes(self, queue_id: str) -> dict[str, str]:
        """The named attributes of a queued message (``postcat -q``): what XFORWARD left."""
        result = subprocess.run(
            ["postcat", "-c", str(self.postfix.config_dir), "-q", queue_id],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        attrs = {}
        for line in result.stdout.splitlines():
            if line.startswith("named_attribute: "):
                key, _, value = line.removeprefix("named_attribute: ").partition("=")
                attrs[key] = value
        return attrs

    def reinjected_queue_id(self, first_queue_id: str) -> str:
        """The queue id the re-injection listener gave the message whose first id is given."""
        match = self.postfix.wait_log(
            rf"smtpd\[\d+\]: ([0-9A-F]+): client=.*orig_queue_id={first_queue_id}\b"
        )
        return match.group(1)


@contextlib.contextmanager
def running_stack(
    mode: Mode, *, filter_kind: Literal["filterd", "passthrough"] = "filterd"
) -> Iterator[Stack]:
    """Sink, filter and Postfix up, in that order; down in reverse, whatever happened."""
    ports = Ports.pick()
    workdir = Path(tempfile.mkdtemp(prefix="filterd-e2e-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        sink = stack.enter_context(MailSink(ports.sink))
        filterd = passthrough = None
        if filter_kind == "filterd":
            filterd = FilterdProcess(
                workdir / "filterd", listen_port=ports.filter, relay_port=ports.reinject
            )
            stack.callback(filterd.stop)
            filterd.start()
        else:
            passthrough = stack.enter_context(PassthroughFilter(ports.filter, ports.reinject))
        postfix = PostfixInstance(mode, ports, reinject_access=REINJECT_ACCESS)
        stack.callback(postfix.stop)
        postfix.start()
        yield Stack(mode, ports, workdir, sink, postfix, filterd, passthrough)
