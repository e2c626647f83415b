"""The Helm charts, checked with real tools and asserted on as rendered objects.

``scripts/check_charts.py`` runs ``helm lint --strict``, ``helm template`` and
``kubernetes-validate --strict`` (Kubernetes 1.29 and 1.33) on every chart and every
``ci/*-values.yaml``; these tests run it once and then assert on what it rendered, plus a few
extra renders (changed config, bad values). helm comes from ``scripts/get_helm.sh``, which
downloads it on first use: nothing is skipped when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.config import CoordinatorConfig
from gptfl.config_loading import parse_config
from silo_agent.config import SiloConfig
from synth_service.config import SynthConfig

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "deploy" / "helm"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
NAMESPACE = "gptfl-ci"  # what check_charts.py renders into

Doc = dict[str, Any]
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@pytest.fixture(scope="session")
def renders(tmp_path_factory: pytest.TempPathFactory, helm: Path) -> Path:
    """Runs the chart checks once; returns the folder of renders."""
    out = tmp_path_factory.mktemp("renders")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_charts.py"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"chart checks failed:\n{proc.stdout}\n{proc.stderr}"
    assert "all passed" in proc.stdout
    return out


def load(renders: Path, chart: str, stem: str, version: str = "1.33.0") -> list[Doc]:
    text = (renders / chart / stem / f"k8s-{version}.yaml").read_text()
    return [d for d in yaml.load_all(text, Loader=Loader) if d]


def all_renders(renders: Path, chart: str) -> Iterator[tuple[str, list[Doc]]]:
    for values in sorted((CHARTS / chart / "ci").glob("*-values.yaml")):
        stem = values.name.removesuffix("-values.yaml")
        for version in KUBE_VERSIONS:
            yield f"{stem}@{version}", load(renders, chart, stem, version)


def render(helm: Path, chart: str, *args: str, release: str = "gptfl") -> list[Doc]:
    proc = subprocess.run(
        [str(helm), "template", release, str(CHARTS / chart), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.load_all(proc.stdout, Loader=Loader) if d]


def render_error(helm: Path, chart: str, *args: str) -> str:
    proc = subprocess.run(
        [str(helm), "template", "gptfl", str(CHARTS / chart), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0, f"helm accepted {args}"
    return proc.stderr


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Doc) -> Doc:
    (c,) = pod_spec(workload)["containers"]
    return c  # type: ignore[no-any-return]


def mounts(workload: Doc) -> dict[str, Doc]:
    return {m["name"]: m for m in container(workload)["volumeMounts"]}


def volumes(workload: Doc) -> dict[str, Doc]:
    return {v["name"]: v for v in pod_spec(workload)["volumes"]}


# --- every chart ------------------------------------------------------------------------------


def test_every_chart_has_ci_variants_and_was_rendered(renders: Path) -> None:
    charts = sorted(p.parent.name for p in CHARTS.glob("*/Chart.yaml"))
    assert charts == ["coordinator", "silo-agent", "synth-service"]
    for chart in charts:
        ci = sorted((CHARTS / chart / "ci").glob("*-values.yaml"))
        assert len(ci) >= 2, chart
        for stem in (v.name.removesuffix("-values.yaml") for v in ci):
            for version in KUBE_VERSIONS:
                assert (renders / chart / stem / f"k8s-{version}.core.yaml").stat().st_size > 0
        for required in ("values.yaml", "values.schema.json", "templates/NOTES.txt"):
            assert (CHARTS / chart / required).is_file(), f"{chart}/{required}"


@pytest.mark.parametrize("chart", ["coordinator", "silo-agent", "synth-service"])
def test_standard_labels_and_selectors(renders: Path, chart: str) -> None:
    for where, docs in all_renders(renders, chart):
        for doc in docs:
            labels = doc["metadata"]["labels"]
            for key in ("name", "instance", "version", "managed-by", "part-of", "component"):
                assert f"app.kubernetes.io/{key}" in labels, (where, doc["kind"], key)
            assert labels["helm.sh/chart"].startswith(f"{chart}-")
        for workload in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
            selector = workload["spec"]["selector"]["matchLabels"]
            # selector labels are the immutable pair only (no version, no chart label)
            assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
            assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
            for svc in of_kind(docs, "Service"):
                assert svc["spec"]["selector"] == selector, (where, svc["metadata"]["name"])
                ports = {p["name"] for p in container(workload).get("ports", [])}
                for port in svc["spec"]["ports"]:
                    assert port["targetPort"] in ports, (where, port)


@pytest.mark.parametrize("chart", ["coordinator", "silo-agent", "synth-service"])
def test_names_fit_63_characters_with_a_long_release_name(helm: Path, chart: str) -> None:
    ci = CHARTS / chart / "ci"
    values = ci / "full-values.yaml" if chart == "coordinator" else sorted(ci.glob("*.yaml"))[-1]
    release = "a-long-release-name-chosen-for-hospital-a-radiology-x"  # helm's limit: 53
    assert len(release) == 53
    docs = render(
        helm,
        chart,
        "-f",
        str(values),
        "--set",
        "fullnameOverride=,nameOverride=a-long-name-override",
        release=release,
    )
    for doc in docs:
        # every name is also a valid DNS label (Services must be; the rest stay consistent)
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        for value in doc["metadata"]["labels"].values():
            assert len(value) <= 63, value


@pytest.mark.parametrize("chart", ["coordinator", "silo-agent", "synth-service"])
def test_pods_run_as_non_root_with_read_only_root(renders: Path, chart: str) -> None:
    for where, docs in all_renders(renders, chart):
        for workload in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
            assert pod_spec(workload)["securityContext"]["runAsNonRoot"] is True, where
            sc = container(workload)["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            tls = volumes(workload)["tls"]["secret"]
            assert {i["key"] for i in tls["items"]} == {"ca.pem", "cert.pem", "key.pem"}
            assert mounts(workload)["tls"]["readOnly"] is True


def test_no_cluster_wide_rbac_anywhere(renders: Path) -> None:
    for chart in ("coordinator", "silo-agent", "synth-service"):
        for where, docs in all_renders(renders, chart):
            kinds = {d["kind"] for d in docs}
            assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, (chart, where)


# --- schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chart", ["coordinator", "silo-agent", "synth-service"])
def test_schema_refuses_unknown_keys(helm: Path, chart: str) -> None:
    err = render_error(helm, chart, "--set", "replicas=2", "--set", "image.tag_name=x")
    assert "additional properties 'replicas' not allowed" in err
    assert "/image" in err and "'tag_name' not allowed" in err


def test_schema_refuses_wrong_types_naming_the_key(helm: Path) -> None:
    err = render_error(helm, "coordinator", "--set", "config.heartbeat_interval_s=often")
    assert "/config/heartbeat_interval_s" in err and "want number" in err
    err = render_error(helm, "coordinator", "--set", "ports.fleet=70000")
    assert "/ports/fleet" in err
    err = render_error(helm, "coordinator", "--set", "config.log_format=xml")
    assert "/config/log_format" in err and "'json', 'text'" in err
    err = render_error(helm, "synth-service", "--set", "replicaCount=yes")
    assert "/replicaCount" in err and "want integer" in err


def test_schema_refuses_bad_silo_data_sources(helm: Path) -> None:
    base = ["-f", str(CHARTS / "silo-agent" / "ci" / "minimal-values.yaml")]
    err = render_error(helm, "silo-agent", *base, "--set", "data.train.kind=parquet")
    assert "/data/train/kind" in err and "'imagefolder', 'npz', 'sklearn-digits'" in err
    err = render_error(helm, "silo-agent", *base, "--set", "data.train.kind=npz")
    assert "/data/train" in err and "missing property 'path'" in err
    err = render_error(helm, "silo-agent", *base, "--set", "coordinator.address=no-port")
    assert "/coordinator/address" in err


def test_required_values_fail_with_a_clear_message(helm: Path) -> None:
    err = render_error(helm, "silo-agent", "--set", "networkPolicy.enabled=false")
    assert "coordinator.address is required" in err
    err = render_error(helm, "silo-agent", "--set", "coordinator.address=fl.example.org:443")
    assert "networkPolicy.coordinator.cidrs or networkPolicy.coordinator.peers is required" in err
    err = render_error(
        helm,
        "silo-agent",
        "-f",
        str(CHARTS / "silo-agent" / "ci" / "minimal-values.yaml"),
        "--set",
        "data.train.kind=imagefolder,data.train.path=/data/train",
    )
    assert "set data.volume.existingClaim or data.volume.hostPath" in err
    err = render_error(helm, "coordinator", "--set", "config.kubernetes.scale_synth=true")
    assert "config.kubernetes.deployment is required" in err
    err = render_error(helm, "coordinator", "--set", "tls.existingSecret=")
    assert "tls.existingSecret is required" in err


# --- coordinator ------------------------------------------------------------------------------


def test_coordinator_statefulset_with_state_volume_and_grpc_probes(renders: Path) -> None:
    for where, docs in all_renders(renders, "coordinator"):
        sts = one(docs, "StatefulSet")
        assert not of_kind(docs, "Deployment")
        assert sts["spec"]["replicas"] == 1
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "state"
        assert claim["spec"]["resources"]["requests"]["storage"]
        assert mounts(sts)["state"]["mountPath"] == "/var/lib/gptfl"
        # the governing Service exists and is headless
        governing = one(docs, "Service", sts["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None"
        # probes: gRPC on the plaintext health port (not on the mTLS ports)
        ports = {p["name"]: p["containerPort"] for p in container(sts)["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container(sts)[probe]["grpc"]["port"] == ports["health"] == 50059, where
        assert ports["fleet"] == 50051 and ports["admin"] == 50052


def test_coordinator_service_ports(renders: Path) -> None:
    docs = load(renders, "coordinator", "default")
    svc = one(docs, "Service", "gptfl-coordinator")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "fleet": 50051,
        "admin": 50052,
        "health": 50059,
        "metrics": 9400,
    }
    assert svc["spec"]["type"] == "ClusterIP"
    assert not of_kind(docs, "Ingress")
    no_metrics = load(renders, "coordinator", "no-metrics")
    svc = one(no_metrics, "Service", "gptfl-coordinator")
    assert "metrics" not in {p["name"] for p in svc["spec"]["ports"]}


def test_coordinator_exposure_for_silos_outside_the_cluster(renders: Path) -> None:
    docs = load(renders, "coordinator", "full")
    lb = one(docs, "Service", "gptfl-coordinator-external")
    assert lb["spec"]["type"] == "LoadBalancer"
    # health and metrics never leave the cluster
    assert {p["name"] for p in lb["spec"]["ports"]} == {"fleet", "admin"}
    assert lb["spec"]["loadBalancerSourceRanges"]
    ingress = one(docs, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert annotations["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gptfl-coordinator", "port": {"name": "fleet"}}


def test_coordinator_config_is_valid_for_the_coordinator_and_matches_the_pod(
    renders: Path,
) -> None:
    for where, docs in all_renders(renders, "coordinator"):
        sts = one(docs, "StatefulSet")
        cm_name = volumes(sts)["config"]["configMap"]["name"]
        text = one(docs, "ConfigMap", cm_name)["data"]["coordinator.yaml"]
        cfg = parse_config(CoordinatorConfig, yaml.safe_load(text), source=where)
        assert container(sts)["args"] == [
            "gptfl-coordinator",
            "--config",
            "/etc/gptfl/coordinator.yaml",
        ]
        assert mounts(sts)["config"]["mountPath"] == "/etc/gptfl/coordinator.yaml"
        assert str(cfg.state_dir) == mounts(sts)["state"]["mountPath"]
        assert cfg.tls is not None and not cfg.insecure
        tls_dir = mounts(sts)["tls"]["mountPath"]
        assert {str(cfg.tls.ca), str(cfg.tls.cert), str(cfg.tls.key)} == {
            f"{tls_dir}/ca.pem",
            f"{tls_dir}/cert.pem",
            f"{tls_dir}/key.pem",
        }
        ports = {p["name"]: p["containerPort"] for p in container(sts)["ports"]}
        assert cfg.fleet_address.endswith(f":{ports['fleet']}")
        assert cfg.admin_address.endswith(f":{ports['admin']}")
        assert cfg.health_address.endswith(f":{ports['health']}")
        if "metrics" in ports:
            assert cfg.metrics_address.endswith(f":{ports['metrics']}")
        else:
            assert cfg.metrics_address == ""
        assert cfg.kubernetes.namespace == NAMESPACE
        # the checksum annotation is the hash of exactly this config
        checksum = sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert checksum == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()


def test_coordinator_checksum_changes_only_with_the_config(helm: Path) -> None:
    def checksum(*args: str) -> str:
        sts = one(render(helm, "coordinator", *args), "StatefulSet")
        return str(sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    base = checksum()
    assert checksum() == base
    assert checksum("--set", "config.heartbeat_interval_s=7") != base
    assert checksum("--set", "config.allowed_silos={hospital-a}") != base
    assert checksum("--set", "ports.metrics=9500") != base
    # a change outside coordinator.yaml does not roll the pod for config reasons
    assert checksum("--set", "podLabels.team=x") == base


def test_coordinator_rbac_only_with_synth_scaling_and_only_what_it_needs(renders: Path) -> None:
    default = load(renders, "coordinator", "default")
    assert not of_kind(default, "Role") and not of_kind(default, "RoleBinding")
    assert pod_spec(one(default, "StatefulSet"))["automountServiceAccountToken"] is False

    docs = load(renders, "coordinator", "full")
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    deployment = "gptfl-synth-service"
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": [deployment],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": [deployment],
            "verbs": ["patch"],
        },
    ]
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sts = one(docs, "StatefulSet")
    account = pod_spec(sts)["serviceAccountName"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    assert one(docs, "ServiceAccount", account)
    assert pod_spec(sts)["automountServiceAccountToken"] is True
    cfg = yaml.safe_load(one(docs, "ConfigMap", "gptfl-coordinator")["data"]["coordinator.yaml"])
    assert cfg["kubernetes"] == {
        "scale_synth": True,
        "namespace": NAMESPACE,
        "deployment": deployment,
        "ready_timeout_s": 900,
    }


def test_coordinator_pdb_selects_the_pod(renders: Path) -> None:
    docs = load(renders, "coordinator", "default")
    pdb = one(docs, "PodDisruptionBudget")
    sts = one(docs, "StatefulSet")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert not of_kind(load(renders, "coordinator", "no-metrics"), "PodDisruptionBudget")


def test_coordinator_monitoring_objects_come_from_the_single_sources(renders: Path) -> None:
    docs = load(renders, "coordinator", "full")
    rule = one(docs, "PrometheusRule")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"] == alerts
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"

    dashboard = one(docs, "ConfigMap", "gptfl-coordinator-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    source = json.loads((ROOT / "deploy" / "grafana" / "gptfl.json").read_text())
    assert json.loads(dashboard["data"]["gptfl.json"]) == source

    default = load(renders, "coordinator", "default")
    assert not of_kind(default, "ServiceMonitor") and not of_kind(default, "PrometheusRule")
    assert one(default, "ConfigMap", "gptfl-coordinator-dashboard")


# --- silo agent -------------------------------------------------------------------------------


def test_silo_renders_no_service_no_ingress_and_listens_on_nothing(renders: Path) -> None:
    for where, docs in all_renders(renders, "silo-agent"):
        kinds = {d["kind"] for d in docs}
        assert "Service" not in kinds and "Ingress" not in kinds, where
        assert kinds <= {
            "Deployment",
            "ConfigMap",
            "NetworkPolicy",
            "ServiceAccount",
            "PersistentVolumeClaim",
        }, where
        deployment = one(docs, "Deployment")
        ports = container(deployment).get("ports", [])
        assert [p["name"] for p in ports] in ([], ["metrics"]), where
        assert pod_spec(deployment)["automountServiceAccountToken"] is False


def _egress_is_coordinator_and_dns_only(policy: Doc, coordinator_port: int) -> list[Doc]:
    """Asserts the egress rules; returns the coordinator rule's peers."""
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    rules = policy["spec"]["egress"]
    coordinator_rules = [
        r for r in rules if r["ports"] == [{"protocol": "TCP", "port": coordinator_port}]
    ]
    dns_rules = [r for r in rules if {p["port"] for p in r["ports"]} == {53}]
    assert len(coordinator_rules) == 1 and len(rules) == len(coordinator_rules) + len(dns_rules)
    for rule in dns_rules:
        (peer,) = rule["to"]
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "kube-system"
        }
        assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    peers: list[Doc] = coordinator_rules[0]["to"]
    assert peers, "an egress rule without 'to' would allow every destination"
    return peers


