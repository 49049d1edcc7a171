"""Debian's Exim, unpacked beside Postfix, running docs/exim.md's configuration for the tests.

Owns: fetching ``exim4-daemon-light`` (plus the two libraries it needs that a Postfix host lacks)
with ``apt-get download`` and unpacking it with ``dpkg -x`` into a temp dir, since the package
cannot be installed next to Postfix; running it without its ``Debian-exim`` system user (an
nss_wrapper passwd maps that name to the ``mail`` user); extracting the ``exim`` blocks of
docs/exim.md; and rendering them, with test ports, into a whole configuration around them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .postfix import wait_for_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "exim.md"
PACKAGES = ("exim4-daemon-light", "libidn12", "libnss-wrapper")
LIBDIR = "usr/lib/x86_64-linux-gnu"
# The four blocks of docs/exim.md, named by the first words of their first comment line.
BLOCKS = ("main section", "acl_check_rcpt", "routers", "transports")
# The production address list the doc shows; the tests listen on loopback only instead.
DOC_PUBLIC_INTERFACES = "[0.0.0.0]:25 ; [::0]:25"


class EximUnavailable(Exception):
    """Exim could not be fetched or unpacked here; the reason goes into the skip message."""


@dataclass(frozen=True)
class EximBinary:
    exim: Path
    libdir: Path
    workdir: Path

    def env(self) -> dict[str, str]:
        """The environment that makes the unpacked binary find its libraries and its user."""
        passwd, group = self.workdir / "passwd", self.workdir / "group"
        if not passwd.exists():
            passwd.write_text(
                Path("/etc/passwd").read_text() + "Debian-exim:x:8:8::/nonexistent:/bin/false\n"
            )
            group.write_text(Path("/etc/group").read_text() + "Debian-exim:x:8:\n")
        env = dict(os.environ)
        env.update(
            LD_LIBRARY_PATH=str(self.libdir),
            LD_PRELOAD=str(self.libdir / "libnss_wrapper.so"),
            NSS_WRAPPER_PASSWD=str(passwd),
            NSS_WRAPPER_GROUP=str(group),
        )
        return env

    def run(
        self, config: Path, *args: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.exim), "-C", str(config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            check=False,
        )


def fetch_exim(workdir: Path) -> EximBinary:
    """``apt-get download`` + ``dpkg -x`` the packages into ``workdir``; raise EximUnavailable."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise EximUnavailable("apt-get/dpkg not available (not a Debian system)")
    workdir.mkdir(parents=True, exist_ok=True)
    # _apt cannot write to a root-only temp dir; apt then downloads as root, which is fine here.
    result = subprocess.run(
        ["apt-get", "download", *PACKAGES],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    debs = sorted(workdir.glob("*.deb"))
    if result.returncode != 0 or len(debs) < len(PACKAGES):
        raise EximUnavailable(
            f"apt-get download {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
        )
    root = workdir / "root"
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=120)
    binary = EximBinary(root / "usr/sbin/exim4", root / LIBDIR, workdir)
    if not binary.exim.exists() or not (binary.libdir / "libnss_wrapper.so").exists():
        raise EximUnavailable("the unpacked packages do not contain exim4 and libnss_wrapper.so")
    # Not setuid: Exim re-executes itself as its own user (bounces, queue runs), and a setuid
    # exec puts the loader in secure mode, which ignores LD_LIBRARY_PATH and LD_PRELOAD.
    binary.exim.chmod(0o755)
    return binary


def doc_blocks(doc: Path = DOC) -> dict[str, str]:
    """The ``exim`` code blocks of the doc, keyed by the first words of their first comment."""
    found: dict[str, str] = {}
    for match in re.finditer(r"```exim\n(.*?)```", doc.read_text(), re.DOTALL):
        text = match.group(1)
        first = text.splitlines()[0]
        for name in BLOCKS:
            if first.startswith(f"# {name}"):
                found[name] = text
    missing = set(BLOCKS) - set(found)
    if missing:
        raise AssertionError(f"{doc.name} lacks the exim blocks {sorted(missing)}")
    return found


