"""``gptfl federate`` end to end: a user's own RGB .npz split by a site column over two silos,
GPT-FL (text-to-image synthetic data from the label names) against FL from scratch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest

from gptfl.data import DataSource, load_source

pytestmark = pytest.mark.slow

LABELS = "red apple,green leaf,blue sky"


def _user_npz(path: Path) -> Path:
    """90 RGB 32x32 images (N, H, W, C), label = the brightest channel; two sites."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=90)
    x = rng.integers(0, 90, size=(90, 32, 32, 3))
    x[np.arange(90), :, :, y] += 150
    site = np.where(np.arange(90) < 50, "north", "south")
    np.savez(path, x=x.astype(np.uint8), y=y, site=site)
    return path


def test_federate_compares_gptfl_with_scratch_on_a_users_npz(
    tmp_path: Path, tiny_text_to_image_dir: Path
) -> None:
    data = _user_npz(tmp_path / "mine.npz")
    runs = tmp_path / "runs"
    args = ["--data", str(data), "--labels", LABELS, "--silos", "2", "--partition", "column:site"]
    args += ["--rounds", "2", "--generator", str(tiny_text_to_image_dir), "--steps", "2"]
    args += ["--images-per-label", "4", "--pretrain-epochs", "1", "--runs-dir", str(runs)]
    done = subprocess.run(
        [sys.executable, "-m", "gptfl.cli.main", "federate", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "3x32x32 inputs, resnet20; 2 silos (column:site)" in out
    assert "all 4 processes stopped cleanly" in out

    (comparison_file,) = runs.glob("*/comparison.json")
    comparison = json.loads(comparison_file.read_text())
    assert len(comparison["gptfl"]) == len(comparison["scratch"]) == 2
    assert comparison["settings"]["partition"] == "column:site"
    gptfl = json.loads((runs / comparison["gptfl_job"] / "summary.json").read_text())
    scratch = json.loads((runs / comparison["scratch_job"] / "summary.json").read_text())
    init = gptfl["initialisation"]
    assert init["kind"] == "pretrain" and init["generator_id"] == "tiny-sd"
    assert init["counts"] == {"red apple": 4, "green leaf": 4, "blue sky": 4}
    assert scratch["initialisation"]["kind"] == "random"

    # Each silo trained on exactly its site's share of the train split (2 rounds each), and
    # the coordinator tested on the held-out 20%.
    adapter: pydantic.TypeAdapter[DataSource] = pydantic.TypeAdapter(DataSource)

    def count(**selection: object) -> int:
        source = adapter.validate_python({"kind": "npz", "path": str(data), **selection})
        return len(load_source(source, in_channels=3, image_size=32))

    column = {"scheme": "column", "column": "site", "count": 2}
    parts = [count(split="train", partition={**column, "index": i}) for i in range(2)]
    for summary in (gptfl, scratch):
        examples = {silo: s["examples"] for silo, s in summary["silos"].items()}
        assert examples == {"silo-1": 2 * parts[0], "silo-2": 2 * parts[1]}
        assert summary["initialisation"]["evaluation"]["examples"] == count(split="test") == 18
