"""Renders and validates every Helm chart in deploy/helm with real tools.

For every chart and every ``ci/*-values.yaml`` file, and for each Kubernetes version in
:data:`KUBE_VERSIONS`:

1. ``helm lint --strict`` (warnings fail);
2. ``helm template`` (the chart's ``values.schema.json`` is applied here too);
3. ``kubernetes-validate --strict`` of every rendered core object against that version's
   OpenAPI schema (unknown fields fail).

Custom resources (prometheus-operator's ServiceMonitor and PrometheusRule) are not in the
Kubernetes OpenAPI schemas that kubernetes-validate bundles. They are checked here against a
hand-written subset schema covering exactly the fields the charts render (unknown fields
fail), and a ServiceMonitor must select a rendered Service that has the port it scrapes. Any
other kind that kubernetes-validate does not know fails the check.

The coordinator chart carries copies of deploy/prometheus/alerts.yaml and
deploy/grafana/gptfl.json (a chart cannot read files outside its directory); a copy that
differs from its source fails the check, and ``--sync`` refreshes the copies.

Usage::

    .venv/bin/python scripts/check_charts.py [--out DIR] [--helm PATH] [--sync]

Renders are written under ``--out`` (default: a temporary directory) as
``CHART/VALUES_STEM/k8s-VERSION.yaml``, for tests to assert on. Exit status 0 when every check
passed, 1 otherwise; problems are printed one per line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import yaml

# libyaml's loader when PyYAML was built with it (renders are a few thousand lines each)
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ROOT = Path(__file__).resolve().parent.parent
CHARTS_DIR = ROOT / "deploy" / "helm"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
RELEASE = "gptfl"
NAMESPACE = "gptfl-ci"
WORKERS = 4

#: chart copy -> its single source (see the module docstring)
SYNCED_FILES = {
    CHARTS_DIR / "coordinator" / "files" / "alerts.yaml": ROOT / "deploy/prometheus/alerts.yaml",
    CHARTS_DIR / "coordinator" / "files" / "gptfl.json": ROOT / "deploy/grafana/gptfl.json",
}

_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION: dict[str, Any] = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}

# Subsets of the monitoring.coreos.com/v1 CRD schemas (prometheus-operator API reference),
# restricted to the fields the charts render, so that a typo is caught rather than ignored.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRING_MAP},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                        "any": {"type": "boolean"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}

PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {"type": "string", "minLength": 1},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
}


@dataclass
class Report:
    """What the checks found; ``problems`` empty means every check passed."""

    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def ok(self, where: str, message: str) -> None:
        self.passed.append(f"{where}: {message}")


def get_helm() -> Path:
    """The helm binary from scripts/get_helm.sh (downloaded once into .tools/)."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "get_helm.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def kubernetes_validate_command() -> list[str]:
    """kubernetes-validate from the interpreter's environment (the project venv)."""
    exe = Path(sys.executable).parent / "kubernetes-validate"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kubernetes-validate")
    if found is None:
        raise SystemExit(
            "check_charts.py: kubernetes-validate is not installed (requirements/dev.txt)"
        )
    return [found]


def charts() -> list[Path]:
    """Every chart directory under deploy/helm."""
    return sorted(p.parent for p in CHARTS_DIR.glob("*/Chart.yaml"))


def ci_values(chart: Path) -> list[Path]:
    """The chart's ci/*-values.yaml files."""
    return sorted((chart / "ci").glob("*-values.yaml"))


def check_synced_files(report: Report, *, sync: bool) -> None:
    """Chart copies must equal their sources; ``sync`` rewrites the copies first."""
    for copy, source in SYNCED_FILES.items():
        where = str(copy.relative_to(ROOT))
        if sync:
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            report.fail(
                where,
                f"differs from {source.relative_to(ROOT)}; run scripts/check_charts.py --sync",
            )
        else:
            report.ok(where, f"same as {source.relative_to(ROOT)}")


