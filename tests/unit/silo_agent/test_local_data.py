"""The silo's data is checked when the agent starts; its images are read at the first task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gptfl.errors import ConfigError
from gptfl.models import ModelSpec
from silo_agent.config import DataConfig
from silo_agent.local_data import LocalData


def _data(**sections: object) -> DataConfig:
    return DataConfig.model_validate(sections)


def test_a_missing_image_folder_is_named(tmp_path: Path) -> None:
    npz = tmp_path / "train.npz"
    np.savez(npz, x=np.zeros((2, 8, 8), np.float32), y=np.zeros(2, np.int64))
    config = _data(
        train={"kind": "npz", "path": npz},
        eval={"kind": "imagefolder", "path": tmp_path / "nope"},
    )
    with pytest.raises(ConfigError) as info:
        LocalData(config)
    assert (
        str(info.value)
        == f"data.eval: image folder {tmp_path / 'nope'} does not exist or is not a directory"
    )


def test_an_npz_without_labels_is_named(tmp_path: Path) -> None:
    npz = tmp_path / "train.npz"
    np.savez(npz, x=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ConfigError) as info:
        LocalData(_data(train={"kind": "npz", "path": npz}))
    assert str(info.value).startswith("data.train: npz file ")
    assert "lacks array(s) y" in str(info.value)


def test_good_data_is_not_read_yet(tmp_path: Path) -> None:
    npz = tmp_path / "train.npz"
    np.savez(npz, x=np.zeros((2, 8, 8), np.float32), y=np.zeros(2, np.int64))
    assert LocalData(_data(train={"kind": "npz", "path": npz})).counts() == (0, 0)


def _image_folder(root: Path, counts: dict[str, int]) -> Path:
    from PIL import Image

    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((6, 6), 20 * i, np.uint8)).save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("eval_fraction", [0.0, 0.1, 0.3])
def test_the_training_count_is_known_before_any_image_is_read(
    tmp_path: Path, eval_fraction: float
) -> None:
    """A DP silo checks its delta against 1/n at start, before a task names the shape."""
    npz = tmp_path / "train.npz"
    np.savez(npz, x=np.zeros((37, 8, 8), np.float32), y=np.zeros(37, np.int64))
    folder = _image_folder(tmp_path / "images", {"a": 7, "b": 12})
    spec = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)
    for train in (
        {"kind": "npz", "path": npz},
        {"kind": "imagefolder", "path": folder},
        {"kind": "sklearn-digits", "partition": {"index": 1, "count": 3, "alpha": 0.5}},
    ):
        data = LocalData(_data(train=train, eval_fraction=eval_fraction))
        count = data.train_count()
        assert data.counts() == (0, 0)  # nothing loaded to count it
        assert count == len(data.for_model(spec).train) > 0, train
    separate = LocalData(
        _data(train={"kind": "npz", "path": npz}, eval={"kind": "npz", "path": npz})
    )
    assert separate.train_count() == 37  # a separate evaluation set takes nothing away


@pytest.mark.parametrize("case", ["npz-held-out", "npz-all", "folder-and-npz", "digits"])
def test_the_registered_counts_are_the_counts_a_task_trains_on(tmp_path: Path, case: str) -> None:
    npz = tmp_path / "data.npz"
    np.savez(npz, x=np.zeros((11, 8, 8), np.float32), y=np.zeros(11, np.int64))
    folder = _image_folder(tmp_path / "images", {"cat": 3, "dog": 4})
    sections: dict[str, dict[str, object]] = {
        "npz-held-out": {"train": {"kind": "npz", "path": npz}, "eval_fraction": 0.25},
        "npz-all": {"train": {"kind": "npz", "path": npz}, "eval_fraction": 0.0},
        "folder-and-npz": {
            "train": {"kind": "imagefolder", "path": folder},
            "eval": {"kind": "npz", "path": npz},
        },
        "digits": {"train": {"kind": "sklearn-digits", "partition": {"index": 1, "count": 3}}},
    }
    data = LocalData(_data(**sections[case]))
    registered = data.registered_counts  # counted before any image is read
    assert registered[0] > 0
    data.for_model(ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8))
    assert data.counts() == registered
