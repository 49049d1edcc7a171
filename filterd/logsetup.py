"""Logging setup: structlog for filterd's own events, and stdlib ``logging`` (aiosmtpd's
``mail.log``, asyncio, warnings) routed through the same renderer, so every line on stderr
has one format: JSON objects one per line, or a human console format on a terminal.

filterd's own events are rendered by structlog and written straight to the stream; only
foreign records go through stdlib ``logging``. Routing our events through stdlib as well (a
LogRecord, the handler, then the ProcessorFormatter again) cost about 80 µs per line, a
noticeable share of a message's CPU on the busy path that writes one line per message.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Final, TextIO, cast

import structlog
from structlog.typing import Processor

LOG_FORMATS: Final = ("json", "console")

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# aiosmtpd logs every SMTP command line, peer address included, at INFO: several lines per
# message next to our one ``message_processed`` line. Keep it to warnings unless debugging.
_CHATTY_LOGGERS: Final = ("mail.log",)


class _FilterdHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our root handler; a distinct class so reconfiguring replaces only what we installed."""


class _LineWriter:
    """structlog's final logger: writes each rendered event as one line, under the stdlib
    handler's lock so that our lines and foreign ones never interleave."""

    def __init__(
        self, stream: TextIO, lock: AbstractContextManager[object], name: str | None
    ) -> None:
        self.stream = stream
        self.lock = lock
        self.name = name  # read by structlog.stdlib.add_logger_name

    def msg(self, message: str) -> None:
        with self.lock:
            self.stream.write(message + "\n")
            self.stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _parse_level(level: str) -> int:
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}"
        ) from None


def configure_logging(fmt: str | None, level: str, *, stream: TextIO | None = None) -> None:
    """Set up structlog and the stdlib root logger to write to ``stream`` (default stderr).

    ``fmt`` is "json", "console", or None for: console when the stream is a TTY, else JSON.
    ``level`` is a level name (debug, info, warning, error, critical). May be called again
    (e.g. after a reload changed ``log:``); it replaces its own previous setup.
    """
    out = stream if stream is not None else sys.stderr
    numeric = _parse_level(level)
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(LOG_FORMATS)}")

    # Applied to structlog events before they become LogRecords, and to foreign stdlib
    # records inside the formatter, so both end up with the same keys.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        # Tracebacks become one escaped string field, so a line stays one JSON object.
        final += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        final.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))

    handler = _FilterdHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared], processors=final
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _FilterdHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.NOTSET if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
        )
    logging.captureWarnings(True)

    lock = handler.lock  # created by the handler's constructor
    assert lock is not None

    def writer(*args: object) -> _LineWriter:
        return _LineWriter(out, lock, str(args[0]) if args else None)

    CachedLogger.configured += 1  # every CachedLogger binds anew on its next call
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            *final[1:],  # the formatter's renderer, without its stdlib-only first step
        ],
        logger_factory=writer,
        # Calls below the level return at once, before any processor runs.
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # Loggers are created at import time, before configuration; not caching lets a
        # later configure_logging (level change on reload, tests) reach them all.
        cache_logger_on_first_use=False,
    )


class CachedLogger:
    """A module's logger that binds structlog's logger once per configure_logging call.

    Module loggers exist before logging is configured, so they are structlog's lazy proxies
    with caching off (a later reconfiguration must reach them). Such a proxy builds a new
    bound logger (logger factory, processor list, wrapper) on every call, even one below the
    level: about 10 µs, twice per message. This keeps the bound logger until logging is
    configured again.
    """

    __slots__ = ("_bound", "_generation", "_name")
    configured: ClassVar[int] = 0  # how many times configure_logging ran

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._bound: structlog.typing.FilteringBoundLogger | None = None
        self._generation = -1

    def _logger(self) -> structlog.typing.FilteringBoundLogger:
        bound = self._bound
        if bound is None or self._generation != CachedLogger.configured:
            bound = self._bound = structlog.get_logger(self._name).bind()
            self._generation = CachedLogger.configured
        return bound

    def __getattr__(self, attr: str) -> object:
        return getattr(self._logger(), attr)

    # The levels called per message are found on the class, not by __getattr__: an attribute
    # the instance lacks first costs Python a formatted AttributeError (about a microsecond).
    @property
    def debug(self) -> Callable[..., Any]:
        return self._logger().debug

    @property
    def info(self) -> Callable[..., Any]:
        return self._logger().info

    @property
    def warning(self) -> Callable[..., Any]:
        return self._logger().warning

    @property
    def error(self) -> Callable[..., Any]:
        return self._logger().error


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger named ``name`` (use the module's __name__)."""
    return cast(structlog.typing.FilteringBoundLogger, CachedLogger(name))