def test_silo_network_policy_is_egress_only_to_the_coordinator(renders: Path) -> None:
    docs = load(renders, "silo-agent", "minimal")
    policy = one(docs, "NetworkPolicy")
    deployment = one(docs, "Deployment")
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == deployment["spec"]["selector"]["matchLabels"]
    )
    assert policy["spec"]["ingress"] == []  # every inbound connection is denied
    # coordinator.address fl.example.org:443 -> port 443 at the configured address block
    peers = _egress_is_coordinator_and_dns_only(policy, 443)
    assert peers == [{"ipBlock": {"cidr": "203.0.113.10/32"}}]

    docs = load(renders, "silo-agent", "existing-pvc")
    peers = _egress_is_coordinator_and_dns_only(one(docs, "NetworkPolicy"), 50051)
    assert peers[0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "coordinator"}

    # with metrics on, only the metrics port is open, and only to the configured scrapers
    docs = load(renders, "silo-agent", "hostpath")
    policy = one(docs, "NetworkPolicy")
    _egress_is_coordinator_and_dns_only(policy, 50051)
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 9402}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def test_silo_data_volume_host_path_or_existing_claim(renders: Path) -> None:
    host = one(load(renders, "silo-agent", "hostpath"), "Deployment")
    assert volumes(host)["data"]["hostPath"] == {
        "path": "/srv/radiology/chest-xray",
        "type": "Directory",
    }
    assert mounts(host)["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}

    pvc = one(load(renders, "silo-agent", "existing-pvc"), "Deployment")
    assert volumes(pvc)["data"]["persistentVolumeClaim"] == {
        "claimName": "bank-c-features",
        "readOnly": True,
    }
    assert mounts(pvc)["data"]["readOnly"] is True
    assert volumes(pvc)["state"]["persistentVolumeClaim"]["claimName"] == "bank-c-silo-state"
    assert not of_kind(load(renders, "silo-agent", "existing-pvc"), "PersistentVolumeClaim")

    minimal = one(load(renders, "silo-agent", "minimal"), "Deployment")
    assert "data" not in volumes(minimal)


def test_silo_config_is_valid_for_the_agent_and_matches_the_pod(renders: Path) -> None:
    for where, docs in all_renders(renders, "silo-agent"):
        deployment = one(docs, "Deployment")
        text = one(docs, "ConfigMap")["data"]["silo.yaml"]
        cfg = parse_config(SiloConfig, yaml.safe_load(text), source=where)
        assert container(deployment)["args"] == ["gptfl-silo", "--config", "/etc/gptfl/silo.yaml"]
        assert str(cfg.state_dir) == mounts(deployment)["state"]["mountPath"]
        assert cfg.tls is not None and not cfg.insecure
        assert str(cfg.tls.key) == f"{mounts(deployment)['tls']['mountPath']}/key.pem"
        data_mount = mounts(deployment).get("data")
        for source in (cfg.data.train, cfg.data.eval):
            path = getattr(source, "path", None)
            if path is not None:
                assert data_mount is not None
                assert str(path).startswith(data_mount["mountPath"] + "/"), where
        checksum = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert checksum == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()


# --- synth service ----------------------------------------------------------------------------


def test_synth_scaled_to_zero_with_gpu_limits(renders: Path) -> None:
    docs = load(renders, "synth-service", "default")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 0
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(
        deployment
    )["tolerations"]
    assert mounts(deployment)["models"]["mountPath"] == "/models"
    claim = volumes(deployment)["models"]["persistentVolumeClaim"]["claimName"]
    assert one(docs, "PersistentVolumeClaim", claim)
    probe = container(deployment)["readinessProbe"]["grpc"]["port"]
    assert probe == 50069
    svc = one(docs, "Service")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "grpc": 50061,
        "health": 50069,
        "metrics": 9401,
    }


