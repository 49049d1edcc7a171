"""Start ``filterd serve`` as a real subprocess with a generated config, for integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class Daemon:
    """A running filterd; ``port`` is its SMTP port, ``logs()`` its parsed JSON log lines."""

    def __init__(
        self,
        workdir: Path,
        relay_port: int,
        *,
        rules: str | Path | None = None,
        extra: dict[str, Any] | None = None,
        metrics: bool = False,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "relay": f"127.0.0.1:{relay_port}",
            "rules": str(rules or REPO / "rules"),
            "state_dir": str(workdir / "state"),
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}" if metrics else None},
            "log": {"format": "json", "level": "info"},
            "limits": {"relay_timeout": 5, "drain_timeout": 10},
            "workers": 1,
        }
        for key, value in (extra or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        self.config_path = workdir / "filterd.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "filterd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "filterd", "serve", "-c", str(self.config_path)],
            stdout=self._log,
            stderr=self._log,
            cwd=REPO,
            env=env,
        )
        try:
            wait_port(self.port)
            if self.metrics_port is not None:
                # The metrics listener can come up a moment after the SMTP one (with workers,
                # the supervisor serves it): a scrape right after start must not be refused.
                wait_port(self.metrics_port)
        except TimeoutError:
            self.stop()
            raise RuntimeError("filterd did not start:\n" + self.log_path.read_text()) from None
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the daemon to exit on its own; return its exit code."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        self.proc = None
        return code

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        self.proc = None
        return code

    def quarantine(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``filterd quarantine ARGS -c <this daemon's config>`` and capture its output."""
        return subprocess.run(
            [sys.executable, "-m", "filterd", "quarantine", *args, "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return self.events(name)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
