"""Observability surface of filterd: the asyncio HTTP endpoint that serves ``/metrics`` and
``/healthz``, and the one import point for the metrics (``metrics``) and logging
(``logsetup``) APIs that the composition root wires.

The endpoint is deliberately tiny: plain asyncio streams, one request per connection, every
read bounded in size and time, so a stuck or hostile scraper cannot hold resources.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from filterd.logsetup import LOG_FORMATS, configure_logging, get_logger
from filterd.metrics import (
    OTHER_RULE,
    Metrics,
    RefusalReason,
    RelayErrorReason,
    RuleMode,
    make_registry,
    mark_process_dead,
    multiprocess_enabled,
    reset_multiprocess_dir,
)

__all__ = [
    "LOG_FORMATS",
    "METRICS_CONTENT_TYPE",
    "OTHER_RULE",
    "Metrics",
    "RefusalReason",
    "RelayErrorReason",
    "RuleMode",
    "configure_logging",
    "get_logger",
    "make_registry",
    "mark_process_dead",
    "multiprocess_enabled",
    "reset_multiprocess_dir",
    "start_metrics_server",
]

# generate_latest writes the classic text format; 0.0.4 is its content type (what
# prometheus_client's own handler sends when the scraper does not negotiate).
METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

_MAX_LINE: Final = 8192  # bytes per request or header line (StreamReader limit)
_MAX_HEADERS: Final = 100
_REQUEST_TIMEOUT: Final = 10.0  # seconds for a whole request/response exchange

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}

_log = get_logger(__name__)


class _BadRequest(Exception):
    """The request could not be read as HTTP/1.x; answer 400 and close."""


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """Read the request line and headers; return (method, path) or None at a clean EOF."""
    try:
        line = await reader.readline()
    except ValueError as exc:  # over _MAX_LINE: StreamReader wraps LimitOverrunError
        raise _BadRequest from exc
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest
    method, target, _version = parts
    for _ in range(_MAX_HEADERS):
        try:
            header = await reader.readline()
        except ValueError as exc:
            raise _BadRequest from exc
        if header in (b"\r\n", b"\n", b""):
            break
    else:
        raise _BadRequest
    return method, target.split("?", 1)[0]


def _respond(
    registry: CollectorRegistry, method: str, path: str
) -> tuple[int, str, bytes, dict[str, str]]:
    """Route one request: (status, content type, body, extra headers)."""
    if method not in ("GET", "HEAD"):
        return 405, "text/plain; charset=utf-8", b"method not allowed\n", {"Allow": "GET, HEAD"}
    if path == "/metrics":
        return 200, METRICS_CONTENT_TYPE, generate_latest(registry), {}
    if path == "/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n", {}
    return 404, "text/plain; charset=utf-8", b"not found\n", {}


def _render(status: int, ctype: str, body: bytes, extra: dict[str, str], *, head: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


async def _serve(
    registry: CollectorRegistry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            try:
                request = await _read_request(reader)
            except _BadRequest:
                writer.write(
                    _render(400, "text/plain; charset=utf-8", b"bad request\n", {}, head=False)
                )
                await writer.drain()
                return
            if request is None:
                return
            method, path = request
            try:
                status, ctype, body, extra = _respond(registry, method, path)
            except Exception:
                # A broken collector (e.g. an unreadable multiprocess file) must not take the
                # endpoint down; the scrape fails visibly (up == 0) and the cause is logged.
                _log.exception("metrics_scrape_failed")
                status, ctype, body, extra = 500, "text/plain; charset=utf-8", b"error\n", {}
            writer.write(_render(status, ctype, body, extra, head=method == "HEAD"))
            await writer.drain()
    except (TimeoutError, ConnectionError):
        pass  # slow or vanished client: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await writer.wait_closed()


async def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> asyncio.Server:
    """Listen on host:port (port 0 picks a free one) and serve GET /metrics and /healthz.

    Returns the started ``asyncio.Server``; close it with ``close()`` + ``wait_closed()``.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve(registry, reader, writer)

    return await asyncio.start_server(handle, host, port, limit=_MAX_LINE)
