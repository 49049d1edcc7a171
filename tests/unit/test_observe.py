"""Observability: Metrics counts and label bounds, the /metrics HTTP endpoint over a real
loopback socket (checked by promtool), multiprocess aggregation across real processes, and
structlog/stdlib logging rendered as JSON lines."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from filterd import __version__
from filterd.logsetup import CachedLogger
from filterd.model import Action
from filterd.observe import (
    METRICS_CONTENT_TYPE,
    OTHER_RULE,
    Metrics,
    RefusalReason,
    RelayErrorReason,
    configure_logging,
    get_logger,
    make_registry,
    mark_process_dead,
    reset_multiprocess_dir,
    start_metrics_server,
)

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
ACTIONS = [a.value for a in Action]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- Metrics ---------------------------------------------------------------------------


def test_every_action_exports_zero_before_any_mail(registry: CollectorRegistry) -> None:
    Metrics(registry)
    text = generate_latest(registry).decode()
    for action in ACTIONS:
        assert f'filterd_messages_total{{action="{action}"}} 0.0' in text
    for reason in RelayErrorReason:
        assert _value(registry, "filterd_relay_errors_total", reason=reason.value) == 0
    assert _value(registry, "filterd_config_reloads_total", result="failure") == 0
    assert _value(registry, "filterd_config_last_reload_success") == 1
    assert _value(registry, "filterd_build_info", version=__version__) == 1


@pytest.mark.parametrize("action", [*ACTIONS, Action.QUARANTINE])
def test_message_processed_counts_one_action(
    registry: CollectorRegistry, metrics: Metrics, action: str | Action
) -> None:
    metrics.message_processed(action, 0.3, 5000, [], [])
    label = Action(action).value
    for other in ACTIONS:
        expected = 1 if other == label else 0
        assert _value(registry, "filterd_messages_total", action=other) == expected
    assert _value(registry, "filterd_message_processing_seconds_count") == 1
    assert _value(registry, "filterd_message_processing_seconds_sum") == pytest.approx(0.3)
    assert _value(registry, "filterd_message_processing_seconds_bucket", le="0.25") == 0
    assert _value(registry, "filterd_message_processing_seconds_bucket", le="0.5") == 1
    assert _value(registry, "filterd_message_size_bytes_sum") == 5000
    assert _value(registry, "filterd_message_size_bytes_bucket", le="4096.0") == 0
    assert _value(registry, "filterd_message_size_bytes_bucket", le="16384.0") == 1


def test_histograms_reach_mail_sized_values(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.message_processed("accept", 100.0, 90_000_000, [], [])
    assert _value(registry, "filterd_message_processing_seconds_bucket", le="90.0") == 0
    assert _value(registry, "filterd_message_processing_seconds_bucket", le="120.0") == 1
    assert _value(registry, "filterd_message_size_bytes_bucket", le="5.24288e+07") == 0
    assert _value(registry, "filterd_message_size_bytes_bucket", le="1.048576e+08") == 1


@pytest.mark.parametrize("bad", ["spam", "ACCEPT", "", "250"])
def test_unknown_action_is_refused_and_not_counted(
    registry: CollectorRegistry, metrics: Metrics, bad: str
) -> None:
    with pytest.raises(ValueError, match=repr(bad)):
        metrics.message_processed(bad, 0.1, 10, [], [])
    assert _value(registry, "filterd_message_processing_seconds_count") == 0


def test_rule_hits_by_mode_and_the_other_bound(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.set_rule_names(["gtube", "lottery-words", "trial_rule"])
    metrics.message_processed("reject", 0.1, 100, ["gtube", "lottery-words"], ["trial_rule"])
    metrics.message_processed("tag", 0.1, 100, ["lottery-words", "gone-rule"], ["also-gone"])
    hits = "filterd_rule_hits_total"
    assert _value(registry, hits, rule="gtube", mode="enforce") == 1
    assert _value(registry, hits, rule="lottery-words", mode="enforce") == 2
    assert _value(registry, hits, rule="trial_rule", mode="shadow") == 1
    assert _value(registry, hits, rule="trial_rule", mode="enforce") is None
    assert _value(registry, hits, rule=OTHER_RULE, mode="enforce") == 1
    assert _value(registry, hits, rule=OTHER_RULE, mode="shadow") == 1
    assert _value(registry, hits, rule="gone-rule", mode="enforce") is None
    assert _value(registry, "filterd_rules_loaded") == 3


def test_hits_before_any_rule_set_go_to_other(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.message_processed("accept", 0.1, 100, ["a", "b"], [])
    assert _value(registry, "filterd_rule_hits_total", rule=OTHER_RULE, mode="enforce") == 2
    # Once loaded, a name counts as itself (nothing of the earlier lookup sticks).
    metrics.set_rule_names(["a"])
    metrics.message_processed("accept", 0.1, 100, ["a"], [])
    assert _value(registry, "filterd_rule_hits_total", rule="a", mode="enforce") == 1
    assert _value(registry, "filterd_rule_hits_total", rule=OTHER_RULE, mode="enforce") == 2


def test_reload_drops_series_of_rules_no_longer_loaded(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.set_rule_names(["old", "kept"])
    metrics.message_processed("tag", 0.1, 100, ["old", "kept"], ["old"])
    metrics.set_rule_names(["kept", "new"])
    assert _value(registry, "filterd_rule_hits_total", rule="old", mode="enforce") is None
    assert _value(registry, "filterd_rule_hits_total", rule="old", mode="shadow") is None
    assert _value(registry, "filterd_rule_hits_total", rule="kept", mode="enforce") == 1
    metrics.message_processed("tag", 0.1, 100, ["old"], [])
    assert _value(registry, "filterd_rule_hits_total", rule=OTHER_RULE, mode="enforce") == 1
    assert _value(registry, "filterd_rules_loaded") == 2


@pytest.mark.parametrize(
    "name", ["user@example.com", "example.com", "192.0.2.1", "::1", "Gtube", ""]
)
def test_rule_names_that_could_leak_data_are_refused(metrics: Metrics, name: str) -> None:
    with pytest.raises(ValueError, match="rule names"):
        metrics.set_rule_names(["fine", name])


def test_no_label_ever_holds_an_address_domain_or_ip(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    loaded = ["gtube", "blocked-sender"]
    metrics.set_rule_names(loaded)
    hostile = ["user@example.com", "example.com", "192.0.2.7", "2001:db8::1", "gtube"]
    for action in ACTIONS:
        metrics.message_processed(action, 0.2, 2048, hostile, hostile)
    for reason in RelayErrorReason:
        metrics.relay_error(reason)
    metrics.connection_refused("acl")
    metrics.reload(False)
    allowed = {
        "action": set(ACTIONS),
        "rule": {*loaded, OTHER_RULE},
        "mode": {"enforce", "shadow"},
        "reason": {r.value for r in RelayErrorReason} | {r.value for r in RefusalReason},
        "result": {"success", "failure"},
        "version": {__version__},
    }
    seen = 0
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            for key, value in sample.labels.items():
                seen += 1
                if key == "le":
                    float(value)  # a bucket bound, nothing else
                    continue
                assert value in allowed[key], (sample.name, key, value)
                assert "@" not in value
                with pytest.raises(ValueError):
                    ipaddress.ip_address(value)
    assert seen > 50


@pytest.mark.parametrize("reason", [r.value for r in RelayErrorReason])
def test_relay_error_counts_its_reason(
    registry: CollectorRegistry, metrics: Metrics, reason: str
) -> None:
    metrics.relay_error(reason)
    metrics.relay_error(RelayErrorReason(reason))
    for other in RelayErrorReason:
        expected = 2 if other.value == reason else 0
        assert _value(registry, "filterd_relay_errors_total", reason=other.value) == expected


@pytest.mark.parametrize("bad", ["Connection refused by 192.0.2.1", "other", "dns"])
def test_relay_error_outside_the_closed_set_is_refused(metrics: Metrics, bad: str) -> None:
    with pytest.raises(ValueError):
        metrics.relay_error(bad)


def test_sessions_and_refusals(registry: CollectorRegistry, metrics: Metrics) -> None:
    for _ in range(3):
        metrics.session_opened()
    metrics.session_closed()
    metrics.connection_refused("limit")
    metrics.connection_refused(RefusalReason.ACL)
    metrics.connection_refused("acl")
    assert _value(registry, "filterd_sessions_active") == 2
    assert _value(registry, "filterd_sessions_total") == 3
    assert _value(registry, "filterd_connections_refused_total", reason="acl") == 2
    assert _value(registry, "filterd_connections_refused_total", reason="limit") == 1
    with pytest.raises(ValueError):
        metrics.connection_refused("198.51.100.4")


def test_reload_success_and_failure(registry: CollectorRegistry, metrics: Metrics) -> None:
    assert _value(registry, "filterd_config_last_reload_success_timestamp_seconds") == 0
    metrics.reload(True)
    stamp = _value(registry, "filterd_config_last_reload_success_timestamp_seconds")
    assert stamp is not None
    assert stamp > 1_600_000_000
    metrics.reload(False)
    assert _value(registry, "filterd_config_last_reload_success") == 0
    assert _value(registry, "filterd_config_reloads_total", result="failure") == 1
    assert _value(registry, "filterd_config_reloads_total", result="success") == 1
    assert _value(registry, "filterd_config_last_reload_success_timestamp_seconds") == stamp
    metrics.reload(True)
    assert _value(registry, "filterd_config_last_reload_success") == 1


def test_quarantine_size_and_build_info(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, version="9.8.7")
    metrics.set_quarantine_size(42)
    assert _value(registry, "filterd_quarantine_messages") == 42
    metrics.set_quarantine_size(7)
    assert _value(registry, "filterd_quarantine_messages") == 7
    assert _value(registry, "filterd_build_info", version="9.8.7") == 1


def test_make_registry_without_multiprocess_is_a_plain_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    first, second = make_registry(), make_registry()
    Metrics(first)
    Metrics(second)  # separate registries: no duplicate-name clash
    assert first.get_sample_value("filterd_sessions_active") == 0


def test_multiprocess_env_set_too_late_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="before the process starts"):
        make_registry()


# -- multiprocess mode, with real processes ----------------------------------------------

_WORKER = textwrap.dedent(
    """
    import os, sys
    from filterd.metrics import Metrics, make_registry
    m = Metrics(make_registry())
    m.set_rule_names(["gtube"])
    for _ in range(int(sys.argv[1])):
        m.session_opened()
    m.message_processed(sys.argv[2], 0.5, 1000, ["gtube"], [])
    m.reload(sys.argv[3] == "ok")
    m.set_quarantine_size(int(sys.argv[4]))
    print(os.getpid())
    """
)
_SCRAPER = textwrap.dedent(
    """
    import sys
    from prometheus_client import generate_latest
    from filterd.metrics import Metrics, make_registry
    registry = make_registry()
    Metrics(registry)  # a serving process has its own Metrics too; it must not double-count
    sys.stdout.write(generate_latest(registry).decode())
    """
)


def _run(code: str, mpdir: Path, *args: str) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mpdir), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def test_multiprocess_merges_workers_and_forgets_dead_live_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_a = int(_run(_WORKER, tmp_path, "2", "accept", "fail", "10"))
    int(_run(_WORKER, tmp_path, "1", "reject", "ok", "12"))
    merged = _samples(_run(_SCRAPER, tmp_path))

    def get(name: str, **labels: str) -> float:
        return merged[(name, frozenset(labels.items()))]

    assert get("filterd_sessions_active") == 3  # livesum over both workers
    assert get("filterd_sessions_total") == 3
    assert get("filterd_messages_total", action="accept") == 1
    assert get("filterd_messages_total", action="reject") == 1
    assert get("filterd_rule_hits_total", rule="gtube", mode="enforce") == 2
    assert get("filterd_message_processing_seconds_count") == 2
    assert get("filterd_config_last_reload_success") == 0  # livemin: one worker failed
    assert get("filterd_quarantine_messages") == 12  # livemostrecent
    assert get("filterd_build_info", version=__version__) == 1
    assert not any(labels and dict(labels).get("pid") for _, labels in merged)

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    mark_process_dead(pid_a)
    after = _samples(_run(_SCRAPER, tmp_path))
    assert after[("filterd_sessions_active", frozenset())] == 1
    assert after[("filterd_config_last_reload_success", frozenset())] == 1
    # Counters of the dead worker stay: totals never go backwards.
    assert after[("filterd_messages_total", frozenset({("action", "accept")}))] == 1

    reset_multiprocess_dir()
    assert not list(tmp_path.glob("*.db"))


# -- the HTTP endpoint -------------------------------------------------------------------


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return data


def _http(registry: CollectorRegistry, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Start the server on a free loopback port, send each raw request on its own
    connection, and parse the responses (status, headers, body)."""

    async def run() -> list[bytes]:
        server = await start_metrics_server("127.0.0.1", 0, registry)
        port = server.sockets[0].getsockname()[1]
        try:
            return [await _exchange(port, r) for r in requests]
        finally:
            server.close()
            await server.wait_closed()

    parsed = []
    for raw in asyncio.run(run()):
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, code, _reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        assert int(headers["content-length"]) == len(body) or not body
        parsed.append((int(code), headers, body))
    return parsed


