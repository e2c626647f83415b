"""Chart values that must agree with the services' config models, the pod spec and the docs.

Each test renders the charts with ``helm template`` (helm from ``scripts/get_helm.sh``, as in
test_charts.py) and asserts either on the render or on the message of a render that must fail.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gptfl.config_loading import parse_config
from silo_agent.config import ReconnectConfig, SiloConfig
from synth_service.config import SynthConfig

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "deploy" / "helm"
NAMESPACE = "gptfl-ci"
SILO_MINIMAL = ("-f", str(CHARTS / "silo-agent" / "ci" / "minimal-values.yaml"))
SILO_HOSTPATH = ("-f", str(CHARTS / "silo-agent" / "ci" / "hostpath-values.yaml"))

Doc = dict[str, Any]
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _template(helm: Path, chart: str, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", "gptfl", str(CHARTS / chart), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
    )


def render(helm: Path, chart: str, *args: str) -> list[Doc]:
    proc = _template(helm, chart, args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.load_all(proc.stdout, Loader=Loader) if d]


def render_error(helm: Path, chart: str, *args: str) -> str:
    proc = _template(helm, chart, args)
    assert proc.returncode != 0, f"helm accepted {args}"
    return proc.stderr


def one(docs: list[Doc], kind: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def container(workload: Doc) -> Doc:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def config_file(docs: list[Doc]) -> Doc:
    (text,) = one(docs, "ConfigMap")["data"].values()
    data: Doc = yaml.safe_load(text)
    return data


def value_comment(values_file: Path, dotted: str) -> str:
    """The comment lines right above the key ``dotted`` (a.b.c) in a values.yaml."""
    wanted = dotted.split(".")
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in values_file.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^( *)([A-Za-z0-9_.-]+):", line)
        if match:
            indent, key = len(match.group(1)), match.group(2)
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
            if [k for _, k in stack] == wanted:
                return " ".join(comment)
        comment = []
    raise AssertionError(f"{dotted} not in {values_file}")


def commented_default(values_file: Path, key: str) -> Any:
    """The value of a key that values.yaml shows commented out (``# key: value``)."""
    (match,) = re.findall(rf"^ *# {re.escape(key)}: (\S+)$", values_file.read_text(), re.M)
    return yaml.safe_load(match)


# --- 1. silo device ---------------------------------------------------------------------------


def test_silo_schema_accepts_only_the_devices_the_agent_resolves(helm: Path) -> None:
    # gptfl/training.py resolve_device: auto, cpu, cuda or cuda:N; anything else is a
    # ConfigError at the first task, so the chart refuses it at install time.
    for device in ("mps", "tpu", "cuda:x", "gpu"):
        err = render_error(helm, "silo-agent", *SILO_MINIMAL, "--set", f"config.device={device}")
        assert "/config/device" in err, device
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        cfg = config_file(
            render(helm, "silo-agent", *SILO_MINIMAL, "--set", f"config.device={device}")
        )
        assert cfg["device"] == device


# --- 2. synth listen addresses come from ports ------------------------------------------------


def test_synth_listen_addresses_are_built_from_ports(helm: Path) -> None:
    docs = render(
        helm, "synth-service", "--set", "ports.grpc=6001,ports.health=6002,ports.metrics=6003"
    )
    cfg = parse_config(SynthConfig, config_file(docs), source="render")
    assert (cfg.address, cfg.health_address, cfg.metrics_address) == (
        "0.0.0.0:6001",
        "0.0.0.0:6002",
        "0.0.0.0:6003",
    )
    deployment = one(docs, "Deployment")
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert ports == {"grpc": 6001, "health": 6002, "metrics": 6003}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container(deployment)[probe]["grpc"]["port"] == 6002


def test_synth_schema_refuses_listen_addresses_in_config(helm: Path) -> None:
    for key in ("address", "health_address", "metrics_address"):
        err = render_error(helm, "synth-service", "--set", f"config.{key}=0.0.0.0:1")
        assert "/config" in err and f"'{key}' not allowed" in err, key


def test_synth_metrics_off_serves_and_scrapes_nothing(helm: Path) -> None:
    docs = render(helm, "synth-service", "--set", "metrics.enabled=false")
    cfg = parse_config(SynthConfig, config_file(docs), source="render")
    assert cfg.metrics_address == "" and cfg.health_address == "0.0.0.0:50069"
    assert "metrics" not in {p["name"] for p in container(one(docs, "Deployment"))["ports"]}
    assert "metrics" not in {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]

    err = render_error(
        helm, "synth-service", "--set", "metrics.enabled=false,metrics.serviceMonitor.enabled=true"
    )
    assert "metrics.serviceMonitor.enabled is true but metrics.enabled is false" in err


# --- 3. coordinator monitoring objects need metrics -------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            "metrics.prometheusRule.enabled=true,grafanaDashboard.enabled=false",
            "metrics.prometheusRule.enabled is true but metrics.enabled is false",
        ),
        (
            "metrics.serviceMonitor.enabled=true,grafanaDashboard.enabled=false",
            "metrics.serviceMonitor.enabled is true but metrics.enabled is false",
        ),
        ("grafanaDashboard.enabled=true", "grafanaDashboard.enabled is true but metrics.enabled"),
    ],
)
def test_coordinator_monitoring_without_metrics_fails(
    helm: Path, values: str, message: str
) -> None:
    err = render_error(helm, "coordinator", "--set", f"metrics.enabled=false,{values}")
    assert message in err


