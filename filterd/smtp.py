"""The SMTP ingress, session side: aiosmtpd's handler hooks and the state of each session.

It owns admission (networks ACL, connection limits), EHLO extensions, XFORWARD, forwarding RCPT
to the next hop in step with the client (MAIL goes with the first RCPT, a pipelined group of
RCPTs goes together: ``settle_recipients``), and the rule that every
unexpected failure answers ``451 4.3.0`` (aiosmtpd's default would be a 500). The wire side
(the protocol: command loop, DATA reader) is ``smtp_protocol.py``; what happens to a received
message is delegated to a ``MessageSink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import re
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession

from filterd.actions.relay import RelayClient, RelayTransaction, Xforward
from filterd.errors import RelayError
from filterd.logsetup import get_logger
from filterd.model import TEMPFAIL_INTERNAL, Envelope, Message, SmtpReply
from filterd.rules.lists import parse_client_ip
from filterd.spool import SpoolFile, read_prefix

if TYPE_CHECKING:
    from filterd.smtp_protocol import FilterdSMTP

log = get_logger("filterd.smtp")

XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_XTEXT = re.compile(r"\+([0-9A-Fa-f]{2})")
_session_ids = itertools.count(1)


class MessageSink(Protocol):
    """Decides and executes what happens to one received message; returns the client's reply."""

    async def process(
        self, message: Message, txn: RelayTransaction, session_id: str
    ) -> SmtpReply: ...
    def refused(
        self, envelope: Envelope, size: int, reply: SmtpReply, reason: str, session_id: str
    ) -> None: ...


class IngressMetrics(Protocol):
    def session_opened(self) -> None: ...
    def session_closed(self) -> None: ...
    def connection_refused(self, reason: str) -> None: ...
    def relay_error(self, reason: str) -> None: ...


@dataclass(frozen=True)
class IngressPolicy:
    """What the ingress enforces, taken from the config."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_client: int
    session_timeout: float
    hostname: str
    spool_threshold: int
    spool_dir: str
    tls_context: ssl.SSLContext | None = None
    require_tls: bool = False


@dataclass(eq=False)  # identity semantics: states live in a set of active sessions
class SessionState:
    """Per-connection state kept beside aiosmtpd's Session."""

    session_id: str
    client_ip: str
    xforward: dict[str, str] = field(default_factory=dict)
    txn: RelayTransaction | None = None
    recipients_tried: int = 0
    admitted: bool = False
    # The next hop failed mid-transaction: RCPT and DATA answer 451 until RSET/MAIL/EHLO.
    relay_failed: bool = False
    # A delivery owns the transaction: a lost connection must not close it under it.
    delivering: bool = False
    # Recipients RCPT accepted locally that the next hop has not been asked about yet.
    unsent_recipients: list[str] = field(default_factory=list)


class LaterReply(str):
    """A reply the next hop gives later (see FilterdHandler.settle_recipients); the protocol
    holds its place among the replies. Its text, should it ever be written as it is, is a
    451: a retry, never a loss."""


REPLY_FROM_NEXT_HOP = LaterReply(TEMPFAIL_INTERNAL.render())


def _xtext_decode(value: str) -> str:
    return _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)


def _has_line_break(address: str) -> bool:
    """A CR, LF or NUL in an address (a quoted local part may carry one, and aiosmtpd's parser
    drops the quotes): relayed, it would end or split the next hop's command line at a next
    hop that takes a bare CR as a line end."""
    return "\r" in address or "\n" in address or "\0" in address


def _peer_ip(session: AioSession) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def session_state(session: AioSession) -> SessionState:
    # (the per-command hooks below read session.filterd_state themselves: no call)
    state: SessionState = session.filterd_state
    return state


