"""``gptfl demo``'s plan: with ``--dp`` every silo gets the stated budget in both jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gptfl.cli import demo_cmd
from gptfl.cli.comparison_run import ComparisonPlan
from gptfl.cli.main import main
from gptfl.comparison import THRESHOLDS
from gptfl.job_spec import JobSpec
from gptfl.local_cluster import LocalCluster
from silo_agent.config import PrivacyConfig


def _planned(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[LocalCluster, ComparisonPlan]:
    seen: dict[str, Any] = {}

    def capture(cluster: LocalCluster, plan: ComparisonPlan, *, keep_work: bool) -> int:
        seen.update(cluster=cluster, plan=plan)
        return 0  # nothing is started

    monkeypatch.setattr(demo_cmd, "run_comparison", capture)
    assert main(["demo", *argv]) == 0
    return seen["cluster"], seen["plan"]


def test_dp_gives_every_silo_the_budget_in_both_jobs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cluster, plan = _planned(
        monkeypatch, "--dp", "--epsilon", "4", "--delta", "1e-6", "--runs-dir", str(tmp_path)
    )
    budget = {
        "target_epsilon": 4.0,
        "target_delta": 1e-6,
        "max_grad_norm": 1.0,
        "accountant": "rdp",
    }
    assert plan.privacy == budget
    assert len(cluster.silos) == 10
    for silo in cluster.silos:
        assert silo.extra["privacy"] == budget
        PrivacyConfig.model_validate(silo.extra["privacy"])  # a valid silo config section
        assert silo.data["train"]["partition"]["alpha"] == demo_cmd.DP_ALPHA
    assert plan.gptfl is not None and plan.thresholds == demo_cmd.DP_THRESHOLDS
    for spec in (plan.gptfl, plan.scratch):
        job = JobSpec.model_validate(dict(spec))
        assert job.local.learning_rate == demo_cmd.DP_LOCAL["learning_rate"]
        assert job.name.endswith("-dp") and job.rounds == 30
    assert plan.settings["alpha"] == demo_cmd.DP_ALPHA


def test_without_dp_the_demo_is_unchanged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cluster, plan = _planned(monkeypatch, "--runs-dir", str(tmp_path))
    assert plan.privacy is None and plan.thresholds == THRESHOLDS
    assert all("privacy" not in silo.extra for silo in cluster.silos)
    assert cluster.silos[0].data["train"]["partition"]["alpha"] == demo_cmd.DEFAULT_ALPHA
    assert dict(plan.scratch)["local"] == demo_cmd.DEMO_LOCAL
