"""Fitting generated images to the task's input shape, including a content-aware mode.

``stretch``, ``center-crop`` and ``pad`` are :func:`gptfl.data.dataset.fit_to_shape`'s modes
and behave exactly as there. ``ink-box`` is added here for glyph-like images on a dark
background (digits, letters, symbols): each image is cropped to the bounding box of its ink,
padded to a square around it (aspect ratio kept) and then resized. That reproduces the framing
of size-normalised datasets such as scikit-learn's 8x8 digits, where every digit spans the full
height, instead of MNIST's framing with a wide empty margin.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from gptfl.data.dataset import fit_to_shape
from gptfl.errors import ConfigError, ValidationError
from gptfl.synth_spec import FIT_MODES

FitMode = Literal["stretch", "center-crop", "pad", "ink-box"]


def fit_images(
    x: np.ndarray,
    *,
    in_channels: int,
    image_size: int,
    mode: str = "stretch",
    ink_threshold: float = 0.25,
) -> np.ndarray:
    """Converts images to ``(N, in_channels, image_size, image_size)`` float32 in [0, 1].

    Args:
        x: float images ``(N, C, H, W)`` in [0, 1], C 1 or 3.
        in_channels: target channels (1 or 3).
        image_size: target side.
        mode: one of :data:`FIT_MODES` (see the module docstring).
        ink_threshold: for ``ink-box``, a pixel is ink when its gray value is at least this
            fraction of the image's brightest pixel; a blank image keeps its whole frame.

    Raises:
        ConfigError: unknown mode or a threshold outside (0, 1].
        ValidationError: unsupported input shape or channel count.
    """
    if mode not in FIT_MODES:
        raise ConfigError(f"unknown resize mode {mode!r} (expected one of {FIT_MODES})")
    if mode != "ink-box":
        return fit_to_shape(x, in_channels=in_channels, image_size=image_size, mode=mode)  # type: ignore[arg-type]
    if not 0.0 < ink_threshold <= 1.0:
        raise ConfigError(f"ink_threshold must be in (0, 1], got {ink_threshold}")
    if x.ndim != 4:
        raise ValidationError(f"images must have shape (N, C, H, W), got {x.shape}")
    out = np.empty((x.shape[0], in_channels, image_size, image_size), dtype=np.float32)
    for index in range(x.shape[0]):
        square = _ink_square(np.asarray(x[index], dtype=np.float32), ink_threshold)
        out[index] = fit_to_shape(
            square[None], in_channels=in_channels, image_size=image_size, mode="stretch"
        )[0]
    return out


def _ink_square(image: np.ndarray, threshold: float) -> np.ndarray:
    """The image cropped to its ink's bounding box and zero-padded to a centred square."""
    gray = image.mean(axis=0)
    peak = float(gray.max())
    if peak <= 0.0:
        return image
    rows = np.flatnonzero((gray >= threshold * peak).any(axis=1))
    cols = np.flatnonzero((gray >= threshold * peak).any(axis=0))
    crop = image[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape[1], crop.shape[2]
    side = max(height, width)
    square = np.zeros((image.shape[0], side, side), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    square[:, top : top + height, left : left + width] = crop
    return square
