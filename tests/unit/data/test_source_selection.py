"""Selecting examples of an npz or image-folder source: train/test splits and partitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
from PIL import Image

from gptfl.data import DataSource, load_source
from gptfl.data.partition import iid_partition
from gptfl.data.sources import check_source
from gptfl.errors import ValidationError

ADAPTER: pydantic.TypeAdapter[DataSource] = pydantic.TypeAdapter(DataSource)
N = 60


def _npz(tmp_path: Path) -> Path:
    """60 RGB 8x8 images; pixel (0, 0) of red holds the example's index, so loaded examples
    can be told apart; 3 classes; a 'site' array with values 10, 20, 30."""
    x = np.zeros((N, 8, 8, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(N)
    y = np.arange(N) % 3
    site = np.repeat([30, 10, 20], N // 3)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y, site=site)
    return path


def _load(fields: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) of the loaded examples."""
    data = load_source(ADAPTER.validate_python(fields), in_channels=3, image_size=8)
    return np.rint(data.x[:, 0, 0, 0] * 255).astype(int), data.y


@pytest.mark.parametrize(
    "partition",
    [
        {"scheme": "iid"},
        {"scheme": "dirichlet", "alpha": 0.3},
        {"scheme": "column", "column": "site"},
    ],
)
@pytest.mark.parametrize("split", ["train", "all"])
def test_the_parts_of_a_split_are_disjoint_and_cover_it(
    tmp_path: Path, partition: dict[str, Any], split: str
) -> None:
    base = {"kind": "npz", "path": str(_npz(tmp_path)), "split": split, "split_seed": 4}
    whole, _ = _load(base)
    parts = [
        _load({**base, "partition": {"index": i, "count": 3, **partition}})[0] for i in range(3)
    ]
    assert sorted(np.concatenate(parts).tolist()) == sorted(whole.tolist())
    assert all(len(part) for part in parts)
    if partition["scheme"] == "column":  # part i holds the i-th smallest site value
        sites = np.repeat([30, 10, 20], N // 3)
        assert [set(sites[part].tolist()) for part in parts] == [{10}, {20}, {30}]
    if partition["scheme"] == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_train_and_test_splits_are_disjoint_and_seeded(tmp_path: Path) -> None:
    base = {"kind": "npz", "path": str(_npz(tmp_path)), "test_fraction": 0.25}
    train, _ = _load({**base, "split": "train"})
    test, labels = _load({**base, "split": "test"})
    assert len(test) == 15 and len(train) == 45
    assert sorted([*train, *test]) == list(range(N))
    assert np.array_equal(labels, test % 3)  # labels travel with their images
    other, _ = _load({**base, "split": "test", "split_seed": 1})
    assert sorted(other.tolist()) != sorted(test.tolist())
    everything, _ = _load(base)  # split: all by default, as before
    assert everything.tolist() == list(range(N))


def test_an_image_folder_reads_only_the_chosen_files(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (6, 6), 20 * i).save(root / name / f"{i}.png")
    (root / "dog" / "4.png").write_bytes(b"not a png")  # the 10th file listed (index 9)
    holder = next(i for i, part in enumerate(iid_partition(10, count=2, seed=0)) if 9 in part)

    def part(index: int) -> DataSource:
        fields = {"index": index, "count": 2, "scheme": "iid"}
        return ADAPTER.validate_python({"kind": "imagefolder", "path": root, "partition": fields})

    other = load_source(part(1 - holder), in_channels=1, image_size=6)  # never opens dog/4.png
    assert len(other) == 5
    with pytest.raises(ValidationError, match="dog/4.png"):
        load_source(part(holder), in_channels=1, image_size=6)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            {"kind": "npz", "path": "x", "split": "test", "partition": {"index": 0, "count": 2}},
            "partition applies to the train split only",
        ),
        (
            {
                "kind": "imagefolder",
                "path": "x",
                "partition": {"index": 0, "count": 2, "scheme": "column", "column": "site"},
            },
            "partition scheme 'column' reads an array of an npz source",
        ),
        (
            {
                "kind": "sklearn-digits",
                "partition": {"index": 0, "count": 2, "scheme": "column", "column": "site"},
            },
            "partition scheme 'column' reads an array of an npz source",
        ),
    ],
)
def test_selections_that_cannot_work_are_refused_by_the_config(
    fields: dict[str, Any], needle: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=needle):
        ADAPTER.validate_python(fields)


def test_a_missing_column_is_found_at_the_start(tmp_path: Path) -> None:
    source = ADAPTER.validate_python(
        {
            "kind": "npz",
            "path": str(_npz(tmp_path)),
            "partition": {"index": 0, "count": 3, "scheme": "column", "column": "scanner"},
        }
    )
    with pytest.raises(ValidationError, match=r"lacks array\(s\) scanner \(has: x, y, site\)"):
        check_source(source)


def test_a_column_of_the_wrong_length_or_count_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 8, 8)), y=np.zeros(4, np.int64), site=np.zeros(3))
    fields = {"kind": "npz", "path": str(path)}
    column = {"scheme": "column", "column": "site"}
    with pytest.raises(ValidationError, match=r"site: expected shape \(4,\), got \(3,\)"):
        _load({**fields, "partition": {"index": 0, "count": 1, **column}})
    np.savez(path, x=np.zeros((4, 8, 8)), y=np.zeros(4, np.int64), site=np.array([1, 1, 2, 3]))
    with pytest.raises(ValidationError, match="column 'site' has 3 distinct values"):
        _load({**fields, "partition": {"index": 0, "count": 2, **column}})
