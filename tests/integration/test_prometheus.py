"""A real Prometheus scrapes a real federation; every dashboard and alert expression is run.

Debian's ``prometheus`` is installed by ``scripts/ensure_prometheus.sh`` when missing (nothing
is skipped). The test starts a coordinator and silo agents as processes over mutual TLS
(:class:`gptfl.local_cluster.LocalCluster` with metrics on), a Prometheus on loopback that
scrapes them every second and loads ``deploy/prometheus/alerts.yaml``, and runs a short job.
After the job it waits until Prometheus has scraped every process again, then

- runs every expression of ``deploy/prometheus/queries.yaml`` whose ``needs`` were all
  running through ``/api/v1/query``: ``expect: data`` must return a sample with a finite
  value, ``expect: any`` must evaluate; the expressions that need the synth service (not part
  of this job) are listed, not counted as checked;
- checks that Prometheus evaluated every alert rule without error and that none fires;
- scrapes each process's ``/metrics`` directly and requires every metric family its metrics
  module declares to have been updated by the job (the exceptions are listed with reasons).

A second test does the same for the synth service: it starts it as a process (the way
``make demo`` does), scrapes it, runs a short Generate and Pretrain through it over mutual TLS,
and then runs every expression that needs the synth service.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from coordinator.metrics import CoordinatorMetrics
from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.errors import all_reasons
from gptfl.local_cluster import LocalCluster, SiloPlan
from gptfl.models import ModelSpec
from gptfl.pki import participant_files
from gptfl.synth_client import SynthClient
from gptfl.synth_spec import GeneratorSettings, PretrainSettings, SynthesisRequest
from silo_agent.metrics import SiloMetrics
from synth_service.metrics import SynthMetrics
from tests.integration.conftest import wait_for_job_end
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUERIES = ROOT / "deploy" / "prometheus" / "queries.yaml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ENSURE = ROOT / "scripts" / "ensure_prometheus.sh"

ROUNDS = 4
SILOS = 3
RUNNING = {"coordinator", "silo"}  # the processes this test scrapes
KNOWN_NEEDS = RUNNING | {"synth"}
COORDINATOR_JOB = "gptfl-coordinator"
SILO_JOB = "gptfl-silo"
SYNTH_JOB = "gptfl-synth"

# Declared metric families that legitimately keep their initial value in a clean job, and why.
# Each is still required to be exposed with the series named here.
STAY_INITIAL: dict[str, str] = {
    "gptfl_updates_rejected": (
        "no update is rejected in a clean run; the series of every reason exist at 0 from the "
        "start so rates and the rejection alert have data"
    ),
    "gptfl_tasks_declined": (
        "no silo declines a task in a clean run; the series of every decline kind exist at 0"
    ),
    "gptfl_silo_privacy_epsilon": (
        "set only for silos that train with DP-SGD; this job's silos do not "
        "(tests/integration/test_dp_job.py covers it)"
    ),
    "gptfl_job_privacy_epsilon": (
        "set only for a job with silo_level_dp; this job has none (unit-tested in "
        "tests/unit/coordinator/test_silo_level_dp.py)"
    ),
    "gptfl_updates_clipped": "a clean job has no update_bounds, so no update is clipped",
    "gptfl_rounds_failed": "no round of a clean job makes a non-finite model",
}

# The same for the synth service's families.
SYNTH_STAY_INITIAL: dict[str, str] = {
    "gptfl_synth_gpu_memory_bytes": (
        "the test runs the service on the CPU; the gauge is only set on a CUDA device (it is "
        "still exposed, at 0, so the dashboard panel has data)"
    ),
}


# ---- Prometheus -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Prometheus:
    """A Prometheus server on loopback with its own TSDB folder, scraping static targets."""

    def __init__(self, binary: Path, work: Path, targets: dict[str, list[int]]) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = work / "prometheus.log"
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
                }
                for job, ports in targets.items()
            ],
        }
        config_file = work / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as response,
            ):
                return bool(response.status == 200)
            return False

        wait_until(
            ready, timeout_s=timeout_s, interval_s=0.2, what="prometheus", detail=self.log_tail
        )

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = _get_json(f"{self.base}/api/v1/{path}{query}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def prometheus_binary() -> Path:
    done = subprocess.run([str(ENSURE)], capture_output=True, text=True)
    assert done.returncode == 0, f"scripts/ensure_prometheus.sh failed:\n{done.stderr}"
    found = shutil.which("prometheus")
    assert found, "scripts/ensure_prometheus.sh did not provide prometheus"
    return Path(found)


# ---- metrics as exposed -----------------------------------------------------------------------


Families = dict[str, tuple[str, list[Sample]]]


def _families(text: str) -> Families:
    return {
        f.name: (f.type, [s for s in f.samples if not s.name.endswith("_created")])
        for f in text_string_to_metric_families(text)
    }


def _scrape(port: int) -> Families:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return _families(response.read().decode())


def _declared(registry: CollectorRegistry) -> Families:
    """The families a metrics module declares, with their initial samples."""
    return {
        f.name: (f.type, [s for s in f.samples if not s.name.endswith("_created")])
        for f in registry.collect()
    }


def _updated(kind: str, samples: list[Sample]) -> bool:
    if kind == "counter":
        return any(s.value > 0 for s in samples if s.name.endswith("_total"))
    if kind == "histogram":
        return any(s.value > 0 for s in samples if s.name.endswith("_count"))
    if kind == "gauge":
        return any(s.value != 0 for s in samples)
    raise AssertionError(f"unexpected metric type {kind}")


def _check_declared_metrics_updated(
    who: str,
    declared: Families,
    exposed: Families,
    problems: list[str],
    stay_initial: dict[str, str] = STAY_INITIAL,
) -> None:
    for name, (kind, initial) in declared.items():
        if name not in exposed:
            problems.append(f"{who}: {name} is declared but not exposed")
            continue
        exposed_kind, samples = exposed[name]
        assert exposed_kind == kind, (who, name, exposed_kind, kind)
        if name in stay_initial:
            continue
        values = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in samples}
        first = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in initial}
        if not _updated(kind, samples) or values == first:
            problems.append(f"{who}: {name} ({kind}) was never updated during the job: {samples}")


def _value(families: Families, sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count")
    found = [
        s.value
        for s in families[family][1]
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (sample, labels, families.get(family))
    return found[0]


# ---- the test ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _cluster(work: Path, plans: list[SiloPlan]) -> Iterator[LocalCluster]:
    cluster = LocalCluster(work, silos=plans, runs_dir=work / "runs", metrics=True)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_dashboard_and_alert_queries_return_data_from_a_live_job(
    tmp_path: Path, prometheus_binary: Path, record_property: Callable[[str, object], None]
) -> None:
    entries: list[dict[str, Any]] = yaml.safe_load(QUERIES.read_text())
    for entry in entries:
        assert set(entry["needs"]) <= KNOWN_NEEDS and entry["needs"], entry
        assert entry["expect"] in ("data", "any"), entry

    spec = digits_job_spec(name="prom-itest", rounds=ROUNDS, silos=SILOS, strategy="fedavg", seed=0)
    # The silos stay up after the job so Prometheus scrapes their final values; stop() ends them.
    plans = [
        SiloPlan(p.silo_id, p.data, {"exit_after_job": False})
        for p in digits_silos(count=SILOS, alpha=0.5, seed=0)
    ]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(_cluster(tmp_path / "work", plans))
        cluster.provision()
        endpoints = cluster.start_coordinator()
        cluster.start_silos(timeout_s=60)
        assert endpoints.metrics_port is not None
        assert set(cluster.silo_metrics_ports) == {p.silo_id for p in plans}
        silo_port = dict(cluster.silo_metrics_ports)

        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        prom = Prometheus(
            prometheus_binary,
            prom_dir,
            {COORDINATOR_JOB: [endpoints.metrics_port], SILO_JOB: list(silo_port.values())},
        )
        stack.callback(prom.stop)
        prom.wait_ready(timeout_s=30)

        def logs() -> str:
            return "\n".join(
                [f"--- prometheus\n{prom.log_tail()}"]
                + [f"--- {name}\n{cluster.log_tail(name, 15)}" for name in cluster.processes]
            )

        # Every process is scraped once before the job, so counters have a starting point.
        wait_until(
            lambda: (
                (t := prom.targets()) != []
                and len(t) == SILOS + 1
                and all(x["health"] == "up" for x in t)
            ),
            timeout_s=20,
            interval_s=0.25,
            what="every target up",
            detail=lambda: json.dumps(prom.targets(), indent=1) + logs(),
        )

        with cluster.admin() as admin:
            admin.status(wait_for_ready=True)
            admin.submit(yaml.safe_dump(spec))
            status = wait_for_job_end(admin, timeout_s=90, interval_s=0.5, detail=logs)
            assert status.phase == "finished", (status.message, logs())
        job_seconds = time.monotonic() - started

        # The job has ended: values are final. Read them directly, then wait until Prometheus
        # has scraped every process after this moment.
        final_at = time.time()
        coordinator = _scrape(endpoints.metrics_port)
        silos = {silo: _scrape(port) for silo, port in silo_port.items()}

        def scraped_after_end() -> bool:
            stamps = prom.query("timestamp(up)")
            return len(stamps) == SILOS + 1 and all(float(s["value"][1]) > final_at for s in stamps)

        wait_until(
            scraped_after_end,
            timeout_s=15,
            interval_s=0.25,
            what="a scrape of every process after the job",
            detail=logs,
        )
        wait_until(
            lambda: (
                [float(s["value"][1]) for s in prom.query("gptfl_rounds_completed_total")]
                == [float(ROUNDS)]
            ),
            timeout_s=10,
            interval_s=0.25,
            what=f"gptfl_rounds_completed_total to reach {ROUNDS}",
            detail=logs,
        )
        # A scrape can time out on a loaded 2-core machine; the next one must succeed.
        wait_until(
            lambda: all(t["health"] == "up" and not t["lastError"] for t in prom.targets()),
            timeout_s=15,
            interval_s=0.25,
            what="every target healthy",
            detail=lambda: f"{prom.targets()}\n{logs()}",
        )

        # ---- every dashboard and alert expression through the HTTP API ---------------------
        checked: list[str] = []
        evaluated: list[str] = []
        not_run: list[str] = []
        failures: list[str] = []
        for entry in entries:
            if not set(entry["needs"]) <= RUNNING:
                not_run.append(entry["id"])
                continue
            result = prom.query(entry["expr"])  # asserts that it evaluates
            if entry["expect"] == "any":
                evaluated.append(entry["id"])
                continue
            values = [float(s["value"][1]) for s in result]
            if not any(math.isfinite(v) for v in values):
                failures.append(f"{entry['id']}: {entry['expr']} -> {result}")
            checked.append(entry["id"])

        # ---- the alert rules, loaded and evaluated by this Prometheus -----------------------
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        alert_names = {
            r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
        }
        assert {r["name"] for r in rules} == alert_names, rules
        for rule in rules:
            assert rule["health"] == "ok", rule
            assert rule["state"] != "firing", rule
        stopped = time.monotonic() - started

    assert not failures, "expressions without data:\n" + "\n".join(failures)
    synth_ids = [e["id"] for e in entries if "synth" in e["needs"]]
    assert not_run == synth_ids, (not_run, synth_ids)
    assert checked, "no dashboard or alert expression was checked for data"
    print(
        f"\njob {job_seconds:.1f}s, whole run {stopped:.1f}s; {len(checked)} expressions returned "
        f"data, {len(evaluated)} alert expressions evaluated, {len(not_run)} not run (they need "
        f"the synth service): {', '.join(not_run)}"
    )
    record_property("prometheus_expressions_with_data", checked)
    record_property("prometheus_alert_expressions_evaluated", evaluated)
    record_property("prometheus_expressions_not_run_need_synth", not_run)

    # ---- every declared metric was updated by the job ----------------------------------------
    problems: list[str] = []
    _check_declared_metrics_updated(
        "coordinator", _declared(CoordinatorMetrics.create().registry), coordinator, problems
    )
    for silo, families in silos.items():
        _check_declared_metrics_updated(
            silo, _declared(SiloMetrics.create().registry), families, problems
        )
    assert not problems, "\n".join(problems)

    # The exceptions: present, at their initial value, one series per reason.
    rejected = coordinator["gptfl_updates_rejected"][1]
    assert {s.labels["reason"] for s in rejected if s.name.endswith("_total")} == set(all_reasons())
    assert all(s.value == 0 for s in rejected), rejected

    # And the values say what happened.
    assert _value(coordinator, "gptfl_rounds_completed_total") == ROUNDS
    assert _value(coordinator, "gptfl_current_round") == ROUNDS
    assert _value(coordinator, "gptfl_total_rounds") == ROUNDS
    assert _value(coordinator, "gptfl_updates_accepted_total") == ROUNDS * SILOS
    assert _value(coordinator, "gptfl_round_duration_seconds_count") == ROUNDS
    assert _value(coordinator, "gptfl_aggregation_seconds_count") == ROUNDS
    assert _value(coordinator, "gptfl_job_phase", phase="finished") == 1
    assert _value(coordinator, "gptfl_silos_connected") == SILOS
    for silo, families in silos.items():
        assert _value(coordinator, "gptfl_silo_last_round", silo=silo) == ROUNDS
        assert _value(coordinator, "gptfl_bytes_received_total", silo=silo) > 0
        assert _value(coordinator, "gptfl_bytes_sent_total", silo=silo) > 0
        assert _value(families, "gptfl_silo_train_seconds_count") == ROUNDS
        assert _value(families, "gptfl_silo_tasks_total", kind="train", outcome="done") == ROUNDS
        assert _value(families, "gptfl_silo_tasks_total", kind="evaluate", outcome="done") == ROUNDS
        for kind in ("train", "evaluate"):
            for outcome in ("failed", "rejected"):
                assert _value(families, "gptfl_silo_tasks_total", kind=kind, outcome=outcome) == 0


def test_synth_queries_return_data_from_a_live_generate_and_pretrain(
    tmp_path: Path, prometheus_binary: Path, record_property: Callable[[str, object], None]
) -> None:
    entries: list[dict[str, Any]] = yaml.safe_load(QUERIES.read_text())
    synth_entries = [e for e in entries if "synth" in e["needs"]]
    assert synth_entries and all(e["needs"] == ["synth"] for e in synth_entries)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(_cluster(tmp_path / "work", []))
        cluster.provision()
        address = cluster.start_synth(timeout_s=60)
        assert cluster.synth_metrics_port is not None
        port = cluster.synth_metrics_port

        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        prom = Prometheus(prometheus_binary, prom_dir, {SYNTH_JOB: [port]})
        stack.callback(prom.stop)
        prom.wait_ready(timeout_s=30)

        def logs() -> str:
            return f"--- prometheus\n{prom.log_tail()}\n--- synth\n{cluster.log_tail('synth', 20)}"

        wait_until(
            lambda: [t["health"] for t in prom.targets()] == ["up"],
            timeout_s=20,
            interval_s=0.25,
            what="the synth target up",
            detail=logs,
        )
        labels = [str(d) for d in range(10)]
        with SynthClient(address, tls=participant_files(cluster.pki_dir, "coordinator")) as client:
            client.wait_ready(30)
            info = client.generate(
                backend="class-conditional",
                generator="digits",
                request=SynthesisRequest(
                    labels=labels,
                    images_per_label=4,
                    in_channels=1,
                    image_size=8,
                    resize_mode="ink-box",
                    guidance_min=1.0,
                    guidance_max=1.0,
                ),
                generator_settings=GeneratorSettings(num_inference_steps=3),
            )
            outcome = client.pretrain(
                dataset_id=info.dataset_id,
                model=ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8),
                settings=PretrainSettings(epochs=2, batch_size=16, val_fraction=0.25),
            )
        assert len(outcome.epochs) == 2

        final_at = time.time()
        synth = _scrape(port)
        wait_until(
            lambda: (
                [float(s["value"][1]) > final_at for s in prom.query("timestamp(up)")] == [True]
            ),
            timeout_s=15,
            interval_s=0.25,
            what="a scrape of the synth service after the work",
            detail=logs,
        )
        checked: list[str] = []
        failures: list[str] = []
        for entry in synth_entries:
            result = prom.query(entry["expr"])
            values = [float(s["value"][1]) for s in result]
            if entry["expect"] == "data" and not any(math.isfinite(v) for v in values):
                failures.append(f"{entry['id']}: {entry['expr']} -> {result}")
            checked.append(entry["id"])
        for rule in [r for g in prom.api("rules")["groups"] for r in g["rules"]]:
            assert rule["health"] == "ok", rule
            assert rule["state"] != "firing", rule
    assert not failures, "expressions without data:\n" + "\n".join(failures)
    record_property("prometheus_synth_expressions_with_data", checked)

    problems: list[str] = []
    _check_declared_metrics_updated(
        "synth",
        _declared(SynthMetrics.create().registry),
        synth,
        problems,
        stay_initial=SYNTH_STAY_INITIAL,
    )
    assert not problems, "\n".join(problems)
    assert _value(synth, "gptfl_synth_images_generated_total") == 40
    assert _value(synth, "gptfl_synth_pretrain_epoch") == 2
    assert _value(synth, "gptfl_synth_pretrain_epoch_accuracy") == pytest.approx(
        outcome.final_val_accuracy
    )
    assert _value(synth, "gptfl_synth_images_per_second") > 0
