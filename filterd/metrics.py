"""Prometheus metrics of filterd: the fixed metric names, their bounded label sets, and the
registry used for exposition, in one process or across several worker processes.

Every label value comes from a closed set (actions, relay error reasons, refusal reasons,
reload results) or from the names of the currently loaded rules, so no label can ever carry
an address, a domain or an IP. The HTTP endpoint that serves the registry lives in ``observe``.

Multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set *before prometheus_client is first
imported*, every metric writes to per-process mmap files in that directory and ``make_registry``
returns a registry that merges them at scrape time. Gauges declare how the merge works
(``multiprocess_mode``); see docs/monitoring.md for the reasoning behind each choice.
"""

from __future__ import annotations

import enum
import glob
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

from filterd import __version__
from filterd.errors import StartupError
from filterd.model import Action

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# Mail is slow compared with HTTP: a message with a big attachment, a slow next hop or a
# multi-pattern scan of a large body can take tens of seconds. The upper buckets bracket the
# alert threshold (60 s) and the MTA timeouts it protects (Postfix smtpd_proxy_timeout 100 s).
PROCESSING_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    90.0,
    120.0,
)
# Sizes from a bare notification (~1 KiB) to 100 MB, beyond any sane message_size_limit.
SIZE_BUCKETS: Final = (
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    10485760.0,
    26214400.0,
    52428800.0,
    104857600.0,
)

OTHER_RULE: Final = "other"
"""Label value for hits of rules outside the set given to ``set_rule_names``."""

# The rule-name grammar of rule files. A name that fits it cannot be an address (no "@"),
# a domain or an IPv4/IPv6 address (no "." or ":"), which is what keeps rule labels safe.
_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


class RelayErrorReason(enum.Enum):
    """Why talking to the next hop failed (label ``reason`` of filterd_relay_errors_total)."""

    CONNECT = "connect"  # TCP connect failed or was refused
    TIMEOUT = "timeout"  # relay_timeout expired at any stage
    PROTOCOL = "protocol"  # unparsable or out-of-sequence reply
    REFUSED_4XX = "refused_4xx"  # the next hop answered a transient failure
    REFUSED_5XX = "refused_5xx"  # the next hop answered a permanent failure
    CLOSED = "closed"  # the next hop closed the connection mid-transaction


class RefusalReason(enum.Enum):
    """Why a client connection was refused before SMTP started."""

    ACL = "acl"  # client address outside ``networks``
    LIMIT = "limit"  # ``limits.max_connections`` reached
    CLIENT_LIMIT = "client_limit"  # ``limits.max_connections_per_client`` reached
    SHUTDOWN = "shutdown"  # the daemon is draining after SIGTERM


class RuleMode(enum.Enum):
    """Whether a rule hit acted (enforce) or was only observed (shadow)."""

    ENFORCE = "enforce"
    SHADOW = "shadow"


def multiprocess_enabled() -> bool:
    """True when PROMETHEUS_MULTIPROC_DIR is set, i.e. metrics live in shared mmap files."""
    return bool(os.environ.get(MULTIPROC_ENV))


class _MultiProcessRegistry(CollectorRegistry):
    """An exposition-only registry that merges the per-process files; ``Metrics`` recognises
    it and does not register live in-process metrics in it (they would be counted twice)."""


def make_registry() -> CollectorRegistry:
    """The registry to pass to ``Metrics`` and to the metrics server.

    Without PROMETHEUS_MULTIPROC_DIR: a fresh in-process registry. With it: a registry whose
    only collector is a ``MultiProcessCollector`` over that directory, so a scrape served by
    any one process shows the merged view of all of them.
    """
    if not multiprocess_enabled():
        return CollectorRegistry()
    if values.ValueClass is values.MutexValue:
        # prometheus_client picks its value storage once, at import; an env var set later is
        # silently ignored and the scrape would show nothing. Refuse loudly instead.
        raise RuntimeError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported; "
            "set it in the environment before the process starts"
        )
    _check_multiprocess_dir(os.environ[MULTIPROC_ENV])
    registry = _MultiProcessRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def _check_multiprocess_dir(path: str) -> None:
    if not (os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)):
        # Every metric update would fail (each process writes its own files there): one line
        # and exit 78 rather than a traceback from deep inside prometheus_client.
        raise StartupError(
            f"cannot use the metrics folder {path} ({MULTIPROC_ENV}): "
            "not a folder this process can write"
        )


