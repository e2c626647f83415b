"""The silo's data is checked when the agent starts; its images are read at the first task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gptfl.errors import ConfigError
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
