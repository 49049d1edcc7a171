"""The shipped monitoring assets agree with promtool and with what filterd really exports:
alert rules check and pass their unit tests, the Grafana dashboard is well formed and its
queries parse, and every metric any query names shows up in a live /metrics scrape."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from filterd.model import Action
from filterd.observe import Metrics, RefusalReason, RelayErrorReason, start_metrics_server

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
ALERTS = MONITORING / "filterd-alerts.yaml"
ALERT_TESTS = MONITORING / "filterd-alerts.test.yaml"
DASHBOARD = MONITORING / "filterd-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# The names the product contract fixes (PRODUCT.md, "Metrics").
CONTRACT_METRICS = [
    "filterd_messages_total",
    "filterd_rule_hits_total",
    "filterd_message_processing_seconds",
    "filterd_message_size_bytes",
    "filterd_relay_errors_total",
    "filterd_sessions_active",
    "filterd_quarantine_messages",
    "filterd_config_reloads_total",
    "filterd_config_last_reload_success",
    "filterd_build_info",
]
METRIC_NAME = re.compile(r"\bfilterd_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).exists(), reason="promtool not installed (Debian package 'prometheus')"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _dashboard_exprs() -> list[str]:
    dash = _dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# -- alerts ----------------------------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    done = _promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_alert_rules_pass_their_unit_tests() -> None:
    done = _promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_severity_summary_description_and_a_test() -> None:
    rules = _alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "FilterdDown",
        "FilterdRelayErrors",
        "FilterdHighTempfailRatio",
        "FilterdLatencyNearMtaTimeout",
        "FilterdReloadFailed",
        "FilterdQuarantineGrowing",
        "FilterdNoMailProcessed",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    for name in names:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays silent"


# -- dashboard -------------------------------------------------------------------------


def test_dashboard_model_and_variables() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] >= 39
    assert dash["uid"]
    assert dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert re.fullmatch(rf"label_values\(filterd_build_info(\{{.*\}})?, {name}\)", query), query


def test_every_panel_has_title_description_unit_and_uses_the_variables() -> None:
    panels = _dashboard()["panels"]
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        label = panel.get("title", panel.get("id"))
        assert panel["title"].strip(), label
        assert panel["description"].strip(), label
        assert panel["fieldConfig"]["defaults"]["unit"], label
        assert panel["datasource"]["uid"] == "${datasource}", label
        assert panel["targets"], label
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", label
            assert 'job=~"$job"' in target["expr"], label
            assert 'instance=~"$instance"' in target["expr"], label


def test_dashboard_has_the_required_views() -> None:
    exprs = "\n".join(_dashboard_exprs())
    assert re.search(
        r"histogram_quantile\(0\.99, .*filterd_message_processing_seconds_bucket", exprs
    )
    assert re.search(r"histogram_quantile\(0\.5, .*filterd_message_size_bytes_bucket", exprs)
    assert re.search(r"topk\(\d+, .*filterd_rule_hits_total", exprs)
    assert 'mode="shadow"' in exprs
    annotations = [a for a in _dashboard()["annotations"]["list"] if "expr" in a]
    assert any("filterd_config_reloads_total" in a["expr"] for a in annotations)


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no offline "check expr"; a recording rule per query gets the same parser.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _concrete(e)}
        for i, e in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def _concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by what Prometheus can run."""
    for var, value in (
        ("$__rate_interval", "5m"),
        ("$__range", "6h"),
        ("$__interval", "1m"),
        ("$job", ".+"),
        ("$instance", ".+"),
    ):
        expr = expr.replace(var, value)
    return expr


def _reload_annotations() -> dict[str, str]:
    """The reload annotations' queries, by result (success, failure), made concrete."""
    found = {}
    for annotation in _dashboard()["annotations"]["list"]:
        match = re.search(r'result="(\w+)"', annotation.get("expr", ""))
        if match and "filterd_config_reloads_total" in annotation["expr"]:
            found[match.group(1)] = _concrete(annotation["expr"])
    assert set(found) == {"success", "failure"}, found
    return found


