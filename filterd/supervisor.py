"""Multi-process serving: one supervisor owns the listening sockets, N workers serve them.

Why processes: a Python event loop uses one core; SMTP sessions are independent, so the simplest
way to use every core is several identical workers accepting on the same inherited sockets (the
kernel hands each connection to one of them). The supervisor:

- binds the listeners once (a worker that dies loses no queued connection: the socket stays
  open in the supervisor and the other workers keep accepting);
- starts ``workers`` copies of ``filterd serve`` with the sockets passed as inherited fds;
- restarts a worker that dies (and clears its metric files' live gauges);
- validates a reload once on SIGHUP, then fans the signal out; fans SIGTERM out and exits 0 once
  every worker has drained; a second SIGTERM kills the workers and exits at once;
- serves /metrics merged over all workers (prometheus-client's multiprocess mode), runs the
  quarantine retention purge and the count behind its size gauge, and speaks the systemd
  notify protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from filterd.actions import LazyQuarantine
from filterd.app import (
    HEARTBEAT_FD_ENV,
    handle_signals,
    load_for_reload,
    start_quarantine_upkeep,
    startup_step,
)
from filterd.config import Config
from filterd.logsetup import get_logger
from filterd.observe import (
    Metrics,
    make_registry,
    mark_process_dead,
    reset_multiprocess_dir,
    start_metrics_server,
)
from filterd.rules import load_ruleset
from filterd.sdnotify import Notifier, watchdog_loop
from filterd.spool import discard, leftovers_of

log = get_logger("filterd.supervisor")

WORKER_FDS_FLAG = "--worker-fds"
RESTART_BACKOFF_SECONDS = 1.0
# A worker that keeps dying soon after its start (a config file that no longer loads, say)
# is restarted ever less often, up to this; one that ran this long resets the backoff.
MAX_RESTART_BACKOFF_SECONDS = 60.0
EXIT_CONFIG = 78  # what a worker exits with when the config or rules do not load
# How long a new worker may take to send its first heartbeat (imports, loading the rules),
# at least: a large rule set compiles for seconds.
STARTUP_GRACE_SECONDS = 30.0


def bind_listeners(config: Config) -> list[socket.socket]:
    sockets = []
    for address in config.listen:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with startup_step(f"listen on {address}"):
            sock = socket.create_server((address.host, address.port), family=family, backlog=1024)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        argv: Sequence[str],
        overrides: dict[str, object],
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.argv = list(argv)
        self.sockets = bind_listeners(config)
        self.registry = make_registry()
        self.metrics = Metrics(self.registry)
        self.notifier = Notifier()
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.backoff: dict[int, float] = {}  # per slot: the wait before its next restart
        # per slot: when its worker started, and when its last heartbeat came (None: not yet)
        self.started: dict[int, float] = {}
        self.beats: dict[int, float | None] = {}
        self.reload_lock = asyncio.Lock()
        self.stopping = False
        self.signals_seen = 0
        self.done = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def worker_command(self) -> list[str]:
        fds = ",".join(str(sock.fileno()) for sock in self.sockets)
        return [sys.executable, "-m", "filterd", *self.argv, WORKER_FDS_FLAG, fds]

    async def start_worker(self, slot: int) -> None:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        env.pop("WATCHDOG_USEC", None)
        env["FILTERD_WORKER"] = str(slot)
        beat_read, beat_write = os.pipe()
        env[HEARTBEAT_FD_ENV] = str(beat_write)
        # The worker starts with SIGHUP blocked (a child inherits the signal mask), and
        # unblocks it once its own handler is in place (Daemon.run): a reload fanned out while
        # it starts would otherwise kill it, SIGHUP's default action. Blocked, not ignored, so
        # neither process loses one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.worker_command(),
                pass_fds=[*(sock.fileno() for sock in self.sockets), beat_write],
                env=env,
            )
        except BaseException:
            os.close(beat_read)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            os.close(beat_write)  # the worker's copy is the only writer: its exit is our EOF
        loop = asyncio.get_running_loop()
        self.started[slot], self.beats[slot] = loop.time(), None
        os.set_blocking(beat_read, False)
        loop.add_reader(beat_read, self._heard, slot, beat_read)
        self.workers[slot] = proc
        log.info("worker_started", slot=slot, pid=proc.pid)
        self.tasks.append(asyncio.get_running_loop().create_task(self.watch(slot, proc)))
        if self.stopping:
            # SIGTERM came while this worker was being started, after the fan-out: it must
            # not be left running, unknown to anyone, on the listening sockets.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    async def watch(self, slot: int, proc: asyncio.subprocess.Process) -> None:
        started = time.monotonic()
        code = await proc.wait()
        mark_process_dead(proc.pid)
        for leftover in leftovers_of(Path(self.config.state_dir) / "spool", proc.pid):
            discard(str(leftover))  # a killed worker's half-received or unsent messages
        if self.workers.get(slot) is proc:
            del self.workers[slot]
        if self.stopping:
            log.info("worker_stopped", slot=slot, pid=proc.pid, code=code)
            self._stopped_when_idle()
            return
        wait = self.backoff.get(slot, RESTART_BACKOFF_SECONDS)
        if time.monotonic() - started >= MAX_RESTART_BACKOFF_SECONDS:
            wait = RESTART_BACKOFF_SECONDS  # it ran a good while: a fresh failure
        self.backoff[slot] = min(wait * 2, MAX_RESTART_BACKOFF_SECONDS)
        log.error(
            "worker_died",
            slot=slot,
            pid=proc.pid,
            code=code,
            restart_in_seconds=wait,
            detail=(
                "the config or rules no longer load (filterd check)"
                if code == EXIT_CONFIG
                else None
            ),
        )
        await asyncio.sleep(wait)
        if self.stopping:
            self._stopped_when_idle()  # SIGTERM came during the backoff: do not restart
        else:
            await self.start_worker(slot)

    def _heard(self, slot: int, fd: int) -> None:
        """A heartbeat (or the end of the pipe: the worker is gone) from slot ``slot``."""
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        loop = asyncio.get_running_loop()
        if not data:
            loop.remove_reader(fd)
            os.close(fd)
            return
        self.beats[slot] = loop.time()

    async def check_stalls(self) -> None:
        """Kill a worker whose event loop has stopped beating: it holds its share of the
        connections and answers none. Its restart follows as for any dead worker. (systemd's
        watchdog sees only the supervisor's loop.)"""
        timeout = self.config.limits.worker_stall_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(timeout / 4)
            now = loop.time()
            for slot, proc in list(self.workers.items()):
                last = self.beats.get(slot)
                since = self.started.get(slot, now) if last is None else last
                limit = timeout if last is not None else max(timeout, STARTUP_GRACE_SECONDS)
                if now - since > limit and proc.returncode is None and not self.stopping:
                    log.error(
                        "worker_stalled", slot=slot, pid=proc.pid, silent_seconds=round(now - since)
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()

    def _stopped_when_idle(self) -> None:
        if not self.workers:
            self.done.set()

    def fan_out(self, signum: int) -> None:
        for proc in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def on_terminate(self) -> None:
        self.signals_seen += 1
        if self.signals_seen > 1:
            log.warning("shutdown_forced")
            self.fan_out(signal.SIGKILL)
            os._exit(1)
        log.info("shutdown_requested", workers=len(self.workers))
        self.stopping = True
        self.notifier.stopping()
        for sock in self.sockets:
            sock.close()  # workers keep their own copies until they drain
        self.fan_out(signal.SIGTERM)
        if not self.workers:
            self.done.set()

    def on_reload(self) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self.reload()))

    async def reload(self) -> None:
        """Validate once here, so an invalid set is refused (and counted) once; then fan out.
        One at a time, in signal order (see Daemon.reload)."""
        async with self.reload_lock:
            self.notifier.reloading()
            loaded = await load_for_reload(self.config_path, self.overrides, self.config)
            self.metrics.reload(success=loaded is not None)
            if loaded is not None:
                self.metrics.set_rule_names(loaded[1].rule_names)
                self.fan_out(signal.SIGHUP)
            self.notifier.ready()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        handle_signals(loop, on_terminate=self.on_terminate, on_reload=self.on_reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # see run_supervisor
        ruleset = load_ruleset(self.config.rules, max_scan_bytes=self.config.limits.max_scan_bytes)
        self.metrics.set_rule_names(ruleset.rule_names)
        self.metrics.reload(success=True)  # the initial load counts as one
        servers = []
        metrics_listen = self.config.metrics_listen
        if metrics_listen is not None:
            with startup_step(f"serve metrics on {metrics_listen}"):
                servers.append(
                    await start_metrics_server(
                        metrics_listen.host, metrics_listen.port, self.registry
                    )
                )
        for slot in range(self.config.workers):
            if self.stopping:
                break  # SIGTERM during start-up: the listening sockets are closed already
            await self.start_worker(slot)
        # One store for the purge and the count (workers open their own).
        quarantine = LazyQuarantine(self.config.quarantine.path)
        self.tasks.extend(start_quarantine_upkeep(quarantine.get, self.config, self.metrics))
        self.tasks.append(loop.create_task(watchdog_loop(self.notifier)))
        self.tasks.append(loop.create_task(self.check_stalls()))
        log.info(
            "supervisor_started",
            workers=self.config.workers,
            pid=os.getpid(),
            listen=[str(a) for a in self.config.listen],
        )
        self.notifier.ready()
        await self.done.wait()
        for server in servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        log.info("daemon_stopped")
        return 0


def run_supervisor(
    config: Config, config_path: str | None, argv: Sequence[str], overrides: dict[str, object]
) -> int:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    # A directory given from outside (systemd's RuntimeDirectory survives a restart of the
    # service only sometimes) may hold the files of a previous run: their counters and live
    # gauges would be merged into this one's.
    reset_multiprocess_dir()
    started = time.monotonic()
    # SIGHUP stays blocked from before the listeners are bound (the moment the service looks
    # up) until its handler is in place (Supervisor.run): a reload sent in between would
    # otherwise kill the supervisor, SIGHUP's default action. Blocked, it waits and is handled.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        return asyncio.run(Supervisor(config, config_path, argv, overrides).run())
    finally:
        if metrics_dir and os.environ.get("FILTERD_OWNS_METRICS_DIR") == "1":
            shutil.rmtree(metrics_dir, ignore_errors=True)
        log.debug("supervisor_exited", seconds=round(time.monotonic() - started, 1))
