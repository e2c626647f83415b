"""Alert rules, dashboard and the PromQL they use, checked with Prometheus's own promtool.

``promtool`` comes from Debian's ``prometheus`` package, installed by
``scripts/ensure_prometheus.sh`` when missing (nothing is skipped). Running every expression
against a live Prometheus scraping a real job is the integration test's work; here each
expression is parsed by promtool, each alert is unit-tested on synthetic series
(``deploy/prometheus/alerts_test.yaml``), and every metric name is checked against the
services' metric definitions.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from coordinator.metrics import CoordinatorMetrics
from silo_agent.metrics import SiloMetrics
from synth_service.metrics import SynthMetrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
QUERIES = ROOT / "deploy" / "prometheus" / "queries.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gptfl.json"


@pytest.fixture(scope="session")
def promtool() -> Path:
    out = subprocess.run(
        [str(ROOT / "scripts" / "ensure_prometheus.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


def run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def queries() -> list[dict[str, Any]]:
    entries = yaml.safe_load(QUERIES.read_text())
    assert isinstance(entries, list)
    return entries


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panel_targets() -> list[tuple[str, dict[str, Any]]]:
    return [
        (panel["title"], target)
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_promtool_check_rules_passes(promtool: Path) -> None:
    output = run([str(promtool), "check", "rules", str(ALERTS)])
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_alerts_behave_on_synthetic_series(promtool: Path) -> None:
    # promtool resolves rule_files relative to the test file's folder
    output = run([str(promtool), "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent)
    assert "SUCCESS" in output


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    checks = [c for case in cases for c in case["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in checks if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} never shown to fire"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} never shown quiet"


def test_alerts_required_by_the_issue_exist() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {"GptflRoundStuck", "GptflSiloAbsent", "GptflHighUpdateRejectionRate"} <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_query_parses_in_promtool(promtool: Path, tmp_path: Path) -> None:
    """Each expression of queries.yaml, as a recording rule, through promtool's parser."""
    rules = [{"record": f"gptfl:query_{i}", "expr": q["expr"]} for i, q in enumerate(queries())]
    path = tmp_path / "queries-as-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    output = run([str(promtool), "check", "rules", str(path)])
    assert f"SUCCESS: {len(rules)} rules found" in output


def test_dashboard_is_valid_grafana_json() -> None:
    dash = dashboard()
    assert dash["uid"] == "gptfl-overview" and dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    (variable,) = dash["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            # plain PromQL only: Grafana macros would not run against Prometheus's API
            assert "$" not in target["expr"], target["expr"]


def test_dashboard_covers_the_panels_the_issue_asks_for() -> None:
    exprs = " ".join(t["expr"] for _, t in panel_targets())
    for needed in (
        "gptfl_rounds_completed_total",
        "gptfl_current_round",
        "histogram_quantile(0.99, sum by (le) (rate(gptfl_round_duration_seconds_bucket",
        "gptfl_silos_connected",
        "gptfl_silo_last_round",
        "sum by (reason) (rate(gptfl_updates_rejected_total",
        "sum by (silo) (rate(gptfl_bytes_received_total",
        "sum by (silo) (rate(gptfl_bytes_sent_total",
        "gptfl_global_model_accuracy",
        "gptfl_global_model_loss",
        "gptfl_synth_images_per_second",
    ):
        assert needed in exprs, needed


def test_queries_list_exactly_the_dashboard_and_alert_expressions() -> None:
    listed = {q["id"]: q for q in queries()}
    assert len(listed) == len(queries()), "ids in queries.yaml must be unique"
    expected: dict[str, str] = {}
    for title, target in panel_targets():
        expected[f"panel:{title}:{target['refId']}"] = target["expr"]
    for rule in alert_rules():
        expected[f"alert:{rule['alert']}"] = rule["expr"]
    for key, expr in expected.items():
        assert key in listed, f"{key} ({expr}) is missing from queries.yaml"
        assert listed[key]["expr"] == expr, f"{key} differs from its source"
    extra = {k for k in listed if not k.startswith("alert-input:")} - set(expected)
    assert not extra, f"queries.yaml lists expressions nothing uses: {sorted(extra)}"
    for entry in queries():
        assert entry["expect"] in {"data", "any"}
        assert set(entry["needs"]) <= {"coordinator", "silo", "synth"} and entry["needs"]
    for key in listed:
        if key.startswith("alert-input:"):
            alert = key.split(":")[1]
            assert alert in {r["alert"] for r in alert_rules()}, key


def declared_metric_names() -> dict[str, set[str]]:
    """Series names each service exposes, from its metrics module."""
    names: dict[str, set[str]] = {}
    for service, factory in (
        ("coordinator", CoordinatorMetrics.create),
        ("silo", SiloMetrics.create),
        ("synth", SynthMetrics.create),
    ):
        registry = CollectorRegistry()
        factory(registry)
        series: set[str] = set()
        for family in registry.collect():
            if family.type == "histogram":
                series |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
            elif family.type == "counter":
                series |= {f"{family.name}_total", f"{family.name}_created"}
            else:
                series.add(family.name)
        names[service] = series
    return names


def test_every_metric_in_the_queries_is_declared_by_the_service_it_needs() -> None:
    declared = declared_metric_names()
    for entry in queries():
        for metric in set(re.findall(r"\bgptfl_[a-z_]+\b", entry["expr"])):
            owners = {service for service, names in declared.items() if metric in names}
            assert owners, f"{entry['id']}: {metric} is not declared by any metrics module"
            assert owners <= set(entry["needs"]), f"{entry['id']}: needs {owners}"


def test_metric_names_follow_prometheus_conventions() -> None:
    for names in declared_metric_names().values():
        for name in names:
            assert re.fullmatch(r"gptfl_[a-z][a-z0-9_]*", name), name
    synth = declared_metric_names()["synth"]
    assert {
        "gptfl_synth_images_generated_total",
        "gptfl_synth_images_per_second",
        "gptfl_synth_pretrain_epoch_accuracy",
        "gptfl_synth_pretrain_epoch",
        "gptfl_synth_gpu_memory_bytes",
    } <= synth
