"""The systemd notify protocol (sd_notify(3)), spoken without a dependency.

Owns: finding the notify socket from the environment, sending state datagrams to it
(READY, RELOADING, STOPPING, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC), reading the watchdog
interval, and the watchdog ping loop that ``app`` runs on the event loop.

Every send is non-blocking and never raises: losing a notification must not take mail down
with it. A failed send is logged at debug level and reported by the ``False`` return value.
Without ``NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

# Fields are "KEY=value" lines; a newline inside a value would start a forged field.
_FIELD_SEPARATOR = "\n"


def _socket_address(value: str) -> str | None:
    """Turn a NOTIFY_SOCKET value into an AF_UNIX address, or None if we cannot speak to it.

    A leading '@' names a Linux abstract socket, which the kernel spells with a NUL byte.
    Other schemes (systemd 254's ``vsock:``) are not needed on a mail host and are ignored.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends service state to systemd; a silent no-op when not run under a notify unit."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._env = dict(env)
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        self._sock: socket.socket | None = None
        if raw and self._address is None:
            log.debug("sd_notify_socket_unsupported", notify_socket=raw)
        if self._address is not None:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
            except OSError as exc:
                log.debug("sd_notify_socket_failed", error=str(exc))
            else:
                self._sock = sock

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=value`` fields; True if the kernel took it."""
        if self._sock is None or self._address is None or not fields:
            return False
        payload = _FIELD_SEPARATOR.join(fields).encode("utf-8", "replace")
        try:
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # ENOENT/ECONNREFUSED (systemd gone), EAGAIN (queue full): never fatal.
            log.debug("sd_notify_send_failed", error=str(exc), fields=list(fields))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete and the listeners accept connections."""
        return self.notify("READY=1", *self._status_field(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts. MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) tell this
        reload from an earlier one; older systemd ignores the extra field."""
        return self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}", *self._status_field(status)
        )

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown starts (draining in-flight messages)."""
        return self.notify("STOPPING=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(*self._status_field(text))

    def watchdog(self) -> bool:
        """Keep-alive ping; systemd kills the service if these stop for WatchdogSec."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time in the current start/stop phase (a long drain, a slow reload)."""
        usec = max(1, int(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when no watchdog is armed for this process.

        Follows sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive integer, and if
        WATCHDOG_PID is set it must be our pid (the variables leak into children otherwise).
        """
        raw_usec = self._env.get("WATCHDOG_USEC")
        if not raw_usec:
            return None
        try:
            usec = int(raw_usec)
        except ValueError:
            log.debug("sd_watchdog_usec_invalid", value=raw_usec)
            return None
        if usec <= 0:
            return None
        raw_pid = self._env.get("WATCHDOG_PID")
        if raw_pid:
            try:
                pid = int(raw_pid)
            except ValueError:
                log.debug("sd_watchdog_pid_invalid", value=raw_pid)
                return None
            if pid != os.getpid():
                return None
        return usec / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _status_field(status: str | None) -> tuple[str, ...]:
        if status is None:
            return ()
        return ("STATUS=" + " ".join(status.splitlines()),)


async def watchdog_loop(
    notifier: Notifier,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Ping the watchdog at half its interval until cancelled; return at once if none is armed.

    It runs as a task on the daemon's own event loop on purpose: a loop that is blocked or
    wedged stops pinging, and systemd restarts the service (Restart=on-failure).
    """
    interval = notifier.watchdog_interval()
    if interval is None or not notifier.enabled:
        return
    period = interval / 2
    while True:
        notifier.watchdog()
        await sleep(period)
