"""DP-SGD silos in real jobs: a coordinator and silo agents as processes over mutual TLS.

One federation, two jobs:

1. Three DP silos, three rounds. ``silo-2`` is killed after round 1 and started again: it
   must continue its ledger. ``silo-3`` is killed after round 2, its ledger deleted, and
   started again: the epsilon it then reports goes down, and the coordinator flags it.
   Every silo's reported epsilon must equal a fresh Opacus accountant, stepped in this test
   through the steps that silo took, at the noise Opacus computes for the whole job; the
   coordinator's ``gptfl_silo_privacy_epsilon`` gauge must say the same.
2. ``require_dp``: a fourth silo without DP joins; each of its updates is refused, and the
   rounds close on the three DP silos' updates.
"""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import pytest
import yaml
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from prometheus_client.parser import text_string_to_metric_families

from gptfl.admin_client import AdminClient, StatusView
from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.local_cluster import LocalCluster, SiloPlan
from gptfl.models import ModelSpec
from silo_agent.config import DataConfig
from silo_agent.local_data import LocalData
from silo_agent.privacy_ledger import LEDGER_FILE
from tests.integration.conftest import wait_for_job_end
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

PRIVACY = {"target_epsilon": 8.0, "target_delta": 1e-5, "max_grad_norm": 1.0}
ROUNDS = 3
#: long enough a round that a silo killed just after the round before is still training
EPOCHS = 12
BATCH = 32
SPEC = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)
JOB_TIMEOUT_S = 600  # bounds a broken run only


def _plans() -> list[SiloPlan]:
    plans = digits_silos(count=4, alpha=1.0, seed=2, stay_after_job=True)
    dp = [SiloPlan(p.silo_id, p.data, {**p.extra, "privacy": PRIVACY}) for p in plans[:3]]
    return [*dp, plans[3]]  # silo-4 trains without DP


def _steps_per_round(plan: SiloPlan) -> tuple[int, float]:
    """The silo's DP-SGD steps per round and sampling rate, from the data it trains on."""
    train = LocalData(DataConfig.model_validate(dict(plan.data))).for_model(SPEC).train
    per_epoch = math.ceil(len(train) / BATCH)
    return EPOCHS * per_epoch, 1 / per_epoch


