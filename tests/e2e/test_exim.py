"""filterd behind a real Exim in the dual-port setup of docs/exim.md.

client → Exim (router "filterd") → filterd serve (shipped rules) → Exim's re-injection port →
router "to_sink" → sink. Exim is Debian's exim4-daemon-light, unpacked in a temp dir (see
tests/e2e/exim.py); the test skips when it cannot be fetched.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .exim import EximDaemon, EximPorts, EximUnavailable, doc_blocks, fetch_exim, render_config
from .filterd_proc import FilterdProcess
from .mailsink import Delivery, MailSink
from .postfix import free_port
from .stack import (
    CLIENT_HELO,
    RECIPIENT,
    SENDER,
    body_of,
    corpus_message,
    manifest_files,
    new_message_id,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Exim daemon must be started as root"),
]


@dataclass
class EximStack:
    exim: EximDaemon
    filterd: FilterdProcess
    sink: MailSink
    ports: EximPorts

    def send(self, raw: bytes, *, recipients: tuple[str, ...] = (RECIPIENT,)) -> None:
        with smtplib.SMTP("127.0.0.1", self.ports.smtp, local_hostname=CLIENT_HELO) as client:
            client.sendmail(SENDER, list(recipients), raw)


@pytest.fixture(scope="module")
def stack() -> Iterator[EximStack]:
    workdir = Path(tempfile.mkdtemp(prefix="filterd-e2e-exim-"))
    workdir.chmod(0o755)  # Exim's own user must reach its spool below
    try:
        try:
            binary = fetch_exim(workdir / "pkg")
        except EximUnavailable as exc:
            pytest.skip(f"Debian's exim4-daemon-light is not available: {exc}")
        ports = EximPorts(free_port(), free_port(), free_port(), free_port())
        config = render_config(doc_blocks(), ports, workdir / "run", binary.exim)
        exim = EximDaemon(binary, config, workdir / "run", ports)
        filterd = FilterdProcess(
            workdir / "filterd", listen_port=ports.filter, relay_port=ports.reinject
        )
        with MailSink(ports.sink) as sink:
            filterd.start()
            try:
                exim.start()
                try:
                    yield EximStack(exim, filterd, sink, ports)
                finally:
                    exim.stop()
            finally:
                filterd.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def delivered(message_id: str) -> Callable[[Delivery], bool]:
    return lambda d: d.header("Message-ID") == message_id and RECIPIENT in d.rcpt_tos


def bounce_for(message_id: str) -> Callable[[Delivery], bool]:
    return lambda d: (
        d.mail_from in ("", "<>") and SENDER in d.rcpt_tos and message_id.encode() in d.data
    )


def test_ham_goes_through_filterd_and_back(stack: EximStack) -> None:
    mid = new_message_id()
    raw = corpus_message("ham-plain.eml", mid)
    stack.send(raw)
    delivery = stack.sink.wait_for(delivered(mid))
    assert body_of(delivery.data) == body_of(raw)
    exim_id = stack.exim.exim_id_for(mid)
    stack.exim.wait_log(rf"{exim_id} Completed$")
    # Accepted on the first attempt (no deferral, e.g. from a connection filterd closed before
    # its reply), and delivered exactly once.
    assert not re.search(rf"{exim_id} == .* defer", stack.exim.mainlog()), stack.exim.mainlog()
    assert len(stack.sink.matching(delivered(mid))) == 1
    event = stack.filterd.message_event(mid)
    assert event["action"] == "accept"
    # No XFORWARD from Exim: filterd sees Exim on loopback, as docs/exim.md says.
    assert event["client_ip"] == "127.0.0.1"


@pytest.mark.parametrize("name", manifest_files("reject"))
def test_reject_is_bounced_by_exim(stack: EximStack, name: str) -> None:
    mid = new_message_id()
    stack.send(corpus_message(name, mid))
    assert stack.filterd.message_event(mid)["action"] == "reject"
    dsn = stack.sink.wait_for(bounce_for(mid))
    assert b"550" in dsn.data or b"554" in dsn.data
    exim_id = stack.exim.exim_id_for(mid)
    stack.exim.wait_log(rf"{exim_id} Completed$")
    # Refused on the first attempt: filterd's 5xx reached Exim, no retry in between.
    assert not re.search(rf"{exim_id} == .* defer", stack.exim.mainlog()), stack.exim.mainlog()
    assert stack.sink.matching(delivered(mid)) == []


def test_filterd_down_defers_and_nothing_is_lost(stack: EximStack) -> None:
    mid = new_message_id()
    assert stack.filterd.stop() == 0
    try:
        stack.send(corpus_message("ham-plain.eml", mid))
        stack.exim.wait_log(rf"== {RECIPIENT} R=filterd T=filterd defer")
    finally:
        stack.filterd.start()
    result = stack.exim.run("-qff")
    assert result.returncode == 0, result.stderr
    stack.sink.wait_for(delivered(mid))
    assert len(stack.sink.matching(delivered(mid))) == 1
