"""Data sources, the ArrayDataset container and fitting images to a model's input shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest
from PIL import Image

from gptfl.data import (
    ArrayDataset,
    DataSource,
    ImageFolderSource,
    NpzSource,
    SklearnDigitsSource,
    fit_to_shape,
    load_source,
)
from gptfl.data.partition import PartitionSpec, split_fraction
from gptfl.errors import ConfigError, ValidationError

# --- ArrayDataset -------------------------------------------------------------------------


def _dataset(n: int = 6) -> ArrayDataset:
    x = np.random.default_rng(0).random((n, 1, 4, 4), dtype=np.float32)
    return ArrayDataset(x=x, y=np.arange(n, dtype=np.int64) % 3)


def test_dataset_subset_and_class_counts() -> None:
    data = _dataset()
    assert len(data) == 6
    part = data.subset(np.array([5, 0]))
    assert np.array_equal(part.y, [2, 0])
    assert np.array_equal(part.x[0], data.x[5])
    assert np.array_equal(data.class_counts(4), [2, 2, 2, 0])
    with pytest.raises(ValidationError, match="out of range"):
        data.class_counts(2)


@pytest.mark.parametrize(
    ("x", "y", "needle"),
    [
        (np.zeros((2, 4, 4), np.float32), np.zeros(2, np.int64), r"\(N, C, H, W\)"),
        (np.zeros((2, 1, 4, 4), np.float64), np.zeros(2, np.int64), "float32"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int32), "int64"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros(3, np.int64), "must match"),
        (np.zeros((1, 1, 4, 4), np.float32), np.array([-1]), ">= 0"),
    ],
)
def test_dataset_validates(x: np.ndarray, y: np.ndarray, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        ArrayDataset(x=x, y=y)


# --- fit_to_shape -------------------------------------------------------------------------


def test_stretch_resizes_and_keeps_range() -> None:
    x = np.random.default_rng(1).random((2, 1, 20, 10), dtype=np.float32)
    out = fit_to_shape(x, in_channels=1, image_size=8)
    assert out.shape == (2, 1, 8, 8) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_constant_image_stays_constant_when_shrinking_and_growing() -> None:
    x = np.full((1, 1, 28, 28), 0.25, np.float32)
    assert np.allclose(fit_to_shape(x, in_channels=1, image_size=8), 0.25, atol=1e-6)
    assert np.allclose(fit_to_shape(x, in_channels=1, image_size=32), 0.25, atol=1e-6)


def test_center_crop_keeps_the_middle() -> None:
    # A wide image: left and right thirds are 0, the central square is 1.
    x = np.zeros((1, 1, 10, 30), np.float32)
    x[..., 10:20] = 1.0
    out = fit_to_shape(x, in_channels=1, image_size=10, mode="center-crop")
    assert out.shape == (1, 1, 10, 10)
    assert np.allclose(out, 1.0)


def test_pad_adds_zero_borders() -> None:
    # A tall all-ones image padded to a square gets black left/right bands.
    x = np.ones((1, 1, 12, 4), np.float32)
    out = fit_to_shape(x, in_channels=1, image_size=12, mode="pad")
    assert out.shape == (1, 1, 12, 12)
    assert np.allclose(out[..., :4], 0.0) and np.allclose(out[..., 8:], 0.0)
    assert np.allclose(out[..., 4:8], 1.0)


def test_stretch_of_a_wide_image_differs_from_crop_and_pad() -> None:
    x = np.zeros((1, 1, 10, 30), np.float32)
    x[..., 10:20] = 1.0
    stretch = fit_to_shape(x, in_channels=1, image_size=10)
    assert 0.2 < stretch.mean() < 0.45  # the bright band is squeezed to a third


def test_gray_to_rgb_replicates_and_rgb_to_gray_uses_luma() -> None:
    gray = np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32)
    rgb = fit_to_shape(gray, in_channels=3, image_size=8)
    assert rgb.shape == (2, 3, 8, 8)
    assert np.array_equal(rgb[:, 0], gray[:, 0]) and np.array_equal(rgb[:, 2], gray[:, 0])
    pure_green = np.zeros((1, 3, 8, 8), np.float32)
    pure_green[:, 1] = 1.0
    back = fit_to_shape(pure_green, in_channels=1, image_size=8)
    assert back.shape == (1, 1, 8, 8)
    assert np.allclose(back, 0.587, atol=1e-6)


def test_fit_does_not_modify_or_alias_its_input() -> None:
    x = np.full((1, 1, 8, 8), 0.5, np.float32)
    out = fit_to_shape(x, in_channels=1, image_size=8)
    out[...] = 0.0
    assert np.all(x == 0.5)


def test_fit_rejects_bad_channels() -> None:
    with pytest.raises(ValidationError, match="1 or 3 channels"):
        fit_to_shape(np.zeros((1, 2, 8, 8), np.float32), in_channels=1, image_size=8)


# --- sklearn digits -----------------------------------------------------------------------


def _digits(**fields: object) -> DataSource:
    adapter: pydantic.TypeAdapter[DataSource] = pydantic.TypeAdapter(DataSource)
    return adapter.validate_python({"kind": "sklearn-digits", **fields})


def test_digits_train_test_split_is_80_20_and_disjoint() -> None:
    train = load_source(_digits(split="train"), in_channels=1, image_size=8)
    test = load_source(_digits(split="test"), in_channels=1, image_size=8)
    everything = load_source(_digits(split="all"), in_channels=1, image_size=8)
    assert (len(train), len(test), len(everything)) == (1438, 359, 1797)
    assert train.x.shape == (1438, 1, 8, 8)
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0
    assert np.isclose(everything.x.max(), 1.0)  # 0..16 scaled by 1/16
    # The split is split_fraction's: disjoint index sets that together cover all 1797.
    kept, held_out = split_fraction(1797, fraction=0.2, seed=0)
    assert np.array_equal(train.x, everything.x[kept])
    assert np.array_equal(test.y, everything.y[held_out])
    other_seed = load_source(_digits(split="test", split_seed=1), in_channels=1, image_size=8)
    assert not np.array_equal(other_seed.x, test.x)


def test_digits_partitions_are_disjoint_and_cover_the_train_split() -> None:
    train = load_source(_digits(), in_channels=1, image_size=8)
    parts = [
        load_source(
            SklearnDigitsSource(
                kind="sklearn-digits", partition=PartitionSpec(index=i, count=4, alpha=0.5)
            ),
            in_channels=1,
            image_size=8,
        )
        for i in range(4)
    ]
    assert sum(len(part) for part in parts) == len(train)
    assert all(len(part) >= 2 for part in parts)
    combined = np.concatenate([part.class_counts(10) for part in parts]).reshape(4, 10)
    assert np.array_equal(combined.sum(axis=0), train.class_counts(10))
    # Every train image lands in exactly one part (as a multiset of image bytes).
    train_rows = sorted(row.tobytes() for row in train.x)
    part_rows = sorted(row.tobytes() for part in parts for row in part.x)
    assert train_rows == part_rows


def test_digits_resized_to_rgb_32() -> None:
    data = load_source(_digits(split="test"), in_channels=3, image_size=32)
    assert data.x.shape == (359, 3, 32, 32)


def test_digits_partition_requires_train_split() -> None:
    with pytest.raises(pydantic.ValidationError, match="train split only"):
        _digits(split="test", partition={"index": 0, "count": 2})


def test_unknown_resize_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'squash'"):
        load_source(_digits(), in_channels=1, image_size=8, resize_mode="squash")


# --- image folders ------------------------------------------------------------------------


def _write_png(
    path: Path, value: int, *, size: tuple[int, int] = (10, 10), mode: str = "L"
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color: int | tuple[int, int, int] = value if mode == "L" else (value, value, value)
    Image.new(mode, size, color).save(path)


def test_imagefolder_labels_follow_sorted_folder_names(tmp_path: Path) -> None:
    _write_png(tmp_path / "zebra" / "a.png", 255)
    _write_png(tmp_path / "ant" / "a.png", 0)
    _write_png(tmp_path / "ant" / "b.PNG", 0, size=(20, 12), mode="RGB")  # mixed size and mode
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    data = load_source(
        ImageFolderSource(kind="imagefolder", path=tmp_path), in_channels=1, image_size=8
    )
    assert data.x.shape == (3, 1, 8, 8)
    assert np.array_equal(data.y, [0, 0, 1])
    assert np.allclose(data.x[:2], 0.0) and np.allclose(data.x[2], 1.0)


def test_imagefolder_class_names_set_the_order(tmp_path: Path) -> None:
    _write_png(tmp_path / "cat" / "1.png", 255)
    _write_png(tmp_path / "dog" / "1.png", 0)
    _write_png(tmp_path / "unused" / "1.png", 0)
    source = ImageFolderSource(kind="imagefolder", path=tmp_path, class_names=["dog", "cat"])
    data = load_source(source, in_channels=3, image_size=8)
    assert data.x.shape == (2, 3, 8, 8)
    assert sorted(data.y.tolist()) == [0, 1]
    # The bright image is in "cat", which class_names puts second.
    assert np.allclose(data.x[data.y == 1], 1.0)
    assert np.allclose(data.x[data.y == 0], 0.0)


def test_imagefolder_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=str(missing)):
        load_source(
            ImageFolderSource(kind="imagefolder", path=missing), in_channels=1, image_size=8
        )


def test_imagefolder_empty_class_dir_names_it(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "1.png", 0)
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'b'} has no PNG or JPEG"):
        load_source(
            ImageFolderSource(kind="imagefolder", path=tmp_path), in_channels=1, image_size=8
        )


def test_imagefolder_missing_named_class(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "1.png", 0)
    source = ImageFolderSource(kind="imagefolder", path=tmp_path, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="class\\(es\\) b"):
        load_source(source, in_channels=1, image_size=8)


def test_imagefolder_unreadable_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "a" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    with pytest.raises(ValidationError, match=f"cannot read image {bad}"):
        load_source(
            ImageFolderSource(kind="imagefolder", path=tmp_path), in_channels=1, image_size=8
        )


# --- npz ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
@pytest.mark.parametrize("as_uint8", [True, False])
def test_npz_layouts(tmp_path: Path, layout: str, as_uint8: bool) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(5, 3, 12, 12)).astype(np.uint8)  # N, C, H, W
    if layout == "NHW":
        base = base[:, :1]
        raw: np.ndarray = base[:, 0]
    elif layout == "NCHW":
        raw = base
    else:
        raw = base.transpose(0, 2, 3, 1)
    if not as_uint8:
        raw = raw.astype(np.float64) / 255.0
    path = tmp_path / "d.npz"
    np.savez(path, x=raw, y=np.arange(5, dtype=np.int32))
    data = load_source(NpzSource(kind="npz", path=path), in_channels=base.shape[1], image_size=12)
    assert data.x.shape == (5, base.shape[1], 12, 12)
    assert data.y.dtype == np.int64 and np.array_equal(data.y, np.arange(5))
    assert np.allclose(data.x, base / 255.0, atol=1e-6)


def test_npz_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    with pytest.raises(ConfigError, match=str(path)):
        load_source(NpzSource(kind="npz", path=path), in_channels=1, image_size=8)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((2, 8, 8))}, "lacks array\\(s\\) y"),
        ({"x": np.zeros((2, 8, 8)), "y": np.zeros(3, np.int64)}, r"expected shape \(2,\)"),
        ({"x": np.zeros((2, 8, 8)), "y": np.zeros(2)}, "integer labels"),
        ({"x": np.full((2, 8, 8), 2.0), "y": np.zeros(2, np.int64)}, r"\[0, 1\]"),
        ({"x": np.zeros((2, 5, 8, 8)), "y": np.zeros(2, np.int64)}, "channel axis"),
        ({"x": np.zeros((2, 8)), "y": np.zeros(2, np.int64)}, "expected shape"),
    ],
)
def test_npz_bad_arrays(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=needle) as error:
        load_source(NpzSource(kind="npz", path=path), in_channels=1, image_size=8)
    assert str(path) in str(error.value)


def test_npz_not_a_zip_is_a_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(ValidationError, match=f"cannot read npz file {path}"):
        load_source(NpzSource(kind="npz", path=path), in_channels=1, image_size=8)


def test_sources_parse_from_config_dicts() -> None:
    adapter: pydantic.TypeAdapter[DataSource] = pydantic.TypeAdapter(DataSource)
    assert isinstance(adapter.validate_python({"kind": "npz", "path": "a.npz"}), NpzSource)
    folder = adapter.validate_python({"kind": "imagefolder", "path": "imgs"})
    assert isinstance(folder, ImageFolderSource) and folder.path == Path("imgs")
    with pytest.raises(pydantic.ValidationError):
        adapter.validate_python({"kind": "npz", "path": "a.npz", "extra": 1})
