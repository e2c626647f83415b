"""In-memory image datasets and fitting images to a model's input shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional

from gptfl.errors import ValidationError

ResizeMode = Literal["stretch", "center-crop", "pad"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("stretch", "center-crop", "pad")


@dataclass(frozen=True)
class ArrayDataset:
    """Images and integer labels held in memory.

    Attributes:
        x: float32 images, shape ``(N, C, H, W)``, values in ``[0, 1]``.
        y: int64 labels, shape ``(N,)``.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValidationError(f"images must have shape (N, C, H, W), got {self.x.shape}")
        if self.x.dtype != np.float32:
            raise ValidationError(f"images must be float32, got {self.x.dtype}")
        if self.y.ndim != 1:
            raise ValidationError(f"labels must have shape (N,), got {self.y.shape}")
        if self.y.dtype != np.int64:
            raise ValidationError(f"labels must be int64, got {self.y.dtype}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValidationError(
                f"{self.x.shape[0]} images but {self.y.shape[0]} labels; the counts must match"
            )
        if self.y.size and int(self.y.min()) < 0:
            raise ValidationError(f"labels must be >= 0, got {int(self.y.min())}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The examples at ``indices`` (copied, in the given order)."""
        index = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(x=self.x[index], y=self.y[index])

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Number of examples per class, shape ``(num_classes,)``, int64.

        Raises:
            ValidationError: a label is ``>= num_classes``.
        """
        if self.y.size and int(self.y.max()) >= num_classes:
            raise ValidationError(
                f"label {int(self.y.max())} is out of range for {num_classes} classes"
            )
        return np.bincount(self.y, minlength=num_classes).astype(np.int64)


def fit_to_shape(
    x: np.ndarray, *, in_channels: int, image_size: int, mode: ResizeMode = "stretch"
) -> np.ndarray:
    """Converts images to a model's channel count and square input size.

    Args:
        x: float images, shape ``(N, C, H, W)`` with C 1 or 3, values in ``[0, 1]``.
        in_channels: target channel count, 1 or 3 (gray is replicated to RGB; RGB becomes
            gray by ITU-R BT.601 luma weights).
        image_size: target side length.
        mode: ``"stretch"`` resizes without keeping the aspect ratio; ``"center-crop"`` first
            crops the central square; ``"pad"`` first pads to a square with zeros.

    Returns:
        float32 images, shape ``(N, in_channels, image_size, image_size)``, in ``[0, 1]``.

    Raises:
        ValidationError: the input shape, channel count or mode is not supported.
    """
    if x.ndim != 4:
        raise ValidationError(f"images must have shape (N, C, H, W), got {x.shape}")
    if mode not in RESIZE_MODES:
        raise ValidationError(f"unknown resize mode {mode!r} (expected one of {RESIZE_MODES})")
    if in_channels not in (1, 3) or x.shape[1] not in (1, 3):
        raise ValidationError(
            f"only 1 or 3 channels are supported, got {x.shape[1]} -> {in_channels}"
        )
    if image_size < 1:
        raise ValidationError(f"image_size must be positive, got {image_size}")
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    images = _convert_channels(images, in_channels)
    height, width = images.shape[2], images.shape[3]
    if mode == "center-crop" and height != width:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        images = images[:, :, top : top + side, left : left + side]
    elif mode == "pad" and height != width:
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        images = functional.pad(images, (left, side - width - left, top, side - height - top))
    if images.shape[0] and (images.shape[2], images.shape[3]) != (image_size, image_size):
        shrinking = images.shape[2] > image_size or images.shape[3] > image_size
        images = functional.interpolate(
            images,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            # Without antialiasing a large downscale aliases badly (thin strokes vanish).
            antialias=shrinking,
        )
    elif not images.shape[0]:
        images = images.new_zeros((0, in_channels, image_size, image_size))
    # Bilinear and antialias filters can overshoot slightly; keep the [0, 1] contract.
    # clamp (not clamp_) also guarantees the result never shares memory with the input.
    return images.clamp(0.0, 1.0).numpy().astype(np.float32, copy=False)


def _convert_channels(images: torch.Tensor, in_channels: int) -> torch.Tensor:
    channels = images.shape[1]
    if channels == in_channels:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)