def reset_multiprocess_dir() -> None:
    """Delete the metric files of a previous run. Call once in the parent before any worker
    starts: stale files would resurrect old gauges and old processes' counters."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return
    _check_multiprocess_dir(path)
    for name in glob.glob(os.path.join(path, "*.db")):
        Path(name).unlink(missing_ok=True)


def mark_process_dead(pid: int) -> None:
    """Drop the live gauges (sessions_active, ...) of a worker that exited. Call from the
    parent when it reaps a worker; a no-op without multiprocess mode. Counters and histograms
    of the dead worker stay, so totals never go backwards."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Metrics:
    """All filterd metrics, created in (or, in multiprocess mode, merged by) ``registry``.

    The methods are what the daemon calls; each is cheap and never raises for valid input.
    Invalid closed-set values (an unknown action or reason) raise ``ValueError``: that is a
    bug in the caller, and silently inventing a label would break the cardinality bound.
    """

    def __init__(self, registry: CollectorRegistry, *, version: str = __version__) -> None:
        # In multiprocess mode the values go to mmap files whatever the registry; registering
        # them as well in the merging registry would export every series twice.
        reg: CollectorRegistry | None = (
            None if isinstance(registry, _MultiProcessRegistry) else registry
        )
        self._multiprocess = multiprocess_enabled()
        self._rule_names: frozenset[str] = frozenset()

        self._messages = Counter(
            "filterd_messages_total",
            "Messages handled, by the action finally taken.",
            ["action"],
            registry=reg,
        )
        self._rule_hits = Counter(
            "filterd_rule_hits_total",
            "Rule matches; rule is a loaded rule name or 'other', mode is enforce or shadow.",
            ["rule", "mode"],
            registry=reg,
        )
        self._processing = Histogram(
            "filterd_message_processing_seconds",
            "Time from end of DATA to the final reply, rules and delivery included.",
            buckets=PROCESSING_BUCKETS,
            registry=reg,
        )
        self._size = Histogram(
            "filterd_message_size_bytes",
            "Size of received messages in bytes.",
            buckets=SIZE_BUCKETS,
            registry=reg,
        )
        self._relay_errors = Counter(
            "filterd_relay_errors_total",
            "Failures talking to the next hop, its refusals of a message included, by reason.",
            ["reason"],
            registry=reg,
        )
        self._sessions_active = Gauge(
            "filterd_sessions_active",
            "SMTP sessions currently open.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._sessions = Counter(
            "filterd_sessions_total",
            "SMTP sessions accepted since start.",
            registry=reg,
        )
        self._refused = Counter(
            "filterd_connections_refused_total",
            "Client connections refused before SMTP, by reason ("
            + ", ".join(r.value for r in RefusalReason)
            + ").",
            ["reason"],
            registry=reg,
        )
        self._quarantine = Gauge(
            "filterd_quarantine_messages",
            "Messages currently held in the quarantine.",
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self._reloads = Counter(
            "filterd_config_reloads_total",
            "Config and rule (re)loads, by result.",
            ["result"],
            registry=reg,
        )
        self._reload_ok = Gauge(
            "filterd_config_last_reload_success",
            "1 if the last config reload succeeded (the old set keeps serving if not), else 0.",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self._reload_ok_time = Gauge(
            "filterd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self._rules_loaded = Gauge(
            "filterd_rules_loaded",
            "Rules in the currently loaded rule set.",
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self._build_info = Gauge(
            "filterd_build_info",
            "Always 1; the version label says which filterd runs.",
            ["version"],
            registry=reg,
            multiprocess_mode="livemax",
        )

        # Pre-create every closed-set child so each series exports 0 from the first scrape:
        # rate() and increase() then see the first event, and "no mail" alerts have a series.
        # The children a message touches, looked up once: labels() validates and locks on
        # every call, and this runs for every message.
        self._message_counters: dict[str | Action, Counter] = {}
        self._rule_hit_counters: dict[tuple[str, RuleMode], Counter] = {}
        for action in Action:
            self._message_counters[action.value] = self._message_counters[action] = (
                self._messages.labels(action=action.value)
            )
        for reason in RelayErrorReason:
            self._relay_errors.labels(reason=reason.value)
        for refusal in RefusalReason:
            self._refused.labels(reason=refusal.value)
        for result in ("success", "failure"):
            self._reloads.labels(result=result)
        # No failed reload yet: a daemon that started has, by definition, a valid config.
        self._reload_ok.set(1)
        self._build_info.labels(version=version).set(1)

    # -- rules -------------------------------------------------------------------------

    def set_rule_names(self, names: Iterable[str]) -> None:
        """Declare the rule names of the set just (re)loaded: the only values the ``rule``
        label may take besides ``other``. Series of rules no longer loaded are dropped (in a
        single process; multiprocess files cannot forget a series until restart)."""
        new = frozenset(names)
        bad = sorted(n for n in new if not _RULE_NAME.fullmatch(n))
        if bad:
            raise ValueError(f"not valid rule names (metrics labels): {bad}")
        if not self._multiprocess:
            for gone in self._rule_names - new:
                for mode in RuleMode:
                    self._rule_hits.remove(gone, mode.value)
        self._rule_names = new
        self._rule_hit_counters.clear()  # a name may now count as itself, or as "other"
        self._rules_loaded.set(len(new))

    def _rule_label(self, name: str) -> str:
        return name if name in self._rule_names else OTHER_RULE

    # -- per message -------------------------------------------------------------------

    def message_processed(
        self,
        action: str | Action,
        duration_s: float,
        size: int,
        rules: Sequence[str],
        shadow_rules: Sequence[str] = (),
    ) -> None:
        """Record one finished message: the action finally taken (a 451 after a delivery
        that failed past the end of data counts as ``tempfail``; a transaction that failed at
        RCPT never gets here), its processing time, its size, and the enforcing and shadow
        rules that matched."""
        counter = self._message_counters.get(action)
        if counter is None:  # anything outside the closed set
            raise ValueError(f"{action!r} is not an action")
        counter.inc()
        self._processing.observe(max(0.0, duration_s))
        self._size.observe(max(0, size))
        for name in rules:
            self._rule_hit(name, RuleMode.ENFORCE).inc()
        for name in shadow_rules:
            self._rule_hit(name, RuleMode.SHADOW).inc()

    def _rule_hit(self, name: str, mode: RuleMode) -> Counter:
        counter = self._rule_hit_counters.get((name, mode))
        if counter is None:
            counter = self._rule_hit_counters[name, mode] = self._rule_hits.labels(
                self._rule_label(name), mode.value
            )
        return counter

    def relay_error(self, reason: str | RelayErrorReason) -> None:
        """Count one failure talking to the next hop: a failed connection or command, or its
        4xx/5xx to a message's DATA, BDAT or end of data (once per message). A recipient it
        refuses is its verdict on that address, not a failure."""
        self._relay_errors.labels(reason=RelayErrorReason(reason).value).inc()

    # -- sessions ----------------------------------------------------------------------

    def session_opened(self) -> None:
        self._sessions_active.inc()
        self._sessions.inc()

    def session_closed(self) -> None:
        self._sessions_active.dec()

    def connection_refused(self, reason: str | RefusalReason) -> None:
        """Count a connection refused before SMTP (outside ``networks``, or over the limit)."""
        self._refused.labels(reason=RefusalReason(reason).value).inc()

    # -- config and quarantine ---------------------------------------------------------

    def reload(self, success: bool, *, count: bool = True) -> None:
        """Record a config/rules load attempt; call it for the initial load too. A worker
        passes ``count=False``: the supervisor counts each reload once, but every process
        reports its own state in the gauges, which merge to the stalest worker's."""
        if count:
            self._reloads.labels(result="success" if success else "failure").inc()
        self._reload_ok.set(1 if success else 0)
        if success:
            self._reload_ok_time.set(time.time())

    def set_quarantine_size(self, n: int) -> None:
        self._quarantine.set(max(0, n))