class FilterdHandler:
    """aiosmtpd handler: the per-command hooks, shared by every session of one server."""

    def __init__(
        self, policy: IngressPolicy, relay: RelayClient, sink: MessageSink, metrics: IngressMetrics
    ) -> None:
        self.policy = policy
        self.relay = relay
        self.sink = sink
        self.metrics = metrics
        self.active: set[SessionState] = set()
        self.per_client: Counter[str] = Counter()
        self.accepting = True
        # Session work running in a task (a delivery, a next-hop command): a shutdown waits
        # for it (see FilterdSMTP._advance).
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.protocols: set[FilterdSMTP] = set()
        self._acl_cache: dict[str, bool] = {}
        # Each worker builds its own handler and counts its sessions from 1: its pid makes the
        # ids unique in the daemon (taken once: getpid() is a system call).
        self._session_prefix = f"{os.getpid()}-"

    # --- admission -------------------------------------------------------------------------
    def admit(self, session: AioSession) -> str | None:
        """Attach state to a new session; return a refusal reply, or None to go on."""
        client_ip = _peer_ip(session)
        session_id = f"{self._session_prefix}{next(_session_ids):x}"
        state = SessionState(session_id=session_id, client_ip=client_ip)
        session.filterd_state = state
        if not self.accepting:
            self.metrics.connection_refused("shutdown")
            return "421 4.3.2 Service shutting down, try again later"
        if not self._allowed(client_ip):
            log.warning("connection_refused", reason="acl", client_ip=client_ip)
            self.metrics.connection_refused("acl")
            return "554 5.7.1 Access denied"
        if len(self.active) >= self.policy.max_connections:
            log.warning("connection_refused", reason="limit", client_ip=client_ip)
            self.metrics.connection_refused("limit")
            return "421 4.7.0 Too many connections, try again later"
        if self.per_client[client_ip] >= self.policy.max_connections_per_client:
            log.warning("connection_refused", reason="client_limit", client_ip=client_ip)
            self.metrics.connection_refused("client_limit")
            return "421 4.7.0 Too many connections from your address, try again later"
        state.admitted = True
        self.active.add(state)
        self.per_client[client_ip] += 1
        self.metrics.session_opened()
        return None

    def _allowed(self, client_ip: str) -> bool:
        # Parsing an address and walking the networks costs more than the rest of admission;
        # clients come back, so the answer is remembered per address (bounded).
        allowed = self._acl_cache.get(client_ip)
        if allowed is None:
            if len(self._acl_cache) >= 4096:
                self._acl_cache.clear()
            allowed = self._acl_cache[client_ip] = self._check_networks(client_ip)
        return allowed

    def _check_networks(self, client_ip: str) -> bool:
        address = parse_client_ip(client_ip)
        return address is not None and any(address in net for net in self.policy.networks)

    def closed(self, session: AioSession) -> RelayTransaction | None:
        """Account for a session whose connection ended; returns the next-hop transaction it
        left open (to abandon), if any. A delivery in progress keeps its transaction."""
        state: SessionState | None = getattr(session, "filterd_state", None)
        if state is None or not state.admitted:
            return None
        state.admitted = False
        self.active.discard(state)
        per_client, client_ip = self.per_client, state.client_ip
        remaining = per_client[client_ip] - 1
        if remaining <= 0:
            del per_client[client_ip]
        else:
            per_client[client_ip] = remaining
        self.metrics.session_closed()
        if state.txn is not None and not state.delivering:
            txn, state.txn = state.txn, None
            return txn
        return None

    def close_sessions(self, reply: str) -> int:
        """Say ``reply`` to every open session and close it (shutdown); returns how many."""
        protocols, self.protocols = list(self.protocols), set()
        for protocol in protocols:
            transport: asyncio.WriteTransport | None = protocol.transport
            if transport is not None and not transport.is_closing():
                with contextlib.suppress(Exception):
                    transport.write(reply.encode() + b"\r\n")
                transport.close()
        return len(protocols)

    # --- hooks -----------------------------------------------------------------------------
    async def handle_EHLO(
        self,
        server: SMTP,
        session: AioSession,
        envelope: AioEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        await self._end_transaction(session)
        extra = [
            "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES",
            "250-XFORWARD " + " ".join(XFORWARD_ATTRIBUTES),
        ]
        return responses[:-1] + extra + responses[-1:]

    async def handle_HELO(
        self, server: SMTP, session: AioSession, envelope: AioEnvelope, hostname: str
    ) -> str:
        session.host_name = hostname
        await self._end_transaction(session)
        return f"250 {self.policy.hostname}"

    async def handle_MAIL(
        self,
        server: SMTP,
        session: AioSession,
        envelope: AioEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if _has_line_break(address):
            return "501 5.1.7 Bad sender address syntax"
        state: SessionState = session.filterd_state
        sender = "" if address == "<>" else address
        # No next-hop I/O yet: MAIL travels with the first RCPT (see RelayTransaction.begin).
        txn = self.relay.transaction()
        txn.begin(sender, options, self._xforward(session))
        state.txn = txn
        state.recipients_tried = 0
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: AioSession,
        envelope: AioEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if _has_line_break(address):
            return "501 5.1.3 Bad recipient address syntax"
        state: SessionState = session.filterd_state
        if state.relay_failed:
            return TEMPFAIL_INTERNAL.render()
        if state.txn is None:
            return "503 5.5.1 Error: need MAIL command"
        state.recipients_tried += 1
        if state.recipients_tried > self.policy.max_recipients:
            return "452 4.5.3 Too many recipients"
        # Every local check has passed, so the next hop may hear of this recipient: when the
        # protocol next answers the client (settle_recipients), with the RCPTs a pipelining
        # client sent after it in the same write.
        state.unsent_recipients.append(address)
        return REPLY_FROM_NEXT_HOP

    async def settle_recipients(self, session: AioSession, envelope: AioEnvelope) -> list[str]:
        """Send the recipients that RCPT accepted locally to the next hop and return the
        replies for the client, in order: the next hop's own, per recipient."""
        state: SessionState = session.filterd_state
        recipients, state.unsent_recipients = state.unsent_recipients, []
        if not recipients:
            return []
        if state.txn is None:  # the transaction ended under them: nothing was sent
            return [TEMPFAIL_INTERNAL.render()] * len(recipients)
        try:
            replies = await state.txn.add_recipients(recipients)
        except Exception as exc:
            if not isinstance(exc, RelayError):
                # A fault of our own: logged with its traceback, then handled like a failed
                # next hop, so each RCPT still gets exactly one reply.
                log.error("relay_internal_error", error=repr(exc), exc_info=exc)
                exc = RelayError("protocol", repr(exc))
            self._relay_failed("rcpt", exc, state)
            await self._end_transaction(session, broken=True)
            # Keep the client's transaction open but failed: every later RCPT and the DATA get
            # 451 too (never a 5xx that would bounce mail a retry would deliver).
            state.relay_failed = True
            return [TEMPFAIL_INTERNAL.render()] * len(recipients)
        for address, reply in zip(recipients, replies, strict=True):
            if reply.code in (250, 251):
                envelope.rcpt_tos.append(address)
        return [reply.as_reply().render() for reply in replies]

    def _relay_failed(self, stage: str, exc: RelayError, state: SessionState) -> None:
        self.metrics.relay_error(exc.reason)
        log.warning(
            "relay_failed",
            stage=stage,
            reason=exc.reason,
            detail=exc.detail,
            session=state.session_id,
        )

    async def handle_RSET(self, server: SMTP, session: AioSession, envelope: AioEnvelope) -> str:
        await self._end_transaction(session)
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: AioSession, envelope: AioEnvelope) -> str:
        await self._end_transaction(session)
        return "221 2.0.0 Bye"

    async def handle_NOOP(
        self, server: SMTP, session: AioSession, envelope: AioEnvelope, arg: str
    ) -> str:
        return "250 2.0.0 OK"

    async def handle_exception(self, error: Exception) -> str:
        # The outermost catch-all of a session: never aiosmtpd's 500, never a silent pass.
        log.error("session_error", error=repr(error), exc_info=error)
        return TEMPFAIL_INTERNAL.render()

    # --- helpers used by FilterdSMTP ------------------------------------------------------------
    def xforward_command(self, session: AioSession, arg: str | None) -> str:
        state = session_state(session)
        if not arg:
            return "501 5.5.4 Syntax: XFORWARD attribute=value..."
        updates: dict[str, str] = {}
        for item in arg.split():
            name, eq, value = item.partition("=")
            name = name.upper()
            if not eq or name not in XFORWARD_ATTRIBUTES:
                return f"501 5.5.4 Bad XFORWARD attribute: {name[:40]}"
            decoded = _xtext_decode(value)
            updates[name] = "" if decoded in ("[UNAVAILABLE]", "[TEMPUNAVAIL]") else decoded
        state.xforward.update(updates)
        return "250 2.0.0 Ok"

    def _xforward(self, session: AioSession) -> Xforward:
        state: SessionState = session.filterd_state
        attrs = dict(state.xforward)
        # Without XFORWARD from our client, tell the next hop about the client we saw.
        attrs.setdefault("ADDR", state.client_ip)
        if session.host_name and "HELO" not in state.xforward:
            attrs["HELO"] = session.host_name
        attrs.setdefault("PROTO", "ESMTP" if session.extended_smtp else "SMTP")
        return Xforward(attrs)

    async def _end_transaction(self, session: AioSession, *, broken: bool = False) -> None:
        state: SessionState | None = getattr(session, "filterd_state", None)
        if state is None:
            return
        state.xforward.clear()
        state.recipients_tried = 0
        state.unsent_recipients = []
        state.relay_failed = False
        if state.txn is not None:
            txn, state.txn = state.txn, None
            await (txn.abandon() if broken else txn.finish())

    def envelope_of(self, session: AioSession, envelope: AioEnvelope) -> Envelope:
        state: SessionState = session.filterd_state
        sender = envelope.mail_from or ""
        xf = state.xforward
        options = envelope.mail_options
        return Envelope(
            sender="" if sender == "<>" else sender,
            recipients=tuple(envelope.rcpt_tos),
            client_ip=xf.get("ADDR") or state.client_ip,
            client_name=xf.get("NAME") or None,
            helo=xf.get("HELO") or session.host_name,
            queue_id=xf.get("IDENT") or None,
            smtputf8=bool(envelope.smtp_utf8),
            # (most senders give no MAIL parameters: no generator for none)
            body_8bitmime=bool(options) and any(opt.upper() == "BODY=8BITMIME" for opt in options),
            mail_options=tuple(options),
        )

    def refused(
        self, session: AioSession, envelope: AioEnvelope, size: int, reply: SmtpReply
    ) -> None:
        """Account for a message whose data came in and was refused before processing."""
        reason = "larger than max_message_size" if reply.code == 552 else "could not be spooled"
        self.sink.refused(
            self.envelope_of(session, envelope),
            size,
            reply,
            reason,
            session_state(session).session_id,
        )

    async def deliver(
        self,
        session: AioSession,
        envelope: AioEnvelope,
        raw: bytes,
        spool: SpoolFile | None,
    ) -> str:
        """Process a received message and return the reply to the final dot."""
        state: SessionState = session.filterd_state
        txn = state.txn
        if txn is None:
            return TEMPFAIL_INTERNAL.render()
        # Once the whole message is here, its delivery runs to the end even if the client
        # vanishes meanwhile: the next hop may already have it, so it must be logged and
        # counted, and the next-hop connection must not be closed under it. The session's
        # protocol does not cancel the session while ``delivering`` is set (FilterdSMTP.
        # _end_session_task), and a shutdown waits for it in ``in_flight`` even after the
        # session is gone.
        state.delivering = True
        try:
            if spool is None:
                message = Message(self.envelope_of(session, envelope), raw)
            else:
                prefix = await asyncio.to_thread(
                    read_prefix, spool.path, self.policy.spool_threshold
                )
                message = Message(
                    self.envelope_of(session, envelope),
                    prefix,
                    spool_path=spool.path,
                    spooled_size=spool.size,
                )
            reply = await self.sink.process(message, txn, state.session_id)
        finally:
            # The transaction ends whatever happened (a spool that cannot be read back
            # included), and still as part of the delivery: a client lost now must not cancel
            # the RSET that hands the connection back to the pool. A connection that failed is
            # marked broken by the relay client and closed, not pooled.
            try:
                await self._end_transaction(session)
            finally:
                state.delivering = False
        return reply.render()
