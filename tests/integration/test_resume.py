"""A coordinator killed with SIGKILL mid-job resumes from its last checkpoint."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.local_cluster import LocalCluster
from tests.integration.conftest import start_and_submit, wait_for_job_end
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_sigkill_mid_job_resumes_without_counting_a_round_twice(tmp_path: Path) -> None:
    spec = digits_job_spec(name="resume", rounds=6, silos=2, strategy="fedadam", seed=1)
    plans = digits_silos(count=2, alpha=1.0, seed=1)
    fixed = {
        "fleet_address": f"127.0.0.1:{_free_port()}",
        "admin_address": f"127.0.0.1:{_free_port()}",
    }
    cluster = LocalCluster(
        tmp_path / "work", silos=plans, runs_dir=tmp_path / "runs", coordinator_extra=fixed
    )
    try:
        job_id = start_and_submit(cluster, spec)
        with cluster.admin() as admin:
            wait_until(
                lambda: len(admin.status().rounds) >= 2,
                timeout_s=120,
                what="round 2 to end",
                detail=lambda: cluster.log_tail("coordinator"),
            )
        cluster.kill("coordinator")  # no chance to clean up
        cluster.start_coordinator()
        with cluster.admin() as admin:
            status = admin.status(wait_for_ready=True)
            assert status.job_id == job_id
            status = wait_for_job_end(
                admin, timeout_s=180, interval_s=0.3, detail=lambda: cluster.log_tail("coordinator")
            )
        assert status.phase == "finished", status.message
        exits = cluster.wait_silos(timeout_s=60)
    finally:
        cluster.stop()
    assert exits == {p.silo_id: 0 for p in plans}
    summary = json.loads((tmp_path / "runs" / job_id / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4, 5, 6]
    assert "resuming job" in cluster.log_tail("coordinator", 400)
    # Each silo is counted once per round, the interrupted round included.
    assert all(s["rounds_participated"] == 6 for s in summary["silos"].values()), summary["silos"]