def _get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n".encode()


def test_metrics_endpoint_serves_the_registry(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.message_processed("quarantine", 1.5, 300_000, [], [])
    [(code, headers, body)] = _http(registry, _get("/metrics?debug=1"))
    assert code == 200
    assert headers["content-type"] == METRICS_CONTENT_TYPE
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(body.decode())
    assert samples[("filterd_messages_total", frozenset({("action", "quarantine")}))] == 1
    assert samples[("filterd_message_size_bytes_sum", frozenset())] == 300_000


def test_healthz_404_405_and_head(registry: CollectorRegistry, metrics: Metrics) -> None:
    health, missing, post, head = _http(
        registry,
        _get("/healthz"),
        _get("/nope"),
        _get("/metrics", "POST"),
        _get("/metrics", "HEAD"),
    )
    assert health[0] == 200
    assert health[2].strip() == b"ok"
    assert missing[0] == 404
    assert post[0] == 405
    assert post[1]["allow"] == "GET, HEAD"
    assert head[0] == 200
    assert head[2] == b""
    assert int(head[1]["content-length"]) > 1000


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"GET /metrics SMTP/1.0\r\n\r\n",
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: y\r\n" * 200 + b"\r\n",
    ],
    ids=["no-method", "not-http", "overlong-line", "too-many-headers"],
)
def test_malformed_requests_get_400(registry: CollectorRegistry, raw: bytes) -> None:
    [(code, _, body)] = _http(registry, raw)
    assert code == 400
    assert b"filterd_" not in body