def helm_env(home: Path) -> dict[str, str]:
    """An environment that keeps helm's cache and config out of the user's home."""
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    env["HELM_NO_PLUGINS"] = "1"
    return env


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs a command; returns its exit status and stdout+stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def split_documents(rendered: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a render."""
    return [doc for doc in yaml.load_all(rendered, Loader=SafeLoader) if doc]


def check_custom_resources(
    report: Report, where: str, docs: Iterable[dict[str, Any]], all_docs: list[dict[str, Any]]
) -> None:
    """Validates CRD objects against the subset schemas, and ServiceMonitor selectors."""
    services = [d for d in all_docs if d.get("kind") == "Service"]
    for doc in docs:
        key = (doc.get("apiVersion", ""), doc.get("kind", ""))
        name = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
        validator = jsonschema.Draft7Validator(CRD_SCHEMAS[key])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        for error in errors:
            path = ".".join(str(p) for p in error.absolute_path) or "<root>"
            report.fail(where, f"{name}: {path}: {error.message}")
        if errors:
            continue
        if key[1] == "ServiceMonitor":
            selector = doc["spec"]["selector"]["matchLabels"]
            for endpoint in doc["spec"]["endpoints"]:
                if not any(
                    selector.items() <= svc["metadata"].get("labels", {}).items()
                    and endpoint["port"] in {p.get("name") for p in svc["spec"]["ports"]}
                    for svc in services
                ):
                    report.fail(
                        where,
                        f"{name}: no rendered Service matches its selector with a port named "
                        f"{endpoint['port']!r}",
                    )
        report.ok(where, f"{name} matches the {key[0]} subset schema")


@dataclass(frozen=True)
class Render:
    """One chart rendered with one ci values file for one Kubernetes version."""

    chart: Path
    values: Path
    version: str

    @property
    def where(self) -> str:
        return f"{self.chart.name} ci/{self.values.name} k8s {self.version}"

    @property
    def stem(self) -> str:
        return self.values.name.removesuffix("-values.yaml")


def lint_and_template(job: Render, *, helm: Path, env: dict[str, str]) -> tuple[str, str | None]:
    """Runs helm lint --strict and helm template; returns (error, rendered manifests)."""
    args = ["--kube-version", job.version, "-f", str(job.values)]
    code, text = run([str(helm), "lint", "--strict", str(job.chart), *args], env=env)
    if code != 0:
        return f"helm lint --strict failed:\n{text}", None
    code, rendered = run(
        [str(helm), "template", RELEASE, str(job.chart), "--namespace", NAMESPACE, *args], env=env
    )
    if code != 0:
        return f"helm template failed:\n{rendered}", None
    return "", rendered


def render_jobs(report: Report) -> list[Render]:
    """Every (chart, ci values file, Kubernetes version) to check."""
    jobs = []
    for chart in charts():
        values_files = ci_values(chart)
        if not values_files:
            report.fail(str(chart.relative_to(ROOT)), "no ci/*-values.yaml files")
        jobs += [
            Render(chart, values, version) for values in values_files for version in KUBE_VERSIONS
        ]
    return jobs


def check_render(report: Report, job: Render, rendered: str, *, out: Path) -> Path:
    """Writes a render, checks its custom resources; returns the file of its core objects."""
    target = out / job.chart.name / job.stem
    target.mkdir(parents=True, exist_ok=True)
    (target / f"k8s-{job.version}.yaml").write_text(rendered)
    docs = split_documents(rendered)
    core = [d for d in docs if (d.get("apiVersion"), d.get("kind")) not in CRD_SCHEMAS]
    custom = [d for d in docs if (d.get("apiVersion"), d.get("kind")) in CRD_SCHEMAS]
    check_custom_resources(report, job.where, custom, docs)
    core_file = target / f"k8s-{job.version}.core.yaml"
    core_file.write_text(yaml.safe_dump_all(core, sort_keys=False))
    return core_file


def kubernetes_validate(report: Report, *, version: str, files: Sequence[Path], out: Path) -> None:
    """Runs kubernetes-validate --strict on the rendered core objects for one version."""
    if not files:
        return
    cmd = [*kubernetes_validate_command(), "--strict", "--kubernetes-version", version]
    code, text = run([*cmd, "--quiet", *map(str, files)])
    # --quiet prints only problems: a failure (ERROR) or a kind it has no schema for (WARN);
    # custom resources were taken out beforehand, so either one fails the check.
    problems = [line for line in text.splitlines() if line.strip()]
    where = f"kubernetes-validate --strict k8s {version}"
    if code != 0 or problems:
        for line in problems or [f"exit status {code}"]:
            report.fail(where, line.replace(str(out) + os.sep, ""))
    else:
        report.ok(where, f"{len(files)} renders valid")


def check_all(*, out: Path, helm: Path | None = None, sync: bool = False) -> Report:
    """Every check of this script; renders go under ``out``."""
    report = Report()
    check_synced_files(report, sync=sync)
    helm = helm or get_helm()
    env = helm_env(out / ".helm")
    jobs = render_jobs(report)
    to_validate: dict[str, list[Path]] = {v: [] for v in KUBE_VERSIONS}
    # helm and kubernetes-validate are separate processes: run a few at once.
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = pool.map(lambda job: lint_and_template(job, helm=helm, env=env), jobs)
        for job, (error, rendered) in zip(jobs, results, strict=True):
            if rendered is None:
                report.fail(job.where, error)
                continue
            report.ok(job.where, "helm lint --strict, helm template")
            to_validate[job.version].append(check_render(report, job, rendered, out=out))
        list(
            pool.map(
                lambda item: kubernetes_validate(report, version=item[0], files=item[1], out=out),
                to_validate.items(),
            )
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="keep the renders in this directory")
    parser.add_argument("--helm", type=Path, help="helm binary (default: scripts/get_helm.sh)")
    parser.add_argument(
        "--sync", action="store_true", help="refresh the chart copies of alerts and dashboard"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also list passed checks")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gptfl-charts-") as tmp:
        out: Path = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report = check_all(out=out, helm=args.helm, sync=args.sync)
    if args.verbose:
        for line in report.passed:
            print(f"ok   {line}")
    for line in report.problems:
        print(f"FAIL {line}", file=sys.stderr)
    n_charts = len(charts())
    if report.problems:
        print(
            f"check_charts: {len(report.problems)} problem(s) in {n_charts} charts", file=sys.stderr
        )
        return 1
    print(
        f"check_charts: {n_charts} charts x their ci values x k8s {', '.join(KUBE_VERSIONS)}: "
        f"helm lint --strict, helm template, kubernetes-validate --strict all passed "
        f"({len(report.passed)} checks)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