def test_coordinator_metrics_off_renders_no_monitoring_objects(helm: Path) -> None:
    docs = render(
        helm, "coordinator", "--set", "metrics.enabled=false,grafanaDashboard.enabled=false"
    )
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"] == [
        "gptfl-coordinator"
    ]


def test_coordinator_values_document_the_metrics_dependency() -> None:
    values = CHARTS / "coordinator" / "values.yaml"
    for key in (
        "metrics.prometheusRule.enabled",
        "metrics.serviceMonitor.enabled",
        "grafanaDashboard.enabled",
    ):
        assert "metrics.enabled" in value_comment(values, key), key


# --- 4. startup probe threshold is a failure count --------------------------------------------


@pytest.mark.parametrize(
    ("chart", "kind"), [("coordinator", "StatefulSet"), ("synth-service", "Deployment")]
)
def test_startup_threshold_is_documented_as_failures_with_the_real_period(
    helm: Path, chart: str, kind: str
) -> None:
    probe = container(one(render(helm, chart), kind))["startupProbe"]
    period, threshold = probe["periodSeconds"], probe["failureThreshold"]
    comment = value_comment(CHARTS / chart / "values.yaml", "probes.startupFailureThreshold")
    assert not comment.lower().startswith("-- seconds"), comment
    assert "failures" in comment and f"every {period} s" in comment, comment
    assert f"{threshold} means {threshold * period} s" in comment, comment


# --- 5. silo agent settings that had no value -------------------------------------------------


SILO_OPTIONAL = {
    "poll_wait_s": SiloConfig.model_fields["poll_wait_s"].default,
    "initial_backoff_s": ReconnectConfig.model_fields["initial_backoff_s"].default,
    "max_backoff_s": ReconnectConfig.model_fields["max_backoff_s"].default,
}


def test_silo_optional_settings_are_omitted_when_unset(helm: Path) -> None:
    cfg = config_file(render(helm, "silo-agent", *SILO_MINIMAL))
    assert "poll_wait_s" not in cfg and "reconnect" not in cfg
    values = CHARTS / "silo-agent" / "values.yaml"
    for key, default in SILO_OPTIONAL.items():
        assert commented_default(values, key) == default, key


