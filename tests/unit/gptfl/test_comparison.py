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
