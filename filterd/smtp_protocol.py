"""The SMTP ingress, wire side: filterd's aiosmtpd protocol subclass.

It owns what happens on the connection: the per-connection set-up (without aiosmtpd's
per-connection introspection), the command loop over aiosmtpd's ``smtp_*`` command methods and
how it is driven (see ``_advance``), the replies, the session timer, the DATA reader (long lines,
bare LF and CR, dot-stuffing, SIZE, spooling past ``limits.spool_threshold``), and freeing a
finished session without the cyclic garbage collector. The session side (hooks, admission,
relaying) is ``smtp.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    MISSING,
    SMTP,
    TLSSetupException,
    login_always_fail,
    sanitize,
    syntax,
)

from filterd.actions.relay import crlf_lines
from filterd.logsetup import get_logger
from filterd.mime_headers import LF_BYTE
from filterd.model import TEMPFAIL_INTERNAL, SmtpReply
from filterd.smtp import (
    FilterdHandler,
    IngressPolicy,
    LaterReply,
    SessionState,
    session_state,
)
from filterd.spool import SpoolFile, discard

log = get_logger("filterd.smtp")
_MAIL_LOG = logging.getLogger("mail.log")  # aiosmtpd's logger

# The common address forms, parsed without the email package's (slow, general) header parser.
_SIMPLE_PATH = re.compile(r'<((?:[^<>\s"\\(),;:@\[\]]+@[^<>\s"\\(),;:@\[\]]+)?)>(.*)', re.DOTALL)
_SIZE_PARAM = re.compile(r"\bSIZE=(\d+)", re.IGNORECASE)
_DATA_CHUNK = 65536
# RFC 5321's 512 bytes per command line; after EHLO, MAIL may be longer by what the parameters
# of the announced extensions take (RFC 1870's SIZE 26, RFC 6531's SMTPUTF8 10: filterd always
# announces both). aiosmtpd keeps its limits in a dict shared by all sessions (a class
# attribute) that every EHLO enlarges and every full SMTP.__init__ clears; filterd's sessions
# skip that __init__ (_init_fast), so that dict only grows and is not used here.
_COMMAND_LIMIT = 512
_EXTENDED_COMMAND_LIMITS = {"MAIL": _COMMAND_LIMIT + 26 + 10, "XFORWARD": 1000}


# The commands whose replies RFC 2920 (3.2) lets a server hold while more commands of the same
# group are already in: a pipelining client (Postfix) sends XFORWARD, MAIL, RCPT and DATA in one
# write and reads the replies together.
_GROUPABLE_REPLIES = frozenset({"XFORWARD", "MAIL", "RCPT", "RSET"})

_CommandMethod = Callable[[Any, "str | None"], Coroutine[Any, Any, None]]
# What the command loop needs to know of a command (see FilterdSMTP._command_table): its
# ``smtp_*`` method, whether its reply may be held (_GROUPABLE_REPLIES), whether its replies
# carry no enhanced status code (HELO, EHLO: see with_enhanced_code), and whether it must
# wait for the next hop's replies to the held RCPTs (all but RCPT itself).
_CommandSpec = tuple[_CommandMethod, bool, bool, bool]

TOO_BIG = SmtpReply(552, "5.3.4", "Message size exceeds fixed maximum message size")

# RFC 2034: with ENHANCEDSTATUSCODES announced, every reply but the greeting and the replies to
# HELO/EHLO carries an RFC 3463 code. filterd's own replies do; aiosmtpd's (its syntax errors,
# "503 Error: need MAIL command", HELP, VRFY, STARTTLS...) get the code that fits their reply
# code here, as Postfix gives its own.
_HAS_ENHANCED_CODE = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_ENHANCED_FOR = {
    "421": "4.3.0",
    "451": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}


def with_enhanced_code(reply: str) -> str:
    """``reply`` with an enhanced status code: its own if it has one, else the one that fits
    its reply code (x.0.0 when none fits better). 3xx replies have none."""
    # (the usual reply has its code: the match first)
    if _HAS_ENHANCED_CODE.match(reply) or reply[:1] not in ("2", "4", "5"):
        return reply
    code, separator, text = reply[:3], reply[3:4] or " ", reply[4:]
    enhanced = _ENHANCED_FOR.get(code, code[0] + ".0.0")
    return f"{code}{separator}{enhanced} {text}" if text else f"{code}{separator}{enhanced}"


def unstuff(block: bytes) -> bytes:
    """CRLF for every line ending, then remove the dot-stuffing (``block`` starts at a line
    ending). Clients that send bare LF stuff their dots after it too."""
    lines = crlf_lines(block)
    # Most mail has no line that starts with a dot. bytes.replace returns the block itself
    # then, but only after a slower scan than find's (5 against 1 µs for 5 KB).
    return lines.replace(b"\r\n.", b"\r\n") if lines.find(b"\r\n.") >= 0 else lines


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _help(
    text: str, extended: str | None = None, when: str | None = None
) -> Callable[[_Method], _Method]:
    """aiosmtpd's ``@syntax`` (HELP lists a command only if it carries it; with ``when``, only
    while that attribute is true), typed."""
    return cast(Callable[[_Method], _Method], syntax(text, extended=extended, when=when))


@dataclass(frozen=True)
class DataResult:
    """What DATA produced: the message (in memory or spooled), or the reply refusing it, and
    how many bytes of message the client sent."""

    raw: bytes
    spool: SpoolFile | None
    refusal: SmtpReply | None
    size: int


class _Resumption(Coroutine[Any, Any, None]):
    """The coroutine a task runs to take over a session coroutine that ``_advance`` stepped
    outside any task and that is now suspended on ``pending``: every step the task makes
    (send, or throw: a cancellation) goes to the session coroutine, as if the task had run it
    from the start. It finishes when the session coroutine does, or when it suspends on its
    reader again: the protocol then drives it itself (``_advance``)."""

    __slots__ = ("_coro", "_pending", "_protocol", "_started")

    def __init__(
        self, protocol: FilterdSMTP, coro: Coroutine[Any, Any, None], pending: object
    ) -> None:
        self._protocol = protocol
        self._coro = coro
        self._pending = pending
        self._started = False

    def send(self, value: Any) -> Any:
        if not self._started:
            # The task's first step: hand it the future the coroutine already waits on.
            self._started = True
            pending, self._pending = self._pending, None
            return pending
        return self._relay(self._coro.send, value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        # Also before the first step (a task cancelled before it ran): the coroutine is
        # suspended already, so it is the one to see the exception.
        self._started = True
        self._pending = None
        exc = typ if val is None else val
        del typ, val, tb  # see _relay: no frame here may keep the exception
        try:
            return self._relay(self._coro.throw, exc)
        finally:
            exc = None

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("_Resumption is run by a task, not awaited")

    def _relay(self, step: Any, arg: Any) -> Any:
        protocol = self._protocol
        try:
            try:
                pending = step(arg)
            finally:
                # ``arg`` may be the exception thrown in; its traceback's frames refer back to
                # this frame (their caller), so keeping it here would make a reference cycle
                # holding the whole session.
                arg = None
        except BaseException as error:  # the session coroutine ended
            protocol._session = None
            self._release()
            if isinstance(error, StopIteration) or not isinstance(error, Exception):
                raise  # finished, or cancelled (KeyboardInterrupt...): the task's business
            # A failure is ended here, not stored in the task: a task holding the exception
            # would also hold this protocol (traceback -> frames), and nobody reads it.
            protocol._session_failed(error)
            raise StopIteration from None
        if protocol._waits_for_input(pending):
            protocol._parked = pending
            self._release()
            raise StopIteration
        return pending

    def _release(self) -> None:
        # The finished task keeps this object: drop what would tie the protocol into a
        # reference cycle (protocol -> task -> this -> protocol).
        self._protocol = self._coro = None  # type: ignore[assignment]


class FilterdSMTP(SMTP):  # type: ignore[misc]  # aiosmtpd ships no type information
    """aiosmtpd's protocol with filterd's admission, XFORWARD, SIZE reply and DATA reader."""

    # aiosmtpd's __init__ introspects the handler and itself with inspect.getmembers() for every
    # connection (a fifth of the CPU of a short session). The results depend only on the class
    # and the shared handler, so they are computed once and reused.
    session: Any  # aiosmtpd's Session / Envelope / transport (set per connection and transaction)
    _reader: Any  # aiosmtpd's streams, timer and task (set per connection)
    _writer: Any
    _timeout_handle: Any
    _handler_coroutine: Any
    envelope: Any
    transport: Any
    _smtp_method_names: frozenset[str] = frozenset()
    # aiosmtpd sizes its StreamReader by this (1001), and a StreamReader stops reading from
    # the socket whenever it holds more than twice its limit: with 1001 every DATA segment
    # over 2 KB paused and resumed the transport (two epoll changes per message, and per
    # chunk of a large one). Command lines are still held to RFC 5321's lengths by the command
    # loop (_EXTENDED_COMMAND_LIMITS); the limit only bounds how much one line may buffer.
    line_length_limit = _DATA_CHUNK
    _shared: ClassVar[
        dict[int, tuple[dict[str, Any], dict[str, Any], asyncio.AbstractEventLoop]]
    ] = {}

    def __init__(self, handler: FilterdHandler, policy: IngressPolicy) -> None:
        key = id(handler)
        if key not in FilterdSMTP._shared:
            super().__init__(
                handler,
                data_size_limit=policy.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=policy.hostname,
                ident="filterd ESMTP",
                timeout=policy.session_timeout,
                auth_exclude_mechanism=["LOGIN", "PLAIN"],
                tls_context=policy.tls_context,
                require_starttls=policy.require_tls,
            )
            FilterdSMTP._shared = {key: (self._handle_hooks, self._auth_methods, self.loop)}
        else:
            self._init_fast(handler, policy, *FilterdSMTP._shared[key])
        self.filterd_handler = handler
        self._parts_done: set[str] = set()  # "task" and "connection" ended (see below)
        self._deadline = 0.0  # when the session times out (see _reset_timeout)
        # The session's coroutine (_handle_client) while it runs, and the reader's future it
        # is suspended on while no task holds it (see _advance).
        self._session: Coroutine[Any, Any, None] | None = None
        self._parked: asyncio.Future[None] | None = None
        self._quit = False
        # Replies not written yet, and when they wait (see push); None holds the place of a
        # RCPT reply the next hop has yet to give (see _settle).
        self._pending: list[bytes | None] = []
        self._assembling = False
        self._groupable = False
        # Replies that carry no enhanced status code: the greeting and the replies to HELO and
        # EHLO (RFC 2034, 3). See with_enhanced_code.
        self._plain_replies = True

    def _init_fast(
        self,
        handler: FilterdHandler,
        policy: IngressPolicy,
        hooks: dict[str, Any],
        auth_methods: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """What SMTP.__init__ sets up, for the options filterd uses (aiosmtpd 1.4.x)."""
        self.__ident__ = "filterd ESMTP"
        # get_running_loop() costs a getpid() system call (CPython checks for a fork); the
        # loop the first session saw serves while it runs.
        self.loop = loop if loop.is_running() else asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        self.data_size_limit = policy.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = policy.hostname
        self.tls_context = policy.tls_context
        self.require_starttls = policy.tls_context and policy.require_tls  # as aiosmtpd sets it
        self._timeout_duration = policy.session_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = auth_methods
        self._handle_hooks = hooks
        self._ehlo_hook_ver = "new"
        self._enforce_call_limit = False

    # Per class (a subclass may override command methods): see _command_table.
    _command_tables: ClassVar[dict[type, dict[str, _CommandSpec]]] = {}

    def _command_table(self) -> dict[str, _CommandSpec]:
        """The commands the command loop knows, each with what it decides per command
        (_CommandSpec): looked up once per class instead of per command line (a getattr, a
        bound method and three set or string tests each time). The command methods are
        aiosmtpd's own names (``_smtp_method_names``), looked up on the class, as aiosmtpd
        takes them, once, from the first session."""
        cls = type(self)
        table = FilterdSMTP._command_tables.get(cls)
        if table is None:
            table = {
                name: (
                    getattr(cls, "smtp_" + name),
                    name in _GROUPABLE_REPLIES,
                    name in ("HELO", "EHLO"),
                    name != "RCPT",
                )
                for name in self._smtp_method_names
            }
            FilterdSMTP._command_tables[cls] = table
        return table

    @property
    def _smtp_methods(self) -> dict[str, Any]:
        """aiosmtpd's table of command methods, which only its HELP reads here: made when
        asked, not for every connection (a bound method per command, each referring back to
        this protocol)."""
        return {name: getattr(self, "smtp_" + name) for name in self._smtp_method_names}

    @_smtp_methods.setter
    def _smtp_methods(self, table: dict[str, Any]) -> None:
        # aiosmtpd's SMTP.__init__, run for the first connection only, finds the commands by
        # introspection: they hold for every later session.
        FilterdSMTP._smtp_method_names = frozenset(table)

    # --- driving the session ------------------------------------------------------------------
    # aiosmtpd runs each session in a task that waits on a StreamReader: every command line
    # then costs a future, a scheduled wake-up, an extra event-loop pass and a task step before
    # any SMTP work happens. Here the session's coroutine is stepped straight from
    # data_received while it only waits for input, so a command that needs no I/O (EHLO, MAIL,
    # NOOP, QUIT...) is answered within the callback that read it. When the coroutine waits on
    # anything else (the next hop, a delivery, a TLS handshake) a task takes it over, and hands
    # it back once it waits for input again (_Resumption).
    # So what a command runs before its first suspension has no current task: it must not use
    # asyncio.timeout(), nor asyncio.wait_for (built on it since Python 3.12), nor anything
    # else that asks for asyncio.current_task().

    def _waits_for_input(self, pending: Any) -> bool:
        reader = self._reader
        return pending is not None and reader is not None and pending is reader._waiter

    def _advance(self, exc: BaseException | None = None) -> None:
        """Run the session coroutine (or throw ``exc`` into it) until it next suspends."""
        coro = self._session
        if coro is None:
            return
        self._parked = None
        try:
            try:
                pending = coro.send(None) if exc is None else coro.throw(exc)
            finally:
                exc = None  # as in _Resumption._relay: no cycle through this frame
        except StopIteration:
            self._session = None
            return
        except BaseException as error:
            self._session = None
            if not isinstance(error, Exception):
                raise  # KeyboardInterrupt and the like: the loop's business
            self._session_failed(error)
            return
        # _waits_for_input, inline: this runs for every command line.
        reader = self._reader
        if pending is not None and reader is not None and pending is reader._waiter:
            self._parked = pending
            return
        task = self.loop.create_task(_Resumption(self, coro, pending))
        self._handler_coroutine = task
        # A shutdown waits for it (it may be a delivery: see FilterdHandler.deliver).
        in_flight = self.filterd_handler.in_flight
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    def _session_failed(self, error: Exception) -> None:
        # _handle_client answers every failure itself: this is a last resort.
        log.error("session_failed", error=repr(error), exc_info=error)
        if self.transport is not None:
            self.transport.close()

    def _input_arrived(self) -> None:
        parked = self._parked
        if parked is not None and parked.done():
            self._advance()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is not None:
            reader.feed_data(data)
            # _input_arrived, inline (once per segment the client sends)
            parked = self._parked
            if parked is not None and parked.done():
                self._advance()

    async def _handle_client(self) -> None:
        try:
            refusal = self.filterd_handler.admit(self.session)
            if refusal is not None:
                with contextlib.suppress(ConnectionError):
                    await self.push(refusal)
                if self.transport is not None:
                    self.transport.close()
                return
            self.filterd_handler.protocols.add(self)
            await self._command_loop()
        except (asyncio.CancelledError, ConnectionError):
            # A lost connection cancels the session (_end_session_task), or shows as an error
            # from the stream (a reply written as it goes). Ending normally instead keeps the
            # exception, whose traceback holds this protocol, out of a finished task; see
            # _session_part_done.
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
        finally:
            self._session_part_done("task")

    async def _command_loop(self) -> None:
        """aiosmtpd's command loop (1.4) for the options filterd uses: no PROXY protocol header,
        no per-command call limits, no per-line logging; the same replies otherwise.

        aiosmtpd's loop does that bookkeeping for every command line, a fifth of what a command
        costs here; the commands themselves are still aiosmtpd's ``smtp_*`` methods.
        """
        await self.push(f"220 {self.hostname} {self.__ident__}")
        reader = self._reader
        commands = self._command_table()
        bogus_budget = BOGUS_LIMIT
        # aiosmtpd's own trace of every command line, kept for `log: {level: debug}` (AUTH
        # secrets masked, as aiosmtpd does); decided once per session, not per line.
        trace = _MAIL_LOG.isEnabledFor(logging.DEBUG)
        while self.transport is not None and not self._quit:
            self._plain_replies = False
            self._groupable = False
            if self._pending and not self._command_waiting():
                await self._flush()  # held for a command that is not there after all
            try:
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    # Too long: read (and drop) to the end of the line, then refuse it.
                    await reader.read(error.consumed)
                    while True:
                        try:
                            await reader.readuntil()
                            break
                        except asyncio.LimitOverrunError as more:
                            await reader.read(more.consumed)
                    await self.push("500 Command line too long")
                    continue
                line = line.rstrip(b"\r\n")
                if trace:
                    _MAIL_LOG.debug("%r >> %r", self.session.peer, sanitize(line))
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                # SMTPUTF8 is on: arguments decode as UTF-8, undecodable bytes kept (surrogates).
                arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
                # Every limit is at least _COMMAND_LIMIT: a line within it needs no other.
                if len(line) > _COMMAND_LIMIT and (
                    not self.session.extended_smtp
                    or len(line) > _EXTENDED_COMMAND_LIMITS.get(command, _COMMAND_LIMIT)
                ):
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if (
                    self.require_starttls
                    and not self._tls_protocol
                    and command not in ALLOWED_BEFORE_STARTTLS
                ):
                    await self.push("530 Must issue a STARTTLS command first")
                    continue
                spec = commands.get(command)
                if spec is None:
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.transport.close()
                        continue
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                # _reset_timeout, inline (see there): once per command.
                self._deadline = self.loop.time() + self._timeout_duration
                if self._timeout_handle is None:
                    self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)
                method, self._groupable, plain_replies, settles_recipients = spec
                if settles_recipients and None in self._pending:
                    # What comes next depends on the next hop's answers (DATA needs the
                    # accepted recipients, RSET must not leave replies unread there).
                    await self._settle()
                self._plain_replies = plain_replies
                await method(self, arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception as error:  # every failure becomes a reply, never a crash
                await self._reply_to_failure(error)

    async def _reply_to_failure(self, error: Exception) -> None:
        """What aiosmtpd's loop does with an exception from a command: a failed TLS setup
        closes the connection, anything else is answered (handle_exception: 451, never 5xx)."""
        if isinstance(error, TLSSetupException):
            self.transport.close()
            self.connection_lost(error)
            return
        try:
            status = await self.handle_exception(error)
        except Exception:  # the handler itself failed: still answer
            status = TEMPFAIL_INTERNAL.render()
        await self.push(status)

    def _session_part_done(self, part: str) -> None:
        """Break this protocol's reference cycles once both its task and its connection ended.

        aiosmtpd's protocol refers to itself through its stream writer and reader and its
        timeout handle (and did through a table of bound command methods, which filterd makes
        only for HELP: see _smtp_methods). Left alone, every finished session is cyclic
        garbage (some 50 objects) that only the garbage collector frees, and its passes over
        them cost milliseconds; freed by reference counting, they cost nothing.
        """
        self._parts_done.add(part)
        if len(self._parts_done) < 2:
            return
        # aiosmtpd's connection_lost still cancels the timer and the task: those stay (a
        # cancelled timer and a finished task hold nothing that refers back).
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._writer = self._reader = self._client_connected_cb = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            # After STARTTLS aiosmtpd calls this again and creates a new Session: carry our
            # state over, minus what RFC 3207 says to forget (XFORWARD attributes, like EHLO).
            state = getattr(self.session, "filterd_state", None)
            super().connection_made(transport)
            if state is not None:
                self.session.filterd_state = state
                state.xforward.clear()
            return
        # aiosmtpd's set-up of a new connection (1.4), except that the session is driven by
        # _advance instead of a task.
        self._set_rset_state()
        self.session = self._create_session()
        self.session.peer = transport.get_extra_info("peername")
        self._reset_timeout()
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport
        if _MAIL_LOG.isEnabledFor(logging.INFO):
            _MAIL_LOG.info("Peer: %r", self.session.peer)
        self._session = self._handle_client()
        self._advance()

    def eof_received(self) -> bool | None:
        # A client may half-close right after its last commands (Exim writes ".", "QUIT" and
        # shuts down its side). aiosmtpd would cancel the session at once, dropping the
        # message it already received; instead the reader sees end-of-input after the buffered
        # commands are answered, and the transport stays open for the replies.
        if self.session is not None and self.session.ssl is not None:
            # TLS has no half-close: the session ends (aiosmtpd's behaviour), but never in the
            # middle of a delivery.
            self._end_session_task()
            return False
        if self._reader is not None:
            self._reader.feed_eof()
            self._input_arrived()
        return True

    def _end_session_task(self) -> None:
        """Cancel the session's task, as aiosmtpd does when the client goes, unless it is
        delivering a message: that runs to its end (see FilterdHandler.deliver), and the
        command loop then stops by itself because the transport is gone."""
        state: SessionState | None = getattr(self.session, "filterd_state", None)
        if state is not None and state.delivering:
            return
        parked = self._parked
        if parked is not None:
            if parked.done() and not parked.cancelled():
                # A reset connection leaves its error on the reader's future; the coroutine is
                # cancelled instead of reading it, so take it here (or asyncio would log it as
                # "never retrieved" when the future is freed).
                parked.exception()
            self._advance(asyncio.CancelledError())
        elif self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError) or self._reader.at_eof():
            # End of input after a half-close: everything sent was answered; close quietly.
            if self.transport is not None:
                self.transport.close()
            return "421 4.4.2 Connection closed"
        status: str = await self.filterd_handler.handle_exception(error)
        return status

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        self.filterd_handler.protocols.discard(self)
        # aiosmtpd's connection_lost (1.4), except that a delivery in progress is not
        # cancelled (see _end_session_task).
        if _MAIL_LOG.isEnabledFor(logging.INFO):
            _MAIL_LOG.info("%r connection lost", session.peer if session else None)
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self._original_transport is not None:
            # After STARTTLS our transport is the TLS one; the TCP one must close too.
            self._original_transport.close()
        asyncio.StreamReaderProtocol.connection_lost(self, error)
        self._end_session_task()
        self.transport = None
        if session is not None:
            abandoned = self.filterd_handler.closed(session)
            if abandoned is not None:
                task = self.loop.create_task(abandoned.abandon())
                self.filterd_handler.in_flight.add(task)
                task.add_done_callback(self.filterd_handler.in_flight.discard)
        self._session_part_done("connection")

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels its timer and schedules a new one for every command; moving a
        # deadline and letting the one timer re-arm itself when it fires early costs a clock
        # read instead. (filterd always passes the same duration, so deadlines only move on.)
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)
            return
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > 0:
            # Replies are still waiting for a client that does not read them: a close would
            # wait for them to be taken, for ever, and the session would hold its connection
            # slot. The reset ends it now.
            state = getattr(self.session, "filterd_state", None)
            log.info("session_timeout_unread", session=state.session_id if state else None)
            transport.abort()
            return
        self._timeout_cb()

    async def push(self, status: str | bytes) -> None:
        """Answer the client, or hold the reply in ``_pending`` to go out with the next one:
        while the EHLO reply is being assembled, and after a command whose reply RFC 2920 lets
        a server group (_GROUPABLE_REPLIES) while the client's next command is already
        buffered. Each write is a TCP segment that wakes the client, so Postfix's pipelined
        XFORWARD, XFORWARD, MAIL, RCPT, DATA cost one write, not five."""
        if self.transport is None:
            return  # the client is gone (its delivery ran to the end): nobody to answer
        pending = self._pending
        # A plain str is by far the usual reply: tested first, without isinstance().
        if type(status) is not str and isinstance(status, (LaterReply, bytes)):
            pending.append(None if isinstance(status, LaterReply) else status)
        else:
            if not self._plain_replies:
                status = with_enhanced_code(status)
            pending.append(status.encode())  # (UTF-8)
        if self._assembling:
            return
        if self._groupable:
            reader = self._reader  # (as _command_waiting, inline)
            if reader is not None and LF_BYTE in reader._buffer:
                return
        if None in pending:
            await self._flush()  # a place waits for the next hop's reply: settle first
            return
        # The usual case, without a coroutine for _flush: nothing waits for the next hop.
        unwritten = self._write_pending()
        if unwritten is not None:
            await super().push(unwritten)

    def _command_waiting(self) -> bool:
        reader = self._reader
        return reader is not None and LF_BYTE in reader._buffer

    async def _settle(self) -> None:
        """Get the next hop's replies for the recipients whose replies are held (one write for
        all of them when it pipelines) and put them in their places.

        RFC 2920 lets a client send a group of RCPTs without waiting: forwarding each one and
        waiting for the next hop's reply before reading the next would cost a round trip to
        the next hop per recipient (Postfix hands a content filter up to 50 at once).
        """
        settled: list[str] = []
        try:
            settled = await self.filterd_handler.settle_recipients(self.session, self.envelope)
        except Exception as error:
            # Answered here, in the held places, and nowhere else: raised on, the command loop
            # would answer it once more, and every later reply would go to the wrong command.
            log.error("session_error", error=repr(error), exc_info=error)
        finally:
            # Every place gets one reply, even if settling failed: a 451 for a recipient the
            # next hop's reply is missing for.
            # (with an enhanced code also when the next hop gave none: see with_enhanced_code)
            replies = iter(settled)
            self._pending[:] = [
                with_enhanced_code(next(replies, TEMPFAIL_INTERNAL.render())).encode("utf-8")
                if item is None
                else item
                for item in self._pending
            ]

    async def _flush(self) -> None:
        if None in self._pending:
            await self._settle()
        unwritten = self._write_pending()
        if unwritten is not None:
            await super().push(unwritten)

    def _write_pending(self) -> bytes | None:
        """Write the held replies (settled: no place left empty) in one write. Returns them
        instead when the transport cannot take them now: then aiosmtpd's push must."""
        pending: list[bytes] = self._pending  # type: ignore[assignment]
        if not pending:
            return None
        data = b"\r\n".join(pending)  # one reply: the reply itself, not a copy
        pending.clear()
        transport = self.transport
        if transport is None:
            return None
        # aiosmtpd's push formats a debug log line and awaits drain() for every reply; while
        # the transport is open and not paused neither is needed: just write. Anything else
        # (a paused or closing transport) takes aiosmtpd's path, which waits or raises.
        if not self._paused and not transport.is_closing():
            self._writer.write(data + b"\r\n")
            return None
        return data

    @_help("STARTTLS", when="tls_context")  # as aiosmtpd's: listed only with TLS configured
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        await super().smtp_STARTTLS(arg)
        original = self._original_transport
        if original is not None and original.is_closing():
            # The connection went while the handshake had not even started (the session
            # timer closed it): asyncio's TLS layer then reports the handshake as done,
            # without an error, and no connection_lost follows. End the session here, as a
            # failed handshake ends it (_reply_to_failure), or it would keep its slot under
            # max_connections for good.
            self.connection_lost(None)

    @_help("EHLO hostname")
    async def smtp_EHLO(self, hostname: str | None) -> None:
        # aiosmtpd pushes each line of the EHLO reply on its own: a write, a TCP segment and
        # a wake-up of the client per line, eight here, on every session an MTA opens (Postfix
        # and Exim always say EHLO). Its lines are pushed after its last wait (the handler's
        # hook), so they are held and written at once.
        self._assembling = True
        held = len(self._pending)  # replies to earlier commands of a pipelined group
        try:
            await super().smtp_EHLO(hostname)
        except BaseException:
            del self._pending[held:]  # never half an EHLO reply
            raise
        finally:
            self._assembling = False
        await self._flush()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        if "\x00" in arg:
            return None, None  # aiosmtpd answers 553 malformed address
        match = _SIMPLE_PATH.fullmatch(arg)
        if match:
            return match.group(1) or "<>", match.group(2)
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    # The overrides keep aiosmtpd's @syntax: HELP lists only the commands that carry it.
    @_help("XFORWARD attribute=value...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: XFORWARD not allowed inside a transaction")
            return
        await self.push(self.filterd_handler.xforward_command(self.session, arg))

    @_help("QUIT")
    async def smtp_QUIT(self, arg: str | None) -> None:
        # aiosmtpd's QUIT, which ends the session by cancelling its task; here the command
        # loop ends after it.
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT")
        await self.push("221 Bye" if status is MISSING else status)
        self._quit = True
        self.transport.close()

    @_help("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        size = _SIZE_PARAM.search(arg or "")
        if size and self.data_size_limit and int(size.group(1)) > self.data_size_limit:
            await self.push(TOO_BIG.render())
            return
        await super().smtp_MAIL(arg)

    @_help("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.session.filterd_state.relay_failed:  # (session_state, inline)
            await self.push(TEMPFAIL_INTERNAL.render())
            return
        if not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        started = time.monotonic()
        try:
            result = await self._read_data()
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            # After 354 the client's bytes are message data until the end marker: if we cannot
            # tell where that is any more, the connection must go, or data would run as commands.
            log.error(
                "data_failed", error=repr(exc), session=session_state(self.session).session_id
            )
            await self.filterd_handler.handle_RSET(self, self.session, self.envelope)
            await self.push("421 4.3.0 Temporary internal error, closing connection")
            self.transport.close()
            return
        if result.refusal is not None:
            # Refused here, never processed: still one log line and one count, as for every
            # message whose data came in.
            self.filterd_handler.refused(self.session, self.envelope, result.size, result.refusal)
            await self.filterd_handler.handle_RSET(self, self.session, self.envelope)
            self._set_post_data_state()
            await self.push(result.refusal.render())
            return
        spool = result.spool
        log.debug(
            "data_received",
            size=spool.size if spool else len(result.raw),
            seconds=round(time.monotonic() - started, 4),
        )
        try:
            status = await self.filterd_handler.deliver(
                self.session, self.envelope, result.raw, spool
            )
        finally:
            # The transaction is over whatever happened (RFC 5321: the final reply ends it),
            # also when deliver failed and the command loop answers 451: the client's next
            # MAIL starts a new one, never a "nested MAIL" 5xx or RCPTs added to this one.
            self._set_post_data_state()
            if spool is not None:
                discard(spool.path)
        await self.push(status)

    async def _read_data(self) -> DataResult:
        """Read up to the ``CRLF.CRLF`` end marker and return the un-dot-stuffed message.

        Lines of any length pass; only ``<CRLF>.<CRLF>`` ends the data, and every line ending
        (CRLF, bare LF, bare CR) becomes CRLF, so no ``<LF>.<LF>`` or ``<CR>.<CR>`` can end the
        message at a lenient next hop, and the rules, the header edits and the next hop all see
        the same lines. Past ``spool_threshold`` complete lines go to a spool file and only the
        last partial line stays in memory. Too big, or a spool that cannot be written: the rest
        is read and dropped up to the end marker, and the message is refused. Bytes after the
        marker (a pipelined command) go back to the reader.
        """
        policy = self.filterd_handler.policy
        limit = self.data_size_limit or 0
        # A virtual line start, so the end marker and dot-stuffing look the same everywhere.
        buf = bytearray(b"\r\n")
        spool: SpoolFile | None = None
        received = 0  # bytes already moved out of buf (to the spool, or dropped)
        refusal: SmtpReply | None = None
        scanned = 0
        # buf[:no_line_end_below] was searched for a line end already (apart from the virtual
        # one at the start): each byte is looked at once however long a line is.
        no_line_end_below = 0
        try:
            while True:
                end = buf.find(b"\r\n.\r\n", max(0, scanned - 4))
                if end >= 0:
                    break
                scanned = len(buf)
                if refusal is None and limit and received + scanned > limit + 2 + 8192:
                    refusal = TOO_BIG
                if refusal is not None and scanned > 65536:
                    # Refused: nothing of the message is kept but its last bytes, in case the
                    # end marker straddles the next chunk. (Dropping only complete lines kept
                    # data without any line end, a single line or bare CRs, in memory.)
                    received += scanned - 4
                    del buf[: scanned - 4]
                    scanned = len(buf)
                elif (spool is not None or scanned > policy.spool_threshold) and scanned > 65536:
                    # Move every complete line out of memory; keep the line ending before the
                    # last partial line so the marker and the stuffing stay visible in buf.
                    cut = buf.rfind(b"\n", no_line_end_below, scanned - 5)
                    if cut > 2:
                        cut = cut - 1 if buf[cut - 1] == 0x0D else cut
                        try:
                            if spool is None:
                                spool = SpoolFile(policy.spool_dir)
                                spool.write(unstuff(bytes(buf[:cut]))[2:])
                            else:
                                spool.write(unstuff(bytes(buf[:cut])))
                        except OSError as exc:
                            log.error("spool_failed", error=str(exc))
                            refusal = TEMPFAIL_INTERNAL
                        received += cut
                        del buf[:cut]
                        no_line_end_below = max(0, scanned - 5 - cut)
                        scanned = len(buf)
                    else:
                        no_line_end_below = max(0, scanned - 5)
                chunk = await self._reader.read(_DATA_CHUNK)
                if not chunk:
                    raise ConnectionResetError(  # noqa: TRY301 - the handler discards the spool
                        "client closed the connection during DATA"
                    )
                self._reset_timeout()
                buf += chunk
            leftover = bytes(buf[end + 5 :])
            if leftover:
                # StreamReader has no unread(); aiosmtpd itself manipulates this buffer (STARTTLS).
                self._reader._buffer[:0] = leftover
            del buf[end + 2 :]
            size = received + len(buf) - 2  # (buf starts with the virtual line end)
            if refusal is None and limit and size > limit:
                refusal = TOO_BIG
            if refusal is not None:
                if spool is not None:
                    spool.discard()
                return DataResult(b"", None, refusal, size)
            if spool is None:
                return DataResult(unstuff(bytes(buf))[2:], None, None, size)
            try:
                spool.write(unstuff(bytes(buf)))
                spool.close()
            except OSError as exc:
                log.error("spool_failed", error=str(exc))
                spool.discard()
                return DataResult(b"", None, TEMPFAIL_INTERNAL, size)
            return DataResult(b"", spool, None, size)
        except BaseException:
            if spool is not None:
                spool.discard()
            raise