def _replayed(plan: SiloPlan, *, trained_rounds: int) -> tuple[float, float]:
    """Opacus's noise for the whole job and a fresh accountant's epsilon after the silo's
    steps, stepped one at a time as DPOptimizer does."""
    steps, rate = _steps_per_round(plan)
    noise = get_noise_multiplier(
        target_epsilon=PRIVACY["target_epsilon"],
        target_delta=PRIVACY["target_delta"],
        sample_rate=rate,
        steps=ROUNDS * steps,
        accountant="rdp",
    )
    accountant = create_accountant(mechanism="rdp")
    for _ in range(trained_rounds * steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return noise, float(accountant.get_epsilon(delta=PRIVACY["target_delta"]))


def _gauge(port: int, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels.get("silo", sample.labels.get("reason", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def _restart_after_round(
    cluster: LocalCluster, admin: AdminClient, silo: str, round_: int, *, delete: bool
) -> None:
    """Kills ``silo`` once round ``round_`` has closed (it is then idle or training the
    next round, whose spend is not in its ledger yet) and starts it again."""
    wait_until(
        lambda: len(admin.status().rounds) >= round_,
        timeout_s=JOB_TIMEOUT_S,
        interval_s=0.1,
        what=f"round {round_} to close",
        detail=lambda: cluster.log_tail("coordinator"),
    )
    cluster.kill(silo)
    ledger = cluster.work_dir / "silos" / silo / LEDGER_FILE
    assert json.loads(ledger.read_text())["ledger"]["jobs"][0]["rounds"] == list(
        range(1, round_ + 1)
    )
    if delete:
        ledger.unlink()
    cluster.start_silos([silo])


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus, in this process's replays
def test_dp_silos_keep_their_ledgers_and_the_coordinator_holds_them_to_it(
    tmp_path: Path,
) -> None:
    plans = _plans()
    dp_plans = plans[:3]
    spec = digits_job_spec(name="dp-sgd", rounds=ROUNDS, silos=3, strategy="fedavg", seed=2)
    spec["local"].update(epochs=EPOCHS, batch_size=BATCH)
    spec["round_deadline_s"] = 300
    cluster = LocalCluster(tmp_path / "work", silos=plans, runs_dir=tmp_path / "runs", metrics=True)
    try:
        cluster.provision()
        endpoints = cluster.start_coordinator()
        cluster.start_silos([p.silo_id for p in dp_plans])
        with cluster.admin() as admin:
            admin.status(wait_for_ready=True)
            job_id = admin.submit(yaml.safe_dump(spec))
            _restart_after_round(cluster, admin, "silo-2", 1, delete=False)
            _restart_after_round(cluster, admin, "silo-3", 2, delete=True)
            status = wait_for_job_end(
                admin, timeout_s=JOB_TIMEOUT_S, detail=lambda: cluster.log_tail("coordinator")
            )
            assert status.phase == "finished", status.message
            gauges = _gauge(endpoints.metrics_port or 0, "gptfl_silo_privacy_epsilon")
            rejected_before = _gauge(endpoints.metrics_port or 0, "gptfl_updates_rejected_total")
            _check_first_job(cluster, status, job_id, dp_plans, gauges, tmp_path / "runs")

            # 2. require_dp: a silo without DP joins; every one of its updates is refused
            cluster.start_silos(["silo-4"])
            wait_until(
                lambda: sum(s.connected for s in admin.silos()) == 4,
                timeout_s=120,
                what="silo-4 to connect",
            )
            strict = digits_job_spec(
                name="dp-required", rounds=2, silos=3, strategy="fedavg", seed=3
            )
            strict["require_dp"] = {"max_epsilon": 8.0, "max_delta": 1e-5}
            # A refused update leaves its task open (the silo may come back with DP), until
            # the deadline or max_task_rejections refusals.
            strict["round_deadline_s"] = 45
            second = admin.submit(yaml.safe_dump(strict))
            status = wait_for_job_end(
                admin, timeout_s=JOB_TIMEOUT_S, detail=lambda: cluster.log_tail("coordinator")
            )
            assert status.phase == "finished", status.message
            rejected = _gauge(endpoints.metrics_port or 0, "gptfl_updates_rejected_total")
    finally:
        cluster.stop()
    summary = json.loads((tmp_path / "runs" / second / "summary.json").read_text())
    plain = summary["silos"]["silo-4"]
    # refused in both rounds (once more when it registered its data counts after its first
    # task, which hands the open task back to it)
    assert plain["updates_rejected"] >= 2 and plain["rounds_participated"] == 0
    assert plain["privacy"] is None
    assert rejected["privacy"] - rejected_before["privacy"] == plain["updates_rejected"]
    for silo in ("silo-1", "silo-2", "silo-3"):
        record = summary["silos"][silo]
        assert record["rounds_participated"] == 2 and record["updates_rejected"] == 0
        assert 0 < record["privacy"]["epsilon"] <= 8.0
    assert [r["updates_accepted"] for r in summary["rounds"]] == [3, 3]


def _check_first_job(
    cluster: LocalCluster,
    status: StatusView,
    job_id: str,
    plans: list[SiloPlan],
    gauges: dict[str, float],
    runs: Path,
) -> None:
    summary = json.loads((runs / job_id / "summary.json").read_text())
    assert [r["updates_accepted"] for r in summary["rounds"]] == [3, 3, 3]
    reported = {silo: s["privacy"]["epsilon"] for silo, s in summary["silos"].items()}
    by_id = {p.silo_id: p for p in plans}

    # silo-1 ran through; silo-2 was restarted and continued its ledger: three rounds each
    for silo in ("silo-1", "silo-2"):
        noise, expected = _replayed(by_id[silo], trained_rounds=3)
        assert reported[silo] == expected, silo
        assert reported[silo] <= PRIVACY["target_epsilon"]
        assert "privacy_flag" not in summary["silos"][silo]
    steps, rate = _steps_per_round(by_id["silo-2"])
    ledger = json.loads((cluster.work_dir / "silos" / "silo-2" / LEDGER_FILE).read_text())
    (job,) = ledger["ledger"]["jobs"]
    noise, _ = _replayed(by_id["silo-2"], trained_rounds=3)
    assert job["job_id"] == job_id and job["rounds"] == [1, 2, 3]
    assert job["history"] == [[noise, rate, 3 * steps]]  # one job, one noise, all its steps
    assert "1 job(s)" in cluster.log_tail("silo-2", 400)  # the restart read the ledger

    # silo-3 lost its ledger after round 2: one round is all it knows of, and it says so
    _, after_reset = _replayed(by_id["silo-3"], trained_rounds=1)
    _, before_reset = _replayed(by_id["silo-3"], trained_rounds=2)
    assert reported["silo-3"] == after_reset < before_reset
    flag = summary["silos"]["silo-3"]["privacy_flag"]
    assert flag.startswith(f"reported epsilon fell from {before_reset:.4g} to {after_reset:.4g}")
    shown = {p.silo_id: p for p in status.privacy}
    assert shown["silo-3"].flag == flag and not shown["silo-1"].flag
    assert shown["silo-1"].epsilon == reported["silo-1"]

    # the coordinator's gauge per silo is the spend of its last accepted update
    assert {silo: gauges[silo] for silo in reported} == reported
