"""The GPT-FL vs scratch comparison written by ``gptfl demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptfl.comparison import rounds_to_reach, write_comparison

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(job_id: str, curve: list[float | None], init: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "status": "finished",
        "initialisation": init,
        "rounds": [{"round": i, "test_accuracy": a} for i, a in enumerate(curve, start=1)],
    }


def test_rounds_to_reach_is_the_first_round_at_or_above_the_level() -> None:
    assert rounds_to_reach([0.5, 0.9, 0.89, 0.96], 0.9) == 2
    assert rounds_to_reach([0.5, None, 0.95], 0.95) == 3
    assert rounds_to_reach([0.5, 0.94], 0.95) is None


def test_write_comparison(tmp_path: Path) -> None:
    gptfl = _summary(
        "digits-gptfl-1",
        [0.89, 0.93, 0.95, 0.97],
        {
            "kind": "pretrain",
            "generator_id": "digits-generator",
            "generator_hash": "h" * 64,
            "dataset_id": "d" * 64,
            "images": 2000,
            "evaluation": {"test_accuracy": 0.869, "test_loss": 0.5, "examples": 359},
        },
    )
    scratch = _summary(
        "digits-scratch-1",
        [0.29, 0.5, 0.91, None],
        {"kind": "random", "seed": 0, "evaluation": {"test_accuracy": 0.114}},
    )
    comparison = write_comparison(tmp_path, gptfl, scratch, settings={"silos": 10})
    on_disk = json.loads((tmp_path / "comparison.json").read_text())
    assert on_disk == comparison
    assert on_disk["gptfl"] == [0.89, 0.93, 0.95, 0.97]
    assert on_disk["scratch"] == [0.29, 0.5, 0.91, None]
    assert on_disk["synthetic_only_accuracy"] == 0.869
    assert on_disk["scratch_initial_accuracy"] == 0.114
    assert on_disk["rounds_to"] == {
        "gptfl": {"0.90": 2, "0.95": 3},
        "scratch": {"0.90": 3, "0.95": None},
    }
    assert on_disk["initialisation"]["generator_hash"] == "h" * 64
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    report = (tmp_path / "comparison.md").read_text()
    assert "![test accuracy per round](comparison.png)" in report
    assert "| GPT-FL | 89.00% | 2 | 3 |" in report
    assert "| scratch | 29.00% | 3 | not within 4 |" in report
    assert "| 0 | 86.90% | 11.40% | |" in report
    assert "| 3 | 95.00% | 91.00% | +4.00 |" in report


def test_a_dp_comparison_states_the_budget_and_each_silos_epsilon(tmp_path: Path) -> None:
    def dp_summary(job_id: str, curve: list[float | None], spent: dict[str, float]) -> Any:
        summary = _summary(job_id, curve, {"kind": "random", "evaluation": {}})
        summary["silos"] = {
            silo: {"privacy": {"epsilon": eps, "delta": 1e-5, "accountant": "rdp"}}
            for silo, eps in spent.items()
        }
        summary["silos"]["silo-3"] = {"privacy": None}  # a silo without DP is left out
        return summary

    gptfl = dp_summary("g", [0.81, 0.86, 0.91], {"silo-1": 7.99, "silo-2": 7.98})
    scratch = dp_summary("s", [0.2, 0.5, 0.79], {"silo-1": 7.97, "silo-2": 7.99})
    by_round = {
        "gptfl": [{"silo-1": 4.1, "silo-2": 4.0}, {"silo-1": 6.2}, {"silo-1": 7.99}],
        "scratch": [{"silo-1": 4.0}, {"silo-1": 6.1}, {"silo-1": 7.97, "silo-2": 7.99}],
    }
    budget = {"target_epsilon": 8.0, "target_delta": 1e-5, "max_grad_norm": 1.0}
    comparison = write_comparison(
        tmp_path,
        gptfl,
        scratch,
        settings={"silos": 2},
        thresholds=(0.80, 0.90),
        privacy={"budget": budget, "epsilon_by_round": by_round},
    )
    assert comparison["thresholds"] == [0.80, 0.90]
    assert comparison["rounds_to"] == {
        "gptfl": {"0.80": 1, "0.90": 3},
        "scratch": {"0.80": None, "0.90": None},
    }
    assert comparison["privacy"]["final"] == {
        "gptfl": {"silo-1": 7.99, "silo-2": 7.98},
        "scratch": {"silo-1": 7.97, "silo-2": 7.99},
    }
    report = (tmp_path / "comparison.md").read_text()
    assert report.startswith("# GPT-FL vs FL from scratch, both with DP-SGD at every silo\n")
    assert "stays within **8.0** at delta **1e-05** in each job" in report
    assert "the most any silo spent: GPT-FL 7.99, scratch 7.99" in report
    assert "| | round 1 | rounds to 80% | rounds to 90% |" in report
    assert "| scratch | 20.00% | not within 3 | not within 3 |" in report
    assert "| 2 | 86.00% | 50.00% | +36.00 | 6.2 | 6.1 |" in report
    assert "| difference (points) | largest silo epsilon, GPT-FL | largest silo epsilon, " in report
    assert "| silo-2 | 7.98 | 7.99 |" in report and "silo-3" not in report
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG_MAGIC