@dataclass(frozen=True)
class EximPorts:
    smtp: int
    filter: int
    reinject: int
    sink: int


def render_config(
    blocks: Mapping[str, str], ports: EximPorts, workdir: Path, exim_path: Path
) -> str:
    """A whole Exim configuration: the doc's blocks (ports swapped) inside a test frame that
    keeps spool and logs in ``workdir`` and delivers what leaves filterd to the sink."""

    def ports_of(text: str) -> str:
        return text.replace("10025", str(ports.reinject)).replace("10024", str(ports.filter))

    main = blocks["main section"]
    if DOC_PUBLIC_INTERFACES not in main:
        raise AssertionError(f"the main-section block no longer lists {DOC_PUBLIC_INTERFACES}")
    main = ports_of(main.replace(DOC_PUBLIC_INTERFACES, f"[127.0.0.1]:{ports.smtp}"))
    return f"""\
# --- test frame (not part of docs/exim.md) ---
exim_path = {exim_path}
keep_environment = LD_LIBRARY_PATH : LD_PRELOAD : NSS_WRAPPER_PASSWD : NSS_WRAPPER_GROUP
primary_hostname = exim-e2e.filterd.test
qualify_domain = filterd.test
spool_directory = {workdir}/spool
log_file_path = {workdir}/log/%slog
pid_file_path = {workdir}/exim.pid
domainlist local_domains =
acl_smtp_rcpt = acl_check_rcpt
host_lookup =
rfc1413_hosts =
deliver_drop_privilege
# --- docs/exim.md ---
{main}
begin acl

acl_check_rcpt:
{ports_of(blocks["acl_check_rcpt"])}
  # test frame: the site's own relay rule
  accept hosts = 127.0.0.1
  deny

begin routers

{ports_of(blocks["routers"])}
# test frame: where the site's normal routing would deliver
to_sink:
  driver = manualroute
  route_list = * 127.0.0.1
  self = send
  transport = to_sink

begin transports

{ports_of(blocks["transports"])}
to_sink:
  driver = smtp
  port = {ports.sink}
  allow_localhost
  hosts_avoid_tls = *

begin retry

* * F,1h,1s
"""


class EximDaemon:
    """``exim -bdf -q1s`` on a rendered config: a private Exim for one test module."""

    def __init__(
        self, binary: EximBinary, config_text: str, workdir: Path, ports: EximPorts
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.ports = ports
        self.config = workdir / "exim.conf"
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("spool", "log"):
            (workdir / sub).mkdir(exist_ok=True)
            os.chown(workdir / sub, 8, 8)  # the "mail" user that Debian-exim maps to
            # Exim writes here as root with the exim group, or as the exim user.
            (workdir / sub).chmod(0o770)
        workdir.chmod(0o755)
        self.config.write_text(config_text)
        self.config.chmod(0o644)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30) -> None:
        self._proc = subprocess.Popen(
            [str(self.binary.exim), "-C", str(self.config), "-bdf", "-q1s"],
            env=self.binary.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "daemon.err").open("wb"),
        )
        for port in (self.ports.smtp, self.ports.reinject):
            wait_for_port(port, timeout=timeout)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.binary.run(self.config, *args)

    def mainlog(self) -> str:
        path = self.workdir / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def exim_id_for(self, message_id: str, *, timeout: float = 30) -> str:
        """Exim's id for the message whose Message-ID is given (its "<=" arrival line)."""
        mid = re.escape(message_id.strip("<>"))
        return self.wait_log(rf"^\S+ \S+ (\S+) <= .* id={mid}$", timeout=timeout).group(1)

    def wait_log(self, pattern: str, *, timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.mainlog())
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not in Exim's mainlog:\n{self.mainlog()[-3000:]}"
                )
            time.sleep(0.1)
