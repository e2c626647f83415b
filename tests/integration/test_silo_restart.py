"""A silo agent killed with SIGKILL mid-task and started again gets its task back.

Without that, the round waits for its deadline and, when the silo is needed for the quorum,
the job fails although the silo came back within seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.local_cluster import LocalCluster
from tests.integration.conftest import start_and_submit, wait_for_job_end
from tests.waiting import wait_until

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
            wait_until(
                lambda: any(s.silo_id == victim and s.state == "training" for s in admin.silos()),
                timeout_s=120,
                what=f"{victim} to train",
                detail=lambda: cluster.log_tail("coordinator"),
            )
            cluster.kill(victim)  # mid-training: its task stays dispatched
            cluster.start_silos([victim])
            # bounds a broken run only: what shows the round did not wait for its deadline is
            # the count of accepted updates below (a task expired at the deadline is not one)
            status = wait_for_job_end(
                admin, timeout_s=2 * DEADLINE_S, detail=lambda: cluster.log_tail("coordinator")
            )
        assert status.phase == "finished", status.message
    finally:
        cluster.stop()
    summary = json.loads((tmp_path / "runs" / job_id / "summary.json").read_text())
    # Both updates were accepted, so the round closed on them, not at its deadline: by then
    # the victim's task would have expired and its update could not have been counted.
    assert summary["rounds"][0]["updates_accepted"] == 2, summary["rounds"]
    assert f"silo {victim} reconnected without its 1 open task(s)" in cluster.log_tail(
        "coordinator", 400
    )
