"""The composition root: build every part from the config, serve, reload on HUP, drain on TERM.

Lifecycle (in the manner of uvicorn's server): signal handlers only set flags or schedule work;
shutdown closes the listeners, lets in-flight transactions finish within ``drain_timeout``,
answers 421 to the sessions still open and exits 0. A second SIGTERM/SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

from filterd import __version__
from filterd.actions import Executor, LazyQuarantine
from filterd.actions.nexthop import NO_TLS, RelayTls
from filterd.actions.quarantine import QuarantineStore, run_retention, track_size
from filterd.actions.relay import RelayClient
from filterd.config import Config, load_config
from filterd.errors import ConfigError, StartupError
from filterd.folders import make_private_folder
from filterd.logsetup import get_logger
from filterd.observe import Metrics, make_registry, start_metrics_server
from filterd.processor import MessageProcessor
from filterd.rules import RuleSet, load_ruleset
from filterd.sdnotify import Notifier, watchdog_loop
from filterd.smtp import FilterdHandler, IngressPolicy
from filterd.smtp_protocol import FilterdSMTP

log = get_logger("filterd")

PURGE_INTERVAL_SECONDS = 3600.0
# The quarantine size gauge follows the store within this time, whatever changed it: the CLI's
# delete, purge or release, or a worker that stored an entry and was restarted since.
QUARANTINE_COUNT_INTERVAL_SECONDS = 60.0
EXIT_FORCED = 1


def ingress_tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.cert or not config.tls.key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError.single(
            config.source, 1, 1, f"tls: cannot load certificate/key: {exc}"
        ) from exc
    return context


def relay_client(config: Config, *, pool_size: int | None = None) -> RelayClient:
    """The next-hop client the config describes (TLS included)."""
    settings = config.relay_tls
    tls = NO_TLS
    if settings.mode != "none":
        try:
            context = ssl.create_default_context(cafile=settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError.single(
                config.source, 1, 1, f"relay_tls: cannot load ca_file: {exc}"
            ) from exc
        if not settings.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        tls = RelayTls(settings.mode, context, settings.server_name)
    return RelayClient(
        config.relay.host,
        config.relay.port,
        timeout=config.limits.relay_timeout,
        helo=config.hostname,
        pool_size=pool_size or config.relay_pool_size,
        idle_timeout=config.limits.relay_idle_timeout,
        tls=tls,
    )


def handle_signals(
    loop: asyncio.AbstractEventLoop,
    *,
    on_terminate: Callable[[], None],
    on_reload: Callable[[], None],
    interrupt: bool = True,
) -> None:
    """SIGTERM and SIGINT stop (drain first), SIGHUP reloads: the daemon and the supervisor.

    A worker (``interrupt=False``) ignores SIGINT: Ctrl-C reaches the whole process group, and
    the supervisor passes it on as SIGTERM, which the worker would take for a second signal
    and exit at once, cutting off the messages it was delivering."""
    for signum, callback in (
        (signal.SIGTERM, on_terminate),
        (signal.SIGINT, on_terminate),
        (signal.SIGHUP, on_reload),
    ):
        if signum == signal.SIGINT and not interrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            continue
        loop.add_signal_handler(signum, callback)


# The pipe a worker's heartbeat goes to (set by the supervisor, see Supervisor.check_stalls).
HEARTBEAT_FD_ENV = "FILTERD_HEARTBEAT_FD"


async def heartbeat_loop(fd: int, interval: float) -> None:
    """Tell the supervisor, every ``interval`` seconds, that this worker's event loop still
    runs: one that stops (a loop wedged in some bug) is killed and restarted there."""
    os.set_blocking(fd, False)
    while True:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")
        await asyncio.sleep(interval)


def ingress_policy(config: Config) -> IngressPolicy:
    limits = config.limits
    return IngressPolicy(
        networks=config.networks,
        max_message_size=limits.max_message_size,
        max_recipients=limits.max_recipients,
        max_connections=limits.max_connections,
        max_connections_per_client=limits.max_connections_per_client,
        session_timeout=limits.session_timeout,
        hostname=config.hostname,
        spool_threshold=limits.spool_threshold,
        spool_dir=str(Path(config.state_dir) / "spool"),
        tls_context=ingress_tls_context(config),
        require_tls=config.tls.require,
    )


class Daemon:
    """One running filterd: its servers, its current rule set and its lifecycle flags."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        overrides: dict[str, object],
        inherited_fds: Sequence[int] = (),
    ) -> None:
        self.config = config
        # As a worker of a supervisor: serve its sockets; it owns metrics HTTP, purge, systemd.
        self.inherited_fds = tuple(inherited_fds)
        self.primary = not self.inherited_fds
        self.config_path = config_path
        self.overrides = overrides
        self.ruleset: RuleSet = load_ruleset(
            config.rules, max_scan_bytes=config.limits.max_scan_bytes
        )
        self.registry = make_registry()
        self.metrics = Metrics(self.registry)
        self.metrics.set_rule_names(self.ruleset.rule_names)
        self._count_reload(success=True)  # the initial load counts as one
        self.quarantine = LazyQuarantine(config.quarantine.path)
        self.relay = relay_client(config)
        self.processor = MessageProcessor(
            lambda: self.ruleset, Executor(self.quarantine), self.metrics
        )
        self.handler = FilterdHandler(
            ingress_policy(config), self.relay, self.processor, self.metrics
        )
        self.notifier = Notifier()
        self.stopping = asyncio.Event()
        self.signals_seen = 0
        self.reload_lock = asyncio.Lock()
        self.servers: list[asyncio.Server] = []
        self.tasks: list[asyncio.Task[None]] = []

    # --- signals -----------------------------------------------------------------------------
    def on_terminate(self) -> None:
        self.signals_seen += 1
        if self.signals_seen > 1:
            log.warning("shutdown_forced")
            os._exit(EXIT_FORCED)
        log.info("shutdown_requested")
        self.stopping.set()

    def on_reload(self) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self.reload()))

    async def reload(self) -> None:
        """Build a new rule set beside the old one; swap only if it is valid. Reloads run one
        at a time, in the order of their signals: otherwise a slow earlier one (a big rule set)
        could finish last and put the older rules back."""
        async with self.reload_lock:
            await self._reload()

    async def _reload(self) -> None:
        self.notifier.reloading()
        started = time.perf_counter()
        loaded = await load_for_reload(self.config_path, self.overrides, self.config)
        self._count_reload(success=loaded is not None)
        if loaded is not None:
            config, ruleset = loaded
            self.ruleset = ruleset  # one reference swap: in-flight messages keep their set
            self.metrics.set_rule_names(ruleset.rule_names)
            log.info(
                "config_reloaded",
                rules=len(ruleset.rule_names),
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            if config.listen != self.config.listen or config.relay != self.config.relay:
                log.warning(
                    "reload_needs_restart", detail="listen/relay changes take effect on restart"
                )
        self.notifier.ready()

    def _count_reload(self, *, success: bool) -> None:
        # Workers reload after the supervisor validated and counted the reload once.
        self.metrics.reload(success=success, count=self.primary)

    # --- run ---------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        handle_signals(
            loop, on_terminate=self.on_terminate, on_reload=self.on_reload, interrupt=self.primary
        )
        # A worker starts with SIGHUP blocked (see Supervisor.start_worker); one that came
        # meanwhile is delivered now, to the handler above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        policy = self.handler.policy

        def factory() -> FilterdSMTP:
            return FilterdSMTP(self.handler, policy)

        if self.inherited_fds:
            for fd in self.inherited_fds:
                self.servers.append(
                    await loop.create_server(factory, sock=socket.socket(fileno=fd))
                )
        else:
            for address in self.config.listen:
                with startup_step(f"listen on {address}"):
                    self.servers.append(
                        await loop.create_server(
                            factory, address.host, address.port, reuse_address=True, backlog=1024
                        )
                    )
        if self.primary:
            metrics_listen = self.config.metrics_listen
            if metrics_listen is not None:
                with startup_step(f"serve metrics on {metrics_listen}"):
                    self.servers.append(
                        await start_metrics_server(
                            metrics_listen.host, metrics_listen.port, self.registry
                        )
                    )
            self.tasks.extend(
                start_quarantine_upkeep(self.quarantine.get, self.config, self.metrics)
            )
            self.tasks.append(loop.create_task(watchdog_loop(self.notifier)))
        heartbeat = os.environ.get(HEARTBEAT_FD_ENV)
        if heartbeat and not self.primary:
            interval = self.config.limits.worker_stall_timeout / 4
            self.tasks.append(loop.create_task(heartbeat_loop(int(heartbeat), interval)))
        log.info(
            "daemon_started",
            version=__version__,
            listen=[str(a) for a in self.config.listen],
            relay=str(self.config.relay),
            rules=len(self.ruleset.rule_names),
            pid=os.getpid(),
        )
        self.notifier.ready()
        await self.stopping.wait()
        self.notifier.stopping()
        await self.drain()
        log.info("daemon_stopped")
        return 0

    async def drain(self) -> None:
        """Stop listening, let transactions in progress finish (bounded), then close the rest."""
        self.handler.accepting = False
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + self.config.limits.drain_timeout
        # Polling: "no transaction open in any session" has no single event to wait on.
        while time.monotonic() < deadline and (  # noqa: ASYNC110
            self.handler.in_flight or any(state.txn is not None for state in self.handler.active)
        ):
            await asyncio.sleep(0.05)
        closed = self.handler.close_sessions("421 4.3.2 Service shutting down, try again later")
        if closed:
            log.info("sessions_closed_on_shutdown", count=closed)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.relay.close()