def test_server_survives_a_client_that_hangs_up(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    async def run() -> bytes:
        server = await start_metrics_server("127.0.0.1", 0, registry)
        port = server.sockets[0].getsockname()[1]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /met")
            writer.close()
            await writer.wait_closed()
            return await _exchange(port, _get("/healthz"))
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(run()).startswith(b"HTTP/1.1 200 ")


def test_scrape_passes_promtool_check_metrics(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    if not Path(PROMTOOL).exists():
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    metrics.set_rule_names(["gtube"])
    for action in ACTIONS:
        metrics.message_processed(action, 0.05, 4000, ["gtube", "x"], ["gtube"])
    metrics.relay_error("timeout")
    metrics.session_opened()
    metrics.reload(True)
    [(code, _, body)] = _http(registry, _get("/metrics"))
    assert code == 200
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


# -- logging -----------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("mail.log").level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("mail.log").setLevel(saved[2])
    logging.captureWarnings(False)
    structlog.reset_defaults()


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(obj, dict) for obj in lines)
    return lines


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_for_structlog_and_stdlib_records(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    get_logger("filterd.smtp").info("message_processed", action="reject", rules=["gtube"], size=12)
    logging.getLogger("mail.log").warning("%s unrecognised: %s", "peer", "FOO")
    get_logger("filterd.app").debug("not_shown")
    err = capsys.readouterr().err
    first, second = _json_lines(err)
    assert first["event"] == "message_processed"
    assert first["level"] == "info"
    assert first["logger"] == "filterd.smtp"
    assert first["rules"] == ["gtube"]
    assert second == {
        **second,
        "event": "peer unrecognised: FOO",
        "level": "warning",
        "logger": "mail.log",
    }
    for obj in (first, second):
        stamp = str(obj["timestamp"])
        assert stamp.endswith("Z")
        assert datetime.fromisoformat(stamp).utcoffset() is not None


@pytest.mark.usefixtures("restore_logging")
def test_level_filtering_and_chatty_library_loggers() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", stream=out)
    log = get_logger("filterd.x")
    log.info("dropped")
    log.warning("kept_warning")
    logging.getLogger("mail.log").info("dropped too")
    assert [e["event"] for e in _json_lines(out.getvalue())] == ["kept_warning"]

    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    log.info("kept_info")
    logging.getLogger("mail.log").info("per-command chatter")  # aiosmtpd: kept quiet at info
    assert [e["event"] for e in _json_lines(out.getvalue())] == ["kept_info"]

    out = io.StringIO()
    configure_logging("json", "DEBUG", stream=out)
    log.debug("kept_debug")
    logging.getLogger("mail.log").info("per-command chatter")
    assert [e["event"] for e in _json_lines(out.getvalue())] == [
        "kept_debug",
        "per-command chatter",
    ]


@pytest.mark.usefixtures("restore_logging")
def test_a_module_logger_is_bound_once_not_per_call() -> None:
    # Binding a structlog logger runs the logger factory and builds the wrapper: too costly
    # for every line of the per-message path. (Reconfiguring still reaches the logger: see
    # test_level_filtering_and_chatty_library_loggers.)
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    made: list[tuple[object, ...]] = []
    factory = structlog.get_config()["logger_factory"]

    def counting_factory(*args: object) -> object:
        made.append(args)
        return factory(*args)

    structlog.configure(logger_factory=counting_factory)
    log = get_logger("filterd.x")
    log.info("one")
    log.info("two")
    log.debug("below the level")
    assert [e["event"] for e in _json_lines(out.getvalue())] == ["one", "two"]
    assert len(made) == 1


@pytest.mark.usefixtures("restore_logging")
def test_the_per_message_levels_are_found_without_the_attribute_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An attribute found only by __getattr__ first costs a formatted AttributeError, twice per
    # message on the daemon's path: the levels it logs at are the class's own.
    out = io.StringIO()
    configure_logging("json", "debug", stream=out)
    fallbacks: list[str] = []
    fallback = CachedLogger.__getattr__

    def counting(self: CachedLogger, attr: str) -> object:
        fallbacks.append(attr)
        return fallback(self, attr)

    monkeypatch.setattr(CachedLogger, "__getattr__", counting)
    log = get_logger("filterd.x")
    for level in ("debug", "info", "warning", "error"):
        getattr(log, level)(f"at_{level}")
    assert fallbacks == []
    assert [e["event"] for e in _json_lines(out.getvalue())] == [
        "at_debug",
        "at_info",
        "at_warning",
        "at_error",
    ]
    log.critical("rarely")  # the others still reach structlog's logger
    assert fallbacks == ["critical"]


@pytest.mark.usefixtures("restore_logging")
def test_reconfiguring_replaces_the_handler_and_keeps_one_object_per_line() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first)
    configure_logging(None, "info", stream=second)  # not a TTY: JSON
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        get_logger("filterd.x").exception("relay_failed", next_hop="127.0.0.1:10025")
    assert first.getvalue() == ""
    [entry] = _json_lines(second.getvalue())
    assert entry["level"] == "error"
    assert "RuntimeError: boom" in str(entry["exception"])


@pytest.mark.usefixtures("restore_logging")
def test_console_format_is_not_json() -> None:
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    get_logger("filterd.x").info("message_processed", action="accept")
    text = out.getvalue()
    assert "message_processed" in text
    assert "action" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "verbose"), ("json", "")])
def test_bad_format_or_level_is_refused(fmt: str, level: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(fmt, level, stream=io.StringIO())