def test_silo_optional_settings_reach_the_agent(helm: Path) -> None:
    docs = render(
        helm,
        "silo-agent",
        *SILO_MINIMAL,
        "--set",
        "config.poll_wait_s=45,config.reconnect.initial_backoff_s=2,config.reconnect.max_backoff_s=120",
    )
    cfg = parse_config(SiloConfig, config_file(docs), source="render")
    assert cfg.poll_wait_s == 45
    assert (cfg.reconnect.initial_backoff_s, cfg.reconnect.max_backoff_s) == (2, 120)

    only_max = config_file(
        render(helm, "silo-agent", *SILO_MINIMAL, "--set", "config.reconnect.max_backoff_s=5")
    )
    assert only_max["reconnect"] == {"max_backoff_s": 5} and "poll_wait_s" not in only_max


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("config.poll_wait_s=0", "/config/poll_wait_s"),
        ("config.poll_wait_s=61", "/config/poll_wait_s"),
        ("config.poll_wait_s=soon", "/config/poll_wait_s"),
        ("config.reconnect.initial_backoff_s=0", "/config/reconnect/initial_backoff_s"),
        ("config.reconnect.max_backoff_s=-1", "/config/reconnect/max_backoff_s"),
        ("config.reconnect.jitter=1", "/config/reconnect"),
    ],
)
def test_silo_schema_bounds_match_the_agent(helm: Path, value: str, where: str) -> None:
    assert where in render_error(helm, "silo-agent", *SILO_MINIMAL, "--set", value)


# --- 6. silo data paths must lie on the data volume -------------------------------------------


@pytest.mark.parametrize(
    ("split", "path"),
    [
        ("train", "/srv/radiology/train"),
        ("train", "/database/train"),  # shares the prefix "/data" but not the folder
        ("eval", "/data/../etc/val"),
        ("eval", "/"),
    ],
)
def test_silo_data_path_outside_the_mount_fails(helm: Path, split: str, path: str) -> None:
    err = render_error(helm, "silo-agent", *SILO_HOSTPATH, "--set", f"data.{split}.path={path}")
    assert f"data.{split}.path {path} is not under data.volume.mountPath /data" in err


def test_silo_data_path_under_the_mount_renders(helm: Path) -> None:
    docs = render(
        helm,
        "silo-agent",
        *SILO_HOSTPATH,
        "--set",
        "data.volume.mountPath=/data/,data.train.path=/data,data.eval.path=/data/val/",
    )
    cfg = config_file(docs)
    assert cfg["data"]["train"]["path"] == "/data" and cfg["data"]["eval"]["path"] == "/data/val/"


# --- 7. docs ----------------------------------------------------------------------------------

README = ROOT / "deploy" / "README.md"
NOTABLE_KINDS = (
    "Deployment",
    "StatefulSet",
    "Service",
    "Ingress",
    "NetworkPolicy",
    "ServiceMonitor",
    "PrometheusRule",
)


def _every_kind(chart: str, helm: Path) -> set[str]:
    kinds: set[str] = set()
    for values in sorted((CHARTS / chart / "ci").glob("*-values.yaml")):
        kinds |= {d["kind"] for d in render(helm, chart, "-f", str(values))}
    return kinds


@pytest.mark.parametrize("chart", ["coordinator", "silo-agent", "synth-service"])
def test_readme_table_names_every_notable_kind_a_chart_renders(helm: Path, chart: str) -> None:
    (row,) = [line for line in README.read_text().splitlines() if f"`helm/{chart}/`" in line]
    for kind in set(NOTABLE_KINDS) & _every_kind(chart, helm):
        assert kind in row, (chart, kind)


def test_readme_observing_says_who_renders_service_monitors_and_how_silos_are_scraped(
    helm: Path,
) -> None:
    text = README.read_text()
    observing = text.split("## Observing", 1)[1].split("\n## ", 1)[0]
    flat = " ".join(observing.split())
    for chart in ("coordinator", "synth-service"):
        assert "ServiceMonitor" in _every_kind(chart, helm)
        assert f"{chart} chart" in flat or f"`{chart}`" in flat, chart
    assert "only the coordinator chart" not in flat.lower()
    silo = one(render(helm, "silo-agent", *SILO_HOSTPATH), "Deployment")
    annotations = silo["spec"]["template"]["metadata"]["annotations"]
    scrape_keys = sorted(k for k in annotations if k.startswith("prometheus.io/"))
    assert scrape_keys
    for key in scrape_keys:
        assert key in flat, key
    assert "prometheus-operator" in flat and "PodMonitor" in flat
    comment = value_comment(CHARTS / "silo-agent" / "values.yaml", "metrics.enabled")
    assert "annotations below" not in comment
    for key in scrape_keys:
        assert key in comment, key