async def load_for_reload(
    config_path: str | None, overrides: dict[str, object], current: Config
) -> tuple[Config, RuleSet] | None:
    """The config and rule set a SIGHUP asks for, built off the event loop; None (logged with
    every problem) when either is invalid. A reload must never take the daemon down."""
    try:
        config = load_config(config_path).with_overrides(**overrides) if config_path else current
        ruleset = await asyncio.to_thread(
            load_ruleset, config.rules, max_scan_bytes=config.limits.max_scan_bytes
        )
    except ConfigError as exc:
        log.error("reload_failed", problems=[str(p) for p in exc.problems])
        return None
    except Exception as exc:
        log.error("reload_failed", error=repr(exc))
        return None
    return config, ruleset


def start_quarantine_upkeep(
    open_store: Callable[[], QuarantineStore], config: Config, metrics: Metrics
) -> list[asyncio.Task[None]]:
    """Start what the one process that owns the quarantine does for it: the retention purge
    (every PURGE_INTERVAL_SECONDS) and the count that keeps the size gauge true (every
    QUARANTINE_COUNT_INTERVAL_SECONDS). An unusable quarantine is logged and tried again at
    each pass: only quarantined mail is affected meanwhile."""
    loop = asyncio.get_running_loop()
    return [
        loop.create_task(
            run_retention(
                open_store,
                timedelta(seconds=config.quarantine.retention_seconds),
                interval=PURGE_INTERVAL_SECONDS,
                on_count=metrics.set_quarantine_size,
            )
        ),
        loop.create_task(
            track_size(
                open_store, metrics.set_quarantine_size, interval=QUARANTINE_COUNT_INTERVAL_SECONDS
            )
        ),
    ]


