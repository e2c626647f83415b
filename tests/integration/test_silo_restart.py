"""A silo agent killed with SIGKILL mid-task and started again gets its task back.

Without that, the round waits for its deadline and, when the silo is needed for the quorum,
the job fails although the silo came back within seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.local_cluster import LocalCluster
from tests.integration.conftest import start_and_submit

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

DEADLINE_S = 90  # the round's; the restarted silo must not need it


def test_a_silo_killed_mid_task_gets_the_task_again_after_a_restart(tmp_path: Path) -> None:
    spec = digits_job_spec(name="restart", rounds=1, silos=2, strategy="fedavg", seed=1)
    spec["round_deadline_s"] = DEADLINE_S
    spec["local"]["epochs"] = 15  # long enough to be killed while training
    plans = digits_silos(count=2, alpha=1.0, seed=1)
    victim = plans[0].silo_id
    cluster = LocalCluster(tmp_path / "work", silos=plans, runs_dir=tmp_path / "runs")
    try:
        job_id = start_and_submit(cluster, spec)
        with cluster.admin() as admin:
            deadline = time.monotonic() + 120
            while not any(s.silo_id == victim and s.state == "training" for s in admin.silos()):
                assert time.monotonic() < deadline, cluster.log_tail("coordinator")
                time.sleep(0.05)
            cluster.kill(victim)  # mid-training: its task stays dispatched
            restarted = time.monotonic()
            cluster.start_silos([victim])
            status = admin.status()
            while not status.ended:
                assert time.monotonic() < restarted + DEADLINE_S, cluster.log_tail("coordinator")
                time.sleep(0.2)
                status = admin.status()
            waited = time.monotonic() - restarted
        assert status.phase == "finished", status.message
    finally:
        cluster.stop()
    summary = json.loads((tmp_path / "runs" / job_id / "summary.json").read_text())
    assert summary["rounds"][0]["updates_accepted"] == 2, summary["rounds"]
    # the round ended because both updates arrived, not at its deadline
    assert waited < DEADLINE_S - 10, waited
    assert f"silo {victim} reconnected without its 1 open task(s)" in cluster.log_tail(
        "coordinator", 400
    )
