"""The GPT-FL pretrain phase end to end: a real synth service, coordinator and silo agents as
separate processes over mutual TLS, on a short variant of the demo (few synthetic images, two
pretrain epochs, two silos, two rounds). One federation serves every test (silos stay up
between jobs), as ``gptfl demo`` does.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gptfl.admin_client import StatusView
from gptfl.cli.demo_cmd import digits_job_spec, digits_pretrain_section, digits_silos
from gptfl.local_cluster import LocalCluster
from gptfl.weights_io import load_weights
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

SILOS = 2
JOB_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    work = tmp_path_factory.mktemp("gptfl")
    plans = digits_silos(count=SILOS, alpha=0.5, seed=0, stay_after_job=True)
    cluster = LocalCluster(work / "work", silos=plans, runs_dir=work / "runs", synth=True)
    try:
        cluster.provision()
        cluster.start_synth()
        cluster.start_coordinator()
        cluster.start_silos()
        yield cluster
    finally:
        cluster.stop()


def _spec(name: str, **pretrain: Any) -> dict[str, Any]:
    spec = digits_job_spec(name=name, rounds=2, silos=SILOS, strategy="fedavg", seed=0)
    section = digits_pretrain_section(images_per_label=6, epochs=2)
    section.update(pretrain)
    return {**spec, "pretrain": section}


def _run(cluster: LocalCluster, spec: dict[str, Any]) -> tuple[StatusView, list[StatusView]]:
    """Submits ``spec`` and polls until the job ends; returns the end and every status seen."""
    seen: list[StatusView] = []
    with cluster.admin() as admin:
        admin.status(wait_for_ready=True)
        admin.submit(yaml.safe_dump(spec))

        def ended() -> StatusView | None:
            status = admin.status()
            seen.append(status)
            return status if status.ended else None

        final = wait_until(
            ended,
            timeout_s=JOB_TIMEOUT_S,
            what="the job to end",
            detail=lambda: cluster.log_tail("coordinator"),
        )
    return final, seen


def _summary(cluster: LocalCluster, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((cluster.runs_dir / job_id / "summary.json").read_text())
    return data


def test_generate_pretrain_then_federate(cluster: LocalCluster) -> None:
    end, seen = _run(cluster, _spec("gptfl-itest"))
    assert end.phase == "finished", (end.message, cluster.log_tail("coordinator"))

    # The status showed the phase before round 1; its progress lines (which a 50 ms poll
    # can miss, they pass quickly here) are all in the coordinator's log.
    pretrain_lines = [s.message for s in seen if s.phase == "pretrain"]
    assert pretrain_lines, [(s.phase, s.message) for s in seen]
    log_text = (cluster.logs_dir / "coordinator.log").read_text(errors="replace")
    assert re.search(r"generating synthetic images: 60/60 \(", log_text), log_text[-3000:]
    assert re.search(r"synthetic images: epoch 2/2, synthetic val acc", log_text), log_text[-3000:]

    summary = _summary(cluster, end.job_id)
    init = summary["initialisation"]
    assert init["kind"] == "pretrain"
    assert init["synth"] == cluster.synth_address
    assert len(init["generator_hash"]) == 64 and len(init["manifest_sha256"]) == 64
    assert len(init["dataset_id"]) == 64
    assert init["images"] == 60 and init["counts"] == dict.fromkeys(map(str, range(10)), 6)
    assert init["request"]["resize_mode"] == "ink-box" and init["request"]["seed"] == 0
    assert [e["epoch"] for e in init["pretrain"]["epochs"]] == [1, 2]
    # Round 0: the coordinator's own evaluation of the pretrained model (synthetic-only).
    round0 = init["evaluation"]["test_accuracy"]
    assert isinstance(round0, float) and 0.0 <= round0 <= 1.0
    assert [r["round"] for r in summary["rounds"]] == [1, 2]

    # The same provenance travels with the final model and into the report.
    _, metadata = load_weights(cluster.runs_dir / end.job_id / "model.safetensors")
    assert metadata["initialisation"]["dataset_id"] == init["dataset_id"]
    report = (cluster.runs_dir / end.job_id / "report.md").read_text()
    assert "synthetic-only accuracy" in report and init["generator_hash"] in report


def test_an_unknown_generator_fails_the_job_with_the_reason(cluster: LocalCluster) -> None:
    end, _ = _run(cluster, _spec("gptfl-bad", generator="no-such-generator"))
    assert end.phase == "failed"
    assert end.message.startswith("pretrain phase failed: Generate at "), end.message
    assert "no-such-generator" in end.message, end.message
    summary = _summary(cluster, end.job_id)
    assert summary["rounds"] == [] and summary["initialisation"] == {}


def test_on_failure_random_falls_back_and_says_so(cluster: LocalCluster) -> None:
    end, seen = _run(
        cluster, _spec("gptfl-fallback", generator="no-such-generator", on_failure="random")
    )
    assert end.phase == "finished", end.message
    # Every status line of the job says so (the phase's own line may pass between polls).
    rounds = [s.message for s in seen if s.message.startswith("round ")]
    assert rounds and all("(from a random initialisation: pretrain failed)" in m for m in rounds)
    assert "from a random initialisation: pretrain failed" in end.message
    init = _summary(cluster, end.job_id)["initialisation"]
    assert init["kind"] == "random" and "no-such-generator" in init["fallback"]["reason"]
    assert init["evaluation"]["test_accuracy"] is not None
    report = (cluster.runs_dir / end.job_id / "report.md").read_text()
    assert "on_failure: random" in report


def test_submit_refuses_a_bad_pretrain_section(cluster: LocalCluster) -> None:
    bad = _spec("gptfl-invalid")
    bad["pretrain"]["labels"] = ["0", "1"]
    with cluster.admin() as admin, pytest.raises(grpc.RpcError) as refused:
        admin.submit(yaml.safe_dump(bad))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert "pretrain.labels has 2 names but model.num_classes is 10" in (
        refused.value.details() or ""
    )


def test_the_short_demo_writes_the_comparison(tmp_path: Path) -> None:
    """``gptfl demo`` end to end on its short variant: both jobs and comparison.json.

    Synth service, coordinator and 2 silos: 4 processes, all stopped cleanly.
    """
    runs = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "gptfl.cli.main", "demo", "--silos", "2", "--rounds", "2"]
        + ["--images-per-label", "4", "--pretrain-epochs", "1", "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out,) = [p.parent for p in runs.glob("digits-gptfl-*/comparison.json")]
    comparison = json.loads((out / "comparison.json").read_text())
    assert len(comparison["gptfl"]) == len(comparison["scratch"]) == 2
    assert all(isinstance(a, float) for a in comparison["gptfl"] + comparison["scratch"])
    assert isinstance(comparison["synthetic_only_accuracy"], float)
    assert set(comparison["rounds_to"]) == {"gptfl", "scratch"}
    assert comparison["initialisation"]["kind"] == "pretrain"
    scratch = json.loads((runs / comparison["scratch_job"] / "summary.json").read_text())
    assert scratch["initialisation"]["kind"] == "random"
    assert [r["test_accuracy"] for r in scratch["rounds"]] == comparison["scratch"]
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rounds to 95%" in (out / "comparison.md").read_text()
    assert "all 4 processes stopped cleanly" in done.stdout
