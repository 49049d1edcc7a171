"""A raw-socket SMTP client for fault tests, and a scraper for filterd's /metrics.

smtplib hides exactly what fault tests need to control: it cannot send commands out of order,
pipeline without PIPELINING, disconnect half-way through DATA or send bytes that are not valid
SMTP. ``RawClient`` writes whatever bytes it is given and reads replies as they come, with a
timeout on every read so a stalled server fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def last(self) -> str:
        return self.lines[-1] if self.lines else ""

    def __str__(self) -> str:
        return f"{self.code} {self.last}"


class ServerClosed(ConnectionError):
    """The server closed the connection where a reply was expected."""


class RawClient:
    """One SMTP connection driven byte by byte: ``with RawClient(port) as c: c.ehlo()``."""

    def __init__(self, port: int, *, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buf = bytearray()
        self.greeting = self.read_reply()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Vanish without QUIT (a reset, so no FIN-then-wait games)."""
        with contextlib.suppress(OSError):
            # linger on with a zero timeout: close() sends a RST
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    # --- low level -------------------------------------------------------------------------
    def send(self, data: bytes | str) -> None:
        self.sock.sendall(
            data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        )

    def _readline(self) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ServerClosed(
                    f"server closed the connection (pending {bytes(self._buf)[:80]!r})"
                )
            self._buf += chunk

    def read_reply(self) -> Reply:
        lines: list[str] = []
        while True:
            raw = self._readline().decode("utf-8", "replace").rstrip("\r\n")
            if len(raw) < 3 or not raw[:3].isdigit():
                raise AssertionError(f"malformed reply line {raw!r}")
            lines.append(raw[4:])
            if len(raw) == 3 or raw[3] != "-":
                return Reply(int(raw[:3]), tuple(lines))

    def read_replies(self, count: int) -> list[Reply]:
        return [self.read_reply() for _ in range(count)]

    def is_pending(self, wait: float = 0.5) -> bool:
        """Does the server send something (or close) within ``wait`` seconds, unasked?"""
        if self._buf:
            return True
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        if not chunk:
            raise ServerClosed("server closed the connection")
        self._buf += chunk
        return True

    def unasked_replies(self, quiet: float = 1.0) -> list[Reply]:
        """Replies that arrive without a command, until ``quiet`` seconds pass or the close."""
        replies: list[Reply] = []
        try:
            while self.is_pending(quiet):
                replies.append(self.read_reply())
        except ServerClosed:
            pass
        return replies

    def is_closed(self, wait: float = 5.0) -> bool:
        """True when the server closes the connection within ``wait`` seconds (data dropped)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)

    # --- commands --------------------------------------------------------------------------
    def command(self, line: bytes | str) -> Reply:
        self.send(
            (line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")) + b"\r\n"
        )
        return self.read_reply()

    def ehlo(self, name: str = "client.faults.test") -> Reply:
        return self.command(f"EHLO {name}")

    def data(self, body: bytes) -> Reply:
        """DATA, then ``body`` dot-stuffed and terminated; the final reply (or the DATA refusal)."""
        reply = self.command("DATA")
        if reply.code != 354:
            return reply
        self.send(stuff(body))
        return self.read_reply()

    def sendmail(self, sender: str, recipients: list[str], body: bytes) -> Reply:
        """One lock-step transaction; returns the first refusal or the final reply. RSET after
        a refusal so the session stays usable."""
        reply = self.command(f"MAIL FROM:<{sender}>")
        if reply.code != 250:
            self.command("RSET")
            return reply
        accepted = 0
        last = reply
        for rcpt in recipients:
            last = self.command(f"RCPT TO:<{rcpt}>")
            accepted += last.code in (250, 251)
        if not accepted:
            self.command("RSET")
            return last
        return self.data(body)

    def quit(self) -> None:
        with contextlib.suppress(OSError, ServerClosed):
            self.command("QUIT")
        self.close()


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF message and append the end-of-data marker, as a client must."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def answers(port: int, timeout: float = 5.0) -> bool:
    """Does a fresh session get a greeting and an EHLO/NOOP answer within ``timeout``?"""
    try:
        with RawClient(port, timeout=timeout) as client:
            if client.greeting.code != 220:
                return False
            ok = client.ehlo().code == 250 and client.command("NOOP").code == 250
            client.quit()
            return ok
    except (OSError, ServerClosed):
        return False


# --- metrics ----------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics_port: int) -> Samples:
    """Every sample of filterd's /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} for one metric, e.g. messages by action."""
    out: dict[str, float] = {}
    for (sample_name, labels), sample_value in samples.items():
        if sample_name == name:
            out[dict(labels).get(label, "")] = (
                out.get(dict(labels).get(label, ""), 0.0) + sample_value
            )
    return out


def wait_until(predicate: object, timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; returns its last value as a bool."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