@needs_promtool
def test_reload_annotations_mark_reloads_but_not_restarts(tmp_path: Path) -> None:
    """A restart resets the counters (and counts its initial load as one success): the
    annotations must mark the reloads that happened, not every restart."""
    queries = _reload_annotations()
    rules = [
        {"alert": f"Reload_{result}", "expr": expr} for result, expr in sorted(queries.items())
    ]
    (tmp_path / "annotations.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "annotations", "rules": rules}]})
    )
    series = 'filterd_config_reloads_total{{job="filterd", instance="mx1:9125", result="{}"}}'
    # Minute by minute: a good reload at 5m, a refused one at 10m, a restart at 20m (the
    # counters start again: success 1 for the initial load, failure 0), nothing after.
    success = "1 1 1 1 1 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 1 1 1 1 1 1"
    failure = "0 0 0 0 0 0 0 0 0 0 1 1 1 1 1 1 1 1 1 1 0 0 0 0 0 0"

    def case(at: str, fired: dict[str, bool]) -> list[dict[str, Any]]:
        return [
            {
                "eval_time": at,
                "alertname": f"Reload_{result}",
                "exp_alerts": [{"exp_labels": {"instance": "mx1:9125"}}] if fired[result] else [],
            }
            for result in ("success", "failure")
        ]

    tests = {
        "rule_files": ["annotations.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series.format("success"), "values": success},
                    {"series": series.format("failure"), "values": failure},
                ],
                "alert_rule_test": [
                    *case("3m", {"success": False, "failure": False}),
                    *case("5m", {"success": True, "failure": False}),
                    *case("10m", {"success": False, "failure": True}),
                    *case("15m", {"success": False, "failure": False}),
                    *case("20m", {"success": False, "failure": False}),
                    *case("21m", {"success": False, "failure": False}),
                    *case("24m", {"success": False, "failure": False}),
                ],
            }
        ],
    }
    (tmp_path / "annotations.test.yaml").write_text(yaml.safe_dump(tests))
    done = _promtool("test", "rules", str(tmp_path / "annotations.test.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr


# -- cross-check with a live scrape ------------------------------------------------------


def _live_scrape() -> str:
    """Record one message of each action (and one of each other event) in a fresh Metrics,
    then fetch /metrics over a real socket, as Prometheus would."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_rule_names(["gtube", "trial"])
    for action in Action:
        metrics.message_processed(action.value, 0.4, 6000, ["gtube"], ["trial"])
    for reason in RelayErrorReason:
        metrics.relay_error(reason)
    for refusal in RefusalReason:
        metrics.connection_refused(refusal)
    metrics.session_opened()
    metrics.reload(True)
    metrics.set_quarantine_size(3)

    async def fetch() -> str:
        server = await start_metrics_server("127.0.0.1", 0, registry)
        port = server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            # urllib blocks, so it runs in a thread while the loop serves the request.
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=10).read().decode()
            )
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(fetch())


def _referenced(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def test_every_referenced_metric_is_exported() -> None:
    families = list(text_string_to_metric_families(_live_scrape()))
    types = {f.name: f.type for f in families}
    sample_names = {s.name for f in families for s in f.samples}
    for name in CONTRACT_METRICS:
        base = name.removesuffix("_total")
        assert base in types, f"contract metric {name} not exported"

    sources = [("dashboard", e) for e in _dashboard_exprs()]
    sources += [("alerts", r["expr"]) for r in _alert_rules()]
    referenced = {name for _, expr in sources for name in _referenced(expr)}
    assert len(referenced) >= 10
    for where, expr in sources:
        for name in _referenced(expr):
            assert name in sample_names, f"{where}: {name} is not in a live scrape ({expr})"
            suffix = next((s for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
            base = name.removesuffix(suffix) if suffix else name
            if suffix and base in types:
                # a histogram's series are only meaningful with their suffix
                assert types[base] == "histogram", f"{where}: {name}"
            else:
                assert types.get(base.removesuffix("_total")) in {"counter", "gauge"}, name
                assert types.get(base) != "histogram", f"{where}: bare histogram name {name}"


# -- documentation -----------------------------------------------------------------------

MONITORING_DOC = REPO / "docs" / "monitoring.md"


def _doc_metric_row(name: str) -> list[str]:
    """The cells of ``name``'s row in the metrics table of docs/monitoring.md."""
    for line in MONITORING_DOC.read_text().splitlines():
        if line.startswith(f"| `{name}` |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"{name}: no row in the metrics table of {MONITORING_DOC.name}")


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("filterd_connections_refused_total", [r.value for r in RefusalReason]),
        ("filterd_relay_errors_total", [r.value for r in RelayErrorReason]),
    ],
    ids=["connections_refused", "relay_errors"],
)
def test_the_docs_and_the_help_text_name_every_exported_label_value(
    name: str, values: list[str]
) -> None:
    _, _, labels, series, _ = _doc_metric_row(name)
    documented = re.search(r"\(([^)]*)\)", labels)
    assert documented is not None, labels
    assert documented.group(1).split(", ") == values, f"docs: {labels}"
    assert series == str(len(values)), f"docs: {name} has {len(values)} series, not {series}"
    families = {f.name: f for f in text_string_to_metric_families(_live_scrape())}
    help_text = families[name.removesuffix("_total")].documentation
    listed = re.search(r"\(([^)]*)\)", help_text)
    if listed is not None:  # a help text that lists the values must list them all
        assert listed.group(1).split(", ") == values, f"help: {help_text}"