# Start-up failures a later try may not meet: an address not configured yet (at boot, before
# DHCP or IPv6 duplicate address detection is done), memory or disk space short for a moment.
_TRANSIENT_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.ENOMEM, errno.ENOSPC, errno.EAGAIN})


@contextlib.contextmanager
def startup_step(what: str) -> Iterator[None]:
    """Turn the OSError of a start-up step (a port taken, a folder that cannot be made) into a
    StartupError that says which step: the admin reads one line, not a traceback, and the
    exit code tells systemd whether restarting can help (1) or not (78)."""
    try:
        yield
    except OSError as exc:
        raise StartupError(
            f"cannot {what}: {exc.strerror or exc}", transient=exc.errno in _TRANSIENT_ERRNOS
        ) from exc


def prepare_state(config: Config, *, clean_spool: bool = True) -> None:
    """Create the state folders; the primary process also clears a crashed run's spool files.
    Run as root in a state folder of the service user's, what it creates is that user's (see
    ``make_private_folder``): a later start as the service user can still use it."""
    with contextlib.suppress(OSError):  # an unusable quarantine defers only quarantined mail
        make_private_folder(Path(config.quarantine.path))
    spool = Path(config.state_dir) / "spool"
    with startup_step(f"create the spool folder {spool} (state_dir)"):
        make_private_folder(spool)
    if not os.access(spool, os.W_OK | os.X_OK):
        # Left by a run as another user (root): every message past spool_threshold would get
        # 451. Said at start, once, instead.
        raise StartupError(f"cannot use the spool folder {spool}: this user cannot write it")
    if not clean_spool:
        return
    for leftover in spool.glob("msg-*.eml"):
        # A crash left these behind; their messages were never acknowledged (the MTA retries).
        leftover.unlink(missing_ok=True)


# glibc's mallopt() parameter (malloc.h): the size from which an allocation gets a mapping of
# its own, given back to the system when it is freed.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value


def return_large_buffers_to_the_system() -> None:
    """Keep glibc's mmap threshold where it starts, so a freed large buffer (a spooled message
    read back for its rules, an attachment decoded) leaves the process's memory at once.

    By default glibc raises the threshold to the size of each such buffer freed, after which
    buffers of that size come from the heap, where freed memory stays in the process's RSS:
    ten 20 MB messages at once left +130 MB behind instead of +45 MB. Without glibc (musl,
    another libc) there is nothing to set."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def serve(
    config: Config,
    config_path: str | None,
    overrides: dict[str, object],
    inherited_fds: Sequence[int] = (),
) -> int:
    """Run one serving process in the foreground until SIGTERM; returns the exit code."""
    prepare_state(config, clean_spool=not inherited_fds)
    return_large_buffers_to_the_system()
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional dependency

        uvloop.install()

    async def main() -> int:
        daemon = Daemon(config, config_path, overrides, inherited_fds)
        return await daemon.run()

    return asyncio.run(main())
