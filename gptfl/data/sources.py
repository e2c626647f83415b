"""Where a silo's (or the server's) data comes from, and loading it as an :class:`ArrayDataset`.

A source is a small pydantic spec discriminated on ``kind`` so it can sit in a YAML config:

.. code-block:: yaml

    data:
      kind: sklearn-digits
      split: train
      partition: {index: 0, count: 4, alpha: 0.5}
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pydantic
from PIL import Image, UnidentifiedImageError

from gptfl.config_loading import StrictModel
from gptfl.data.dataset import RESIZE_MODES, ArrayDataset, ResizeMode, fit_to_shape
from gptfl.data.partition import PartitionSpec, dirichlet_partition, split_fraction
from gptfl.errors import ConfigError, ValidationError

logger = logging.getLogger(__name__)

#: file suffixes (lower case) an image folder source reads; other files are ignored
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# PIL modes read as one gray channel; everything else (palette, RGBA, CMYK, ...) becomes RGB
_GRAY_MODES = frozenset({"1", "L", "LA"})


class ImageFolderSource(StrictModel):
    """A folder with one sub-folder of PNG/JPEG images per class.

    Attributes:
        path: the root folder (relative paths are kept as given; callers resolve them).
        class_names: the classes in label order; by default the sorted sub-folder names.
            When given, each name must be a sub-folder and other sub-folders are ignored.
    """

    kind: Literal["imagefolder"]
    path: Path
    class_names: list[str] | None = None


class NpzSource(StrictModel):
    """A NumPy ``.npz`` archive with arrays ``x`` and ``y``.

    ``x`` is ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` with C 1 or 3, either uint8
    in 0..255 or float in [0, 1]; ``y`` holds ``N`` non-negative integer labels.
    """

    kind: Literal["npz"]
    path: Path


class SklearnDigitsSource(StrictModel):
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes).

    Attributes:
        split: ``"train"``, ``"test"`` or ``"all"``.
        test_fraction: share of the 1797 images held out as the test split.
        split_seed: seed of the train/test split.
        partition: when given, only this silo's Dirichlet part of the train split is loaded
            (with ``split="train"`` only).
    """

    kind: Literal["sklearn-digits"]
    split: Literal["train", "test", "all"] = "train"
    test_fraction: float = pydantic.Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0
    partition: PartitionSpec | None = None

    @pydantic.model_validator(mode="after")
    def _partition_needs_train(self) -> SklearnDigitsSource:
        if self.partition is not None and self.split != "train":
            raise ValueError("partition applies to the train split only; set split: train")
        return self


DataSource = Annotated[
    ImageFolderSource | NpzSource | SklearnDigitsSource, pydantic.Field(discriminator="kind")
]


def load_source(
    source: DataSource, *, in_channels: int, image_size: int, resize_mode: str = "stretch"
) -> ArrayDataset:
    """Loads a source and fits its images to the model's input shape.

    Args:
        source: the source spec.
        in_channels: the model's channel count (1 or 3).
        image_size: the model's square input size.
        resize_mode: ``"stretch"``, ``"center-crop"`` or ``"pad"`` (see
            :func:`~gptfl.data.dataset.fit_to_shape`).

    Returns:
        The dataset, float32 ``(N, in_channels, image_size, image_size)`` in [0, 1].

    Raises:
        ConfigError: a path is missing, the resize mode is unknown, or the folder layout does
            not match the spec.
        ValidationError: a file's contents are unreadable or malformed.
    """
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"unknown resize mode {resize_mode!r} (expected one of {RESIZE_MODES})")
    mode: ResizeMode = resize_mode
    if isinstance(source, ImageFolderSource):
        # Files may differ in size, so they are fitted in groups of equal shape.
        return _read_image_folder(source, in_channels=in_channels, image_size=image_size, mode=mode)
    if isinstance(source, NpzSource):
        x, y = _read_npz(source.path)
    else:
        x, y = _read_sklearn_digits(source)
    x = fit_to_shape(x, in_channels=in_channels, image_size=image_size, mode=mode)
    return ArrayDataset(x=x, y=y)


def _read_sklearn_digits(source: SklearnDigitsSource) -> tuple[np.ndarray, np.ndarray]:
    # Imported lazily: scikit-learn is slow to import and only this source needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None, :, :]
    labels = np.asarray(digits.target, dtype=np.int64)
    if source.split == "all":
        return images, labels
    train, test = split_fraction(
        labels.shape[0], fraction=source.test_fraction, seed=source.split_seed
    )
    if source.split == "test":
        return images[test], labels[test]
    if source.partition is not None:
        spec = source.partition
        parts = dirichlet_partition(
            labels[train], count=spec.count, alpha=spec.alpha, seed=spec.seed
        )
        train = train[parts[spec.index]]
    return images[train], labels[train]


def count_examples(source: DataSource) -> int:
    """How many examples :func:`load_source` gives for ``source``, without decoding an image
    (a silo registers its counts before any task says which input shape to load).

    Raises:
        ConfigError: as :func:`load_source` for a missing path or a bad folder layout.
        ValidationError: an ``.npz`` that cannot be read.
    """
    if isinstance(source, ImageFolderSource):
        return sum(len(files) for files in _class_files(source))
    if isinstance(source, NpzSource):
        with _open_npz(source.path) as archive:
            try:
                labels = archive["y"]  # load_source refuses a y of another length than x
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                raise ValidationError(f"cannot read npz file {source.path}: {exc}") from None
        return int(labels.shape[0]) if labels.ndim else 0
    return int(_read_sklearn_digits(source)[1].shape[0])


def _class_files(source: ImageFolderSource) -> list[list[Path]]:
    """The image files of each class of an image folder, in label order."""
    root = source.path
    _check_image_folder(root)
    present = sorted(child.name for child in root.iterdir() if child.is_dir())
    if source.class_names is None:
        class_names = present
        if not class_names:
            raise ConfigError(f"image folder {root} has no class sub-folders")
    else:
        class_names = list(source.class_names)
        if len(set(class_names)) != len(class_names):
            raise ConfigError(f"image folder {root}: class_names has duplicates")
        missing = [name for name in class_names if name not in present]
        if missing:
            raise ConfigError(
                f"image folder {root} has no sub-folder for class(es) {', '.join(missing)}"
            )
    per_class: list[list[Path]] = []
    for name in class_names:
        folder = root / name
        files = sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ConfigError(f"class folder {folder} has no PNG or JPEG images")
        per_class.append(files)
    return per_class


def _read_image_folder(
    source: ImageFolderSource, *, in_channels: int, image_size: int, mode: ResizeMode
) -> ArrayDataset:
    per_class = _class_files(source)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, files in enumerate(per_class):
        for file in files:
            images.append(_read_image(file))
            labels.append(label)
    x = np.empty((len(images), in_channels, image_size, image_size), dtype=np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(position)
    for positions in by_shape.values():
        group = np.stack([images[position] for position in positions])
        x[positions] = fit_to_shape(
            group, in_channels=in_channels, image_size=image_size, mode=mode
        )
    logger.info("loaded %d images in %d classes from %s", len(labels), len(per_class), source.path)
    return ArrayDataset(x=x, y=np.asarray(labels, dtype=np.int64))


def _read_image(file: Path) -> np.ndarray:
    """One image as float32 ``(C, H, W)`` in [0, 1]: C is 1 for grayscale files, else 3."""
    try:
        with Image.open(file) as opened:
            target = "L" if opened.mode in _GRAY_MODES else "RGB"
            pixels = np.asarray(opened.convert(target), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValidationError(f"cannot read image {file}: {exc}") from None
    if pixels.ndim == 2:
        return pixels[None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def check_source(source: DataSource) -> None:
    """The cheap part of :func:`load_source`, for a service's start: the folder or file is
    there, and an ``.npz`` holds ``x`` and ``y``. The images are read when first needed.

    Raises:
        ConfigError: the folder or file is missing.
        ValidationError: the ``.npz`` cannot be opened or lacks an array.
    """
    if isinstance(source, ImageFolderSource):
        _check_image_folder(source.path)
    elif isinstance(source, NpzSource):
        _open_npz(source.path).close()


def _check_image_folder(root: Path) -> None:
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist or is not a directory")


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """The open archive, once it is known to hold ``x`` and ``y``."""
    if not path.is_file():
        raise ConfigError(f"npz file {path} does not exist or is not a file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValidationError(f"cannot read npz file {path}: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValidationError(f"npz file {path} is a single array, not an archive of x and y")
    missing = [key for key in ("x", "y") if key not in archive.files]
    if missing:
        archive.close()
        raise ValidationError(
            f"npz file {path} lacks array(s) {', '.join(missing)} "
            f"(has: {', '.join(archive.files) or 'none'})"
        )
    return archive


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with _open_npz(path) as archive:
        try:
            raw_x, raw_y = archive["x"], archive["y"]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ValidationError(f"cannot read npz file {path}: {exc}") from None
    return _images_from_array(raw_x, where=f"npz file {path}: x"), _labels_from_array(
        raw_y, count=raw_x.shape[0], where=f"npz file {path}: y"
    )


def _images_from_array(raw: np.ndarray, *, where: str) -> np.ndarray:
    """Brings an image array to float32 ``(N, C, H, W)`` in [0, 1]."""
    if raw.ndim == 3:
        raw = raw[:, None, :, :]
    elif raw.ndim == 4:
        # Channels-first wins when both ends could be channels (e.g. a 3x3x3 image); a
        # channel count is never the image width in practice.
        if raw.shape[1] not in (1, 3):
            if raw.shape[3] not in (1, 3):
                raise ValidationError(
                    f"{where}: cannot find a channel axis of size 1 or 3 in shape {raw.shape}"
                )
            raw = raw.transpose(0, 3, 1, 2)
    else:
        raise ValidationError(
            f"{where}: expected shape (N, H, W), (N, C, H, W) or (N, H, W, C), got {raw.shape}"
        )
    if raw.dtype == np.uint8:
        return (raw.astype(np.float32) / 255.0).copy(order="C")
    if not np.issubdtype(raw.dtype, np.floating):
        raise ValidationError(f"{where}: expected uint8 or float values, got {raw.dtype}")
    images = raw.astype(np.float32).copy(order="C")
    if images.size and not np.isfinite(images).all():
        raise ValidationError(f"{where}: contains NaN or infinite values")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValidationError(
            f"{where}: float values must lie in [0, 1], got [{images.min()}, {images.max()}]"
        )
    return images


def _labels_from_array(raw: np.ndarray, *, count: int, where: str) -> np.ndarray:
    if raw.ndim != 1 or raw.shape[0] != count:
        raise ValidationError(f"{where}: expected shape ({count},), got {raw.shape}")
    if not np.issubdtype(raw.dtype, np.integer):
        raise ValidationError(f"{where}: expected integer labels, got {raw.dtype}")
    if raw.size and int(raw.min()) < 0:
        raise ValidationError(f"{where}: labels must be >= 0, got {int(raw.min())}")
    return raw.astype(np.int64)
