"""Test-side SMTP servers for the end-to-end tier: the final-delivery sink and a stand-in filter.

``MailSink`` is where Postfix delivers in the end (its relayhost): it records every transaction
(envelope + bytes) and lets a test wait for the ones it expects. ``PassthroughFilter`` is a
minimal content filter speaking XFORWARD, used to prove the Postfix wiring of the harness on its
own, independent of filterd.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

SINK_HOSTNAME = "sink.filterd.test"
PASSTHROUGH_HOSTNAME = "passthrough.filterd.test"
XFORWARD_ATTRS = ("NAME", "ADDR", "PROTO", "HELO", "IDENT", "SOURCE", "PORT")


@dataclass(frozen=True)
class Delivery:
    """One transaction the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    def header(self, name: str) -> str:
        return str(self.message.get(name, ""))


@dataclass
class _SinkHandler:
    refuse: dict[str, str] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        delivery = Delivery(str(envelope.mail_from), tuple(envelope.rcpt_tos), bytes(content))
        with self.changed:
            self.deliveries.append(delivery)
            self.changed.notify_all()
        return "250 2.0.0 stored by sink"


class MailSink:
    """The last hop: an aiosmtpd server on loopback that keeps what it is given."""

    def __init__(self, port: int, *, refuse: dict[str, str] | None = None) -> None:
        self.port = port
        self._handler = _SinkHandler(refuse={k.lower(): v for k, v in (refuse or {}).items()})
        self._controller = Controller(
            self._handler,
            hostname="127.0.0.1",
            port=port,
            server_hostname=SINK_HOSTNAME,
            decode_data=False,
            enable_SMTPUTF8=True,
        )

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> MailSink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def deliveries(self) -> list[Delivery]:
        with self._handler.changed:
            return list(self._handler.deliveries)

    def clear(self) -> None:
        with self._handler.changed:
            self._handler.deliveries.clear()

    def wait_for(self, predicate: Callable[[Delivery], bool], *, timeout: float = 30.0) -> Delivery:
        """The first delivery matching ``predicate``, waiting for it up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._handler.changed:
            while True:
                for delivery in self._handler.deliveries:
                    if predicate(delivery):
                        return delivery
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [
                        (d.mail_from, d.rcpt_tos, d.header("Subject"))
                        for d in self._handler.deliveries
                    ]
                    raise AssertionError(f"no matching delivery within {timeout}s; sink has {seen}")
                self._handler.changed.wait(left)

    def matching(self, predicate: Callable[[Delivery], bool]) -> list[Delivery]:
        return [d for d in self.deliveries if predicate(d)]


class _XforwardSMTP(SMTP):  # type: ignore[misc]  # aiosmtpd is untyped
    """aiosmtpd's SMTP plus XFORWARD (Postfix XFORWARD_README), kept on the session."""

    async def smtp_EHLO(self, hostname: str) -> None:
        self.session.xforward = {}
        await super().smtp_EHLO(hostname)

    async def smtp_XFORWARD(self, arg: str) -> None:
        attrs: dict[str, str] = getattr(self.session, "xforward", {})
        for item in arg.split():
            name, _, value = item.partition("=")
            if name.upper() not in XFORWARD_ATTRS:
                await self.push("501 5.5.4 Bad XFORWARD attribute name")
                return
            attrs[name.upper()] = value
        self.session.xforward = attrs
        await self.push("250 2.0.0 Ok")


class _XforwardController(Controller):  # type: ignore[misc]  # aiosmtpd is untyped
    def factory(self) -> SMTP:
        return _XforwardSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class _PassthroughHandler:
    relay_port: int
    seen_xforward: list[dict[str, str]] = field(default_factory=list)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        last = responses.pop()
        responses.append("250-XFORWARD " + " ".join(XFORWARD_ATTRS))
        responses.append(last)
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        xforward: dict[str, str] = dict(getattr(session, "xforward", {}))
        self.seen_xforward.append(xforward)
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=self.relay_port,
            local_hostname=PASSTHROUGH_HOSTNAME,
            timeout=30,
            start_tls=False,
        )
        async with client:
            await client.ehlo()
            if xforward:
                args = " ".join(f"{k}={v}" for k, v in xforward.items())
                await client.execute_command(f"XFORWARD {args}".encode())
            errors, reply = await client.sendmail(
                envelope.mail_from or "", envelope.rcpt_tos, envelope.original_content or b""
            )
        if errors:
            return "451 4.3.0 passthrough: next hop refused some recipients"
        return f"250 2.0.0 passthrough: {reply}"


class PassthroughFilter:
    """A stand-in content filter: accepts everything, relays it to ``relay_port`` with XFORWARD."""

    def __init__(self, port: int, relay_port: int) -> None:
        self.port = port
        self._handler = _PassthroughHandler(relay_port)

        self._controller: _XforwardController | None = None

    @property
    def seen_xforward(self) -> list[dict[str, str]]:
        return list(self._handler.seen_xforward)

    def start(self) -> None:
        # A stopped aiosmtpd Controller cannot start again (its loop is closed): make a new one.
        self._controller = _XforwardController(
            self._handler,
            hostname="127.0.0.1",
            port=self.port,
            server_hostname=PASSTHROUGH_HOSTNAME,
            decode_data=False,
            enable_SMTPUTF8=True,
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> PassthroughFilter:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