def test_synth_variants(renders: Path) -> None:
    scaled = load(renders, "synth-service", "scaled")
    deployment = one(scaled, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod_spec(deployment)["nodeSelector"] == {"cloud.example.org/accelerator": "nvidia-h100"}
    assert volumes(deployment)["models"]["persistentVolumeClaim"]["claimName"] == (
        "diffusers-weights"
    )
    assert not of_kind(scaled, "PersistentVolumeClaim")
    config = parse_config(
        SynthConfig, yaml.safe_load(one(scaled, "ConfigMap")["data"]["synth.yaml"]), source="ci"
    )
    assert config.device == "cuda:0" and config.text_to_image_batch_size == 16

    cpu = one(load(renders, "synth-service", "cpu"), "Deployment")
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})


def test_synth_config_is_valid_for_the_service_and_matches_the_pod(renders: Path) -> None:
    for where, docs in all_renders(renders, "synth-service"):
        deployment = one(docs, "Deployment")
        text = one(docs, "ConfigMap")["data"]["synth.yaml"]
        cfg = parse_config(SynthConfig, yaml.safe_load(text), source=where)
        assert container(deployment)["args"] == ["gptfl-synth", "--config", "/etc/gptfl/synth.yaml"]
        assert mounts(deployment)["config"]["mountPath"] == "/etc/gptfl/synth.yaml"
        assert cfg.tls is not None and not cfg.insecure
        tls_dir = mounts(deployment)["tls"]["mountPath"]
        assert {str(cfg.tls.ca), str(cfg.tls.cert), str(cfg.tls.key)} == {
            f"{tls_dir}/ca.pem",
            f"{tls_dir}/cert.pem",
            f"{tls_dir}/key.pem",
        }
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        assert cfg.address.endswith(f":{ports['grpc']}")
        assert cfg.health_address.endswith(f":{ports['health']}")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container(deployment)[probe]["grpc"]["port"] == ports["health"], where
        service_ports = {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
        if "metrics" in ports:
            assert cfg.metrics_address.endswith(f":{ports['metrics']}")
            assert "metrics" in service_ports
        else:
            assert cfg.metrics_address == "" and "metrics" not in service_ports
            assert not of_kind(docs, "ServiceMonitor"), where
        # generators and datasets live on the models volume (the root file system is
        # read-only, and datasets must outlive the scale-down between phases)
        models = mounts(deployment)["models"]["mountPath"]
        assert str(cfg.models_dir) == models
        assert str(cfg.data_dir).startswith(models + "/")
        assert (
            cfg.shutdown_grace_s
            < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        )
        checksum = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert checksum == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()


def test_synth_schema_refuses_keys_the_service_does_not_know(helm: Path) -> None:
    err = render_error(helm, "synth-service", "--set", "config.generator=sd")
    assert "/config" in err and "'generator' not allowed" in err
    err = render_error(helm, "synth-service", "--set", "config.device=tpu")
    assert "/config/device" in err


def test_coordinator_rbac_names_the_synth_chart_deployment(helm: Path, renders: Path) -> None:
    """The Role in the coordinator chart grants exactly the Deployment the synth chart makes."""
    synth = one(render(helm, "synth-service"), "Deployment")["metadata"]["name"]
    docs = render(
        helm,
        "coordinator",
        "--set",
        f"config.kubernetes.scale_synth=true,config.kubernetes.deployment={synth}",
    )
    for rule in one(docs, "Role")["rules"]:
        assert rule["resourceNames"] == [synth]
