"""A private Postfix instance for the end-to-end tier, wired to a content filter on loopback.

Owns: rendering main.cf and master.cf for both filter modes (after-queue ``content_filter`` with
a re-injection listener, per Postfix FILTER_README; before-queue ``smtpd_proxy_filter``, per
SMTPD_PROXY_README), starting and stopping the instance (``postfix -c DIR start/stop``, as
root, with its own config, queue and data directories under a temp dir), and reading its queue
and its log. Final delivery goes to ``relayhost = [127.0.0.1]:SINK`` (a test-side SMTP sink).

``filter_master_cf`` renders the filter-specific master.cf entries; docs/postfix.md shows the
same entries with the production ports, and a test keeps the two in step.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POSTFIX = Path("/usr/sbin/postfix")
POSTQUEUE = Path("/usr/sbin/postqueue")
POSTKICK = Path("/usr/sbin/postkick")
HOSTNAME = "postfix-e2e.filterd.test"
# The transport name that main.cf/master.cf use for filterd (after-queue mode).
FILTER_TRANSPORT = "filterd"


class Mode(enum.Enum):
    AFTER_QUEUE = "after-queue"
    BEFORE_QUEUE = "before-queue"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    """Where each hop listens: the public smtpd, filterd, the re-injection smtpd, the sink."""

    smtp: int
    filter: int
    reinject: int
    sink: int

    @classmethod
    def pick(cls) -> Ports:
        ports: set[int] = set()
        while len(ports) < 4:
            ports.add(free_port())
        smtp, filter_, reinject, sink = sorted(ports)
        return cls(smtp=smtp, filter=filter_, reinject=reinject, sink=sink)


def _service(name: str, kind: str, maxproc: str, command: str, *options: str) -> str:
    """One master.cf entry: private=n for inet services, unpriv -, chroot n, wakeup -."""
    private = "n" if kind == "inet" else "-"
    head = f"{name:<15} {kind:<5} {private:<3} -   n   -   {maxproc:<4} {command}\n"
    return head + "".join(f"  -o {option}\n" for option in options)


def filter_master_cf(
    mode: Mode,
    *,
    smtp_service: str,
    filter_port: int,
    reinject_port: int,
    reinject_recipient_restrictions: str = "permit_mynetworks,reject",
) -> str:
    """The master.cf entries that put filterd in the mail path (the part docs/postfix.md shows).

    ``smtp_service`` is the public listener's service field ("smtp" in production).
    """
    reinject = f"127.0.0.1:{reinject_port}"
    if mode is Mode.AFTER_QUEUE:
        return (
            _service(
                smtp_service,
                "inet",
                "-",
                "smtpd",
                f"content_filter={FILTER_TRANSPORT}:[127.0.0.1]:{filter_port}",
                "receive_override_options=no_address_mappings",
            )
            + _service(
                FILTER_TRANSPORT,
                "unix",
                "10",
                "smtp",
                "smtp_send_xforward_command=yes",
                "disable_mime_output_conversion=yes",
                "smtp_generic_maps=",
            )
            + _service(
                reinject,
                "inet",
                "10",
                "smtpd",
                "content_filter=",
                "receive_override_options=no_unknown_recipient_checks,no_header_body_checks,"
                "no_milters",
                "smtpd_helo_restrictions=",
                "smtpd_client_restrictions=",
                "smtpd_sender_restrictions=",
                "smtpd_relay_restrictions=",
                f"smtpd_recipient_restrictions={reinject_recipient_restrictions}",
                "smtpd_data_restrictions=",
                "mynetworks=127.0.0.0/8",
                "smtpd_authorized_xforward_hosts=127.0.0.0/8",
            )
        )
    return _service(
        smtp_service,
        "inet",
        "20",
        "smtpd",
        f"smtpd_proxy_filter=127.0.0.1:{filter_port}",
        "smtpd_proxy_timeout=200s",
        "smtpd_client_connection_count_limit=10",
    ) + _service(
        reinject,
        "inet",
        "-",
        "smtpd",
        "content_filter=",
        "receive_override_options=no_unknown_recipient_checks",
        "smtpd_helo_restrictions=",
        "smtpd_client_restrictions=",
        "smtpd_sender_restrictions=",
        "smtpd_relay_restrictions=",
        f"smtpd_recipient_restrictions={reinject_recipient_restrictions}",
        "smtpd_data_restrictions=",
        "mynetworks=127.0.0.0/8",
        "smtpd_authorized_xforward_hosts=127.0.0.0/8",
    )


def unfiltered_master_cf(*, smtp_service: str) -> str:
    """The public listener with no filter: what undoing either mode leaves."""
    return _service(smtp_service, "inet", "-", "smtpd")


# Postfix's own services, as in Debian's master.cf but never chrooted: the instance lives in a
# temp dir that has no chroot copy of /etc.
_BASE_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def main_cf(base: Path, ports: Ports) -> dict[str, str]:
    """main.cf of the test instance: everything goes to the sink, retries come fast."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(base / "queue"),
        "data_directory": str(base / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": HOSTNAME,
        "mydomain": "filterd.test",
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "relay_domains": "",
        "relayhost": f"[127.0.0.1]:{ports.sink}",
        "mynetworks": "127.0.0.0/8",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "smtp_dns_support_level": "disabled",
        "smtpd_banner": "$myhostname ESMTP",
        "biff": "no",
        "append_dot_mydomain": "no",
        "smtputf8_enable": "yes",
        "notify_classes": "",
        "delay_warning_time": "0",
        "maillog_file": str(base / "maillog"),
        "maillog_file_prefixes": str(base),
        # Fast retries, so the "filterd was down" test takes seconds, not minutes.
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtp_connect_timeout": "5s",
        "maximal_queue_lifetime": "1h",
        "bounce_queue_lifetime": "1h",
    }


