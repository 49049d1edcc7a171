"""``filterd serve`` as a child process for the end-to-end tier.

Owns: writing a config for a test (loopback ports, the shipped rules, a private quarantine and
state dir, JSON logs), starting ``python -m filterd serve -c FILE``, stopping it with SIGTERM (the
way systemd does), reading its JSON log lines, and running its CLI against the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .postfix import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
# The rules the e2e tests run: the shipped ones, or another set named by FILTERD_E2E_RULES.
SHIPPED_RULES = Path(os.environ.get("FILTERD_E2E_RULES") or REPO / "rules")
MESSAGE_EVENT = "message_processed"


class FilterdProcess:
    """One filterd daemon on loopback: ``listen`` where the MTA hands mail over, ``relay`` next."""

    def __init__(
        self, workdir: Path, *, listen_port: int, relay_port: int, rules: Path = SHIPPED_RULES
    ) -> None:
        self.workdir = workdir
        self.listen_port = listen_port
        self.relay_port = relay_port
        self.metrics_port = free_port()
        self.rules = rules
        self.config = workdir / "filterd.yaml"
        self.quarantine = workdir / "quarantine"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "filterd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.quarantine.mkdir(exist_ok=True)
        self.state_dir.mkdir(exist_ok=True)
        # JSON strings are valid YAML scalars: paths with odd characters stay safe.
        self.config.write_text(
            f"""\
listen: 127.0.0.1:{self.listen_port}
relay: 127.0.0.1:{self.relay_port}
rules: {json.dumps(str(self.rules))}
state_dir: {json.dumps(str(self.state_dir))}
quarantine:
  path: {json.dumps(str(self.quarantine))}
metrics:
  listen: 127.0.0.1:{self.metrics_port}
limits:
  session_timeout: 60
  relay_timeout: 20
networks: [127.0.0.0/8]
log:
  format: json
  level: info
"""
        )

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ)
        # Run the tree under test, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start(self, *, timeout: float = 30.0) -> None:
        if not self.config.exists():
            self.write_config()
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "filterd", "serve", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=self.workdir,
            env=self._env(),
        )
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"filterd serve exited with {code} at startup:\n{self.log_text()}"
                )
            try:
                wait_for_port(self.listen_port, timeout=0.2)
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"filterd did not listen in {timeout}s:\n{self.log_text()}"
                    ) from None
                continue
            return

    def stop(self, *, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (the drain); the exit code, or None if it was not running."""
        proc, self._proc = self._proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                raise
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> FilterdProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- logs ----------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (other lines, e.g. a traceback, are skipped)."""
        found = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                found.append(event)
        return found

    def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no matching filterd log event in {timeout}s:\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.1)

    def message_event(self, message_id: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """The ``message_processed`` line of the message with this Message-ID."""
        wanted = message_id.strip("<>")
        return self.wait_event(
            lambda e: (
                e.get("event") == MESSAGE_EVENT
                and str(e.get("message_id", "")).strip("<>") == wanted
            ),
            timeout=timeout,
        )

    # -- CLI -----------------------------------------------------------------------------

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``filterd ARGS... -c CONFIG`` (the config goes after the command words)."""
        return subprocess.run(
            [sys.executable, "-m", "filterd", *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.workdir,
            env=self._env(),
            check=False,
        )

    def quarantine_list(self) -> list[dict[str, Any]]:
        result = self.cli("quarantine", "list", "--json")
        assert result.returncode == 0, result.stderr
        entries = json.loads(result.stdout)
        assert isinstance(entries, list)
        return entries
