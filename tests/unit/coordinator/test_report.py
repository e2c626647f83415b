"""The end-of-job export: summary.json, report.md, accuracy.png and the final model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.job_state import JobState, Phase, RoundRecord, SiloSummary
from coordinator.report import export_job
from coordinator.tasks import ModelVersion
from gptfl.weights import build_manifest
from gptfl.weights_io import load_weights

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(r: int, **metrics: float | None) -> RoundRecord:
    return RoundRecord(
        round=r,
        silos_selected=4,
        updates_accepted=3,
        updates_rejected=0,
        examples=1000,
        seconds=2.0 + r,
        slowest_train_seconds=1.5,
        **metrics,  # type: ignore[arg-type]
    )


def _state(rounds: list[RoundRecord]) -> JobState:
    return JobState(
        job_id="job-7",
        spec={
            "name": "digits",
            "rounds": 3,
            "model": {"arch": "cnn-small", "num_classes": 10},
            "strategy": {"name": "fedavg"},
        },
        phase=Phase.FINISHED,
        message="finished 3 rounds",
        round=len(rounds),
        rounds=rounds,
        silos={"silo-b": SiloSummary(3, 600, 0), "silo-a": SiloSummary(2, 400, 1)},
        initialisation={"kind": "random", "seed": 0},
        created_unix=1000.0,
        finished_unix=1010.0,
    )


def _strict_json(path: Path) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture()
def rounds() -> list[RoundRecord]:
    return [
        _record(1, test_accuracy=0.5, test_loss=1.25, train_loss=1.5, federated_accuracy=0.4),
        _record(2, test_accuracy=math.nan, test_loss=None, train_loss=math.nan),
        _record(3, test_accuracy=0.875, test_loss=0.5, train_loss=0.75, federated_accuracy=0.8),
    ]


def test_summary_rounds_hold_the_documented_fields(
    tmp_path: Path, rounds: list[RoundRecord]
) -> None:
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    summary = export_job(_state(rounds), ModelVersion.of(weights), tmp_path / "out")
    on_disk = _strict_json(tmp_path / "out" / "summary.json")
    assert on_disk == summary
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2, 3]
    for entry in on_disk["rounds"]:
        assert {"round", "test_accuracy", "test_loss", "seconds"} <= set(entry)
    assert on_disk["rounds"][0]["test_accuracy"] == 0.5
    assert on_disk["rounds"][0]["test_loss"] == 1.25
    assert on_disk["rounds"][2]["seconds"] == 5.0
    assert on_disk["status"] == "finished"
    assert on_disk["rounds_completed"] == 3
    assert on_disk["rounds_planned"] == 3
    assert on_disk["seconds"] == 10.0
    assert on_disk["final"]["test_accuracy"] == 0.875
    assert on_disk["model"]["arch"] == "cnn-small"
    assert on_disk["model"]["blake3"] == build_manifest(weights).digest
    assert list(on_disk["silos"]) == ["silo-a", "silo-b"]
    assert on_disk["silos"]["silo-a"]["updates_rejected"] == 1


def test_nan_and_missing_metrics_become_null(tmp_path: Path, rounds: list[RoundRecord]) -> None:
    export_job(_state(rounds), None, tmp_path)
    second = _strict_json(tmp_path / "summary.json")["rounds"][1]
    assert second["test_accuracy"] is None
    assert second["test_loss"] is None
    assert second["train_loss"] is None
    assert second["federated_accuracy"] is None


def test_report_has_the_per_round_table(tmp_path: Path, rounds: list[RoundRecord]) -> None:
    export_job(_state(rounds), None, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Job job-7")
    assert "| round | test accuracy | test loss |" in report
    table = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 3
    assert table[0].startswith("| 1 | 50.00% | 1.2500 | 40.00% | 1.5000 | 3/4 | 3.00 |")
    assert table[1].startswith("| 2 | - | - | - | - |")
    assert table[2].startswith("| 3 | 87.50% | 0.5000 |")
    assert "![accuracy per round](accuracy.png)" in report
    assert "| silo-a | 2 | 400 |" in report


def test_accuracy_plot_is_a_png(tmp_path: Path, rounds: list[RoundRecord]) -> None:
    export_job(_state(rounds), None, tmp_path)
    data = (tmp_path / "accuracy.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_without_accuracy_there_is_no_plot(tmp_path: Path) -> None:
    state = _state([_record(1, train_loss=0.5), _record(2, train_loss=0.4)])
    export_job(state, None, tmp_path)
    assert not (tmp_path / "accuracy.png").exists()
    assert "accuracy.png" not in (tmp_path / "report.md").read_text()
    assert [r["test_accuracy"] for r in _strict_json(tmp_path / "summary.json")["rounds"]] == [
        None,
        None,
    ]


def test_final_model_is_exported_with_metadata(tmp_path: Path, rounds: list[RoundRecord]) -> None:
    weights = {"w": torch.randn(3, 3), "b": torch.zeros(3, dtype=torch.float16)}
    export_job(_state(rounds), ModelVersion.of(weights), tmp_path)
    loaded, metadata = load_weights(tmp_path / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor)
    assert metadata["job_id"] == "job-7"
    assert metadata["rounds"] == 3
    assert metadata["final_metrics"]["test_accuracy"] == 0.875


def test_a_failed_job_without_rounds_or_model_still_exports(tmp_path: Path) -> None:
    state = _state([])
    state.phase = Phase.FAILED
    state.message = "round 1: 0 of 2 updates arrived"
    summary = export_job(state, None, tmp_path)
    assert summary["status"] == "failed"
    assert summary["rounds"] == []
    assert summary["model"]["blake3"] is None
    assert not (tmp_path / "model.safetensors").exists()
    assert "**failed** round 1: 0 of 2 updates arrived" in (tmp_path / "report.md").read_text()