def _render_main_cf(settings: Mapping[str, str]) -> str:
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


class PostfixInstance:
    """One private Postfix (own config/queue/data dirs) with filterd wired in per ``mode``."""

    def __init__(
        self,
        mode: Mode,
        ports: Ports,
        *,
        reinject_access: Mapping[str, str] | None = None,
    ) -> None:
        """``reinject_access`` maps recipients to an access(5) action (a reply such as
        "550 5.1.1 ..." or "HOLD ...") that the re-injection listener applies before
        permit_mynetworks: how a test makes the next hop refuse or park a recipient."""
        self.mode = mode
        self.ports = ports
        # Postfix (user postfix) must traverse the path, so not pytest's 0700 tmp_path.
        self.base = Path(tempfile.mkdtemp(prefix="filterd-e2e-postfix-"))
        self.base.chmod(0o755)
        self.config_dir = self.base / "etc"
        self.maillog = self.base / "maillog"
        self._reinject_access = dict(reinject_access or {})
        self._started = False

    # -- configuration -------------------------------------------------------------------

    def _write_config(self) -> None:
        self.config_dir.mkdir(exist_ok=True)
        (self.base / "queue").mkdir(exist_ok=True)
        (self.base / "data").mkdir(exist_ok=True)
        shutil.chown(self.base / "data", "postfix", "postfix")
        # postlogd writes the log; while Postfix is stopped, commands such as postsuper append
        # to it themselves as the postfix user.
        self.maillog.touch()
        shutil.chown(self.maillog, "postfix", "postfix")
        restrictions = "permit_mynetworks,reject"
        if self._reinject_access:
            access = self.config_dir / "reinject_access"
            access.write_text(
                "".join(f"{addr} {action}\n" for addr, action in self._reinject_access.items())
            )
            restrictions = f"check_recipient_access,texthash:{access},{restrictions}"
        (self.config_dir / "main.cf").write_text(_render_main_cf(main_cf(self.base, self.ports)))
        (self.config_dir / "master.cf").write_text(
            _BASE_MASTER_CF
            + filter_master_cf(
                self.mode,
                smtp_service=f"127.0.0.1:{self.ports.smtp}",
                filter_port=self.ports.filter,
                reinject_port=self.ports.reinject,
                reinject_recipient_restrictions=restrictions,
            )
        )

    # -- lifecycle -----------------------------------------------------------------------

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(POSTFIX), "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"postfix {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n--- maillog ---\n{self.log()[-4000:]}"
            )
        return result

    def start(self, *, timeout: float = 30.0) -> None:
        self._write_config()
        self._postfix("start")
        self._started = True
        for port in (self.ports.smtp, self.ports.reinject):
            wait_for_port(port, timeout=timeout)
        self.wait_qmgr_listening(timeout=timeout)

    def wait_qmgr_listening(self, *, timeout: float) -> None:
        """Wait until qmgr takes a wake-up request.

        Right after ``postfix start`` the SMTP port can be open while qmgr is not serving its
        trigger socket yet: ``postkick`` then dies of SIGPIPE. cleanup's "new mail" wake-up
        sent in that window is lost too, and the message waits in ``incoming`` for qmgr's
        300 s timer. So start() waits until a harmless scan request goes through.
        """
        deadline = time.monotonic() + timeout
        while self.kick_incoming_scan() != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"qmgr takes no requests:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def master_pid(self) -> int | None:
        pid_file = self.base / "queue" / "pid" / "master.pid"
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, *, remove: bool = True) -> None:
        if self._started:
            pid = self.master_pid()
            self._postfix("stop", check=False)
            if pid is not None and not _wait_gone(pid, timeout=15):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._started = False
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def undo_filter(self, *, timeout: float = 30.0) -> None:
        """docs/postfix.md's after-queue undo: master.cf without the filter, Postfix stopped,
        the queued mail requeued (which drops its content_filter record), Postfix started."""
        (self.config_dir / "master.cf").write_text(
            _BASE_MASTER_CF + unfiltered_master_cf(smtp_service=f"127.0.0.1:{self.ports.smtp}")
        )
        pid = self.master_pid()
        self._postfix("stop")
        if pid is not None:
            _wait_gone(pid, timeout=timeout)
        result = subprocess.run(
            [
                "postsuper",
                "-c",
                str(self.config_dir),
                "-r",
                "ALL",
                "incoming",
                "active",
                "deferred",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"postsuper -r failed: {result.stderr}")
        self._postfix("start")
        wait_for_port(self.ports.smtp, timeout=timeout)
        self.wait_qmgr_listening(timeout=timeout)

    # -- queue and log -------------------------------------------------------------------

    def flush(self) -> None:
        """``postqueue -f``: retry deferred mail now (and forget dead-destination state)."""
        subprocess.run(
            [str(POSTQUEUE), "-c", str(self.config_dir), "-f"],
            capture_output=True,
            timeout=30,
            check=True,
        )

    def queue(self) -> list[dict[str, Any]]:
        """The queue as ``postqueue -j`` sees it: one dict per message."""
        result = subprocess.run(
            [str(POSTQUEUE), "-c", str(self.config_dir), "-j"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def kick_incoming_scan(self) -> int:
        """Ask qmgr to scan the incoming queue, time stamps ignored (``postkick public qmgr
        AI``); postkick's status.

        A message can sit in ``incoming`` longer than a test waits: when qmgr finds a queue
        file still locked by the delivery agent that just deferred it ("skipped, still being
        delivered", seen right after ``postfix start``), it puts the file back into incoming
        with its time stamp set ahead, and ordinary scans skip it until then. ``A`` makes the
        scan take it anyway. Mail is not lost either way; the kick keeps a test from waiting.
        """
        return subprocess.run(
            [str(POSTKICK), "-c", str(self.config_dir), "public", "qmgr", "AI"],
            capture_output=True,
            timeout=30,
            check=False,
        ).returncode

    def wait_in_queue(
        self, queue_id: str, queue_name: str, *, or_in: str | None = None, timeout: float = 30.0
    ) -> None:
        """Wait until ``postqueue -j`` lists the message in ``queue_name`` (hold, deferred...),
        or in ``or_in`` when that is given."""
        deadline = time.monotonic() + timeout
        next_kick = time.monotonic() + 3.0
        while True:
            where = {m["queue_id"]: m["queue_name"] for m in self.queue()}
            if where.get(queue_id) in (queue_name, or_in):
                return
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(
                    f"{queue_id} not in the {queue_name} queue: {where}\n"
                    f"--- maillog ---\n{self.log()[-4000:]}"
                )
            if where.get(queue_id) == "incoming" and queue_name != "incoming" and now > next_kick:
                self.kick_incoming_scan()
                next_kick = now + 3.0
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, *, timeout: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` (a regex, MULTILINE) in the maillog, waiting for it."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not in the Postfix log after {timeout}s:\n{self.log()[-4000:]}"
                )
            time.sleep(0.1)

    def queue_id_for(self, message_id: str, *, timeout: float = 30.0) -> str:
        """The queue id the first (public) smtpd gave a message, found by its Message-ID.

        cleanup logs "QUEUEID: message-id=<...>" for each queue file; the first one is the
        public smtpd's (after-queue) or the re-injection smtpd's (before-queue, where the
        public smtpd makes no queue file).
        """
        mid = re.escape(message_id.strip("<>"))
        match = self.wait_log(rf"cleanup\[\d+\]: ([0-9A-F]+): message-id=<{mid}>", timeout=timeout)
        return match.group(1)


def wait_for_port(port: int, *, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _wait_gone(pid: int, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
