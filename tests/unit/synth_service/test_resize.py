"""Fitting generated images to the task's shape, including the ink bounding-box mode."""

from __future__ import annotations

import numpy as np
import pytest

from gptfl.data.dataset import fit_to_shape
from gptfl.errors import ConfigError
from synth_service.resize import fit_images


def test_plain_modes_match_fit_to_shape() -> None:
    x = np.random.default_rng(0).uniform(size=(3, 1, 16, 12)).astype(np.float32)
    for mode in ("stretch", "center-crop", "pad"):
        np.testing.assert_array_equal(
            fit_images(x, in_channels=3, image_size=8, mode=mode),
            fit_to_shape(x, in_channels=3, image_size=8, mode=mode),
        )


def test_ink_box_makes_a_small_centred_glyph_fill_the_frame_height() -> None:
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    x[0, 0, 8:20, 12:16] = 1.0  # a 12x4 stroke in a wide empty margin
    out = fit_images(x, in_channels=1, image_size=8, mode="ink-box")
    assert out.shape == (1, 1, 8, 8)
    rows = np.flatnonzero(out[0, 0].max(axis=1) > 0.2)
    cols = np.flatnonzero(out[0, 0].max(axis=0) > 0.2)
    assert rows.tolist() == list(range(8))  # full height
    assert 2 <= len(cols) <= 4  # aspect ratio kept: narrow
    assert cols.min() >= 2 and cols.max() <= 5  # centred
    stretched = fit_images(x, in_channels=1, image_size=8, mode="stretch")
    assert np.flatnonzero(stretched[0, 0].max(axis=1) > 0.2).size < 8


def test_ink_box_keeps_a_blank_image_blank_and_rejects_bad_options() -> None:
    blank = np.zeros((2, 3, 10, 10), dtype=np.float32)
    assert not fit_images(blank, in_channels=1, image_size=8, mode="ink-box").any()
    with pytest.raises(ConfigError, match="unknown resize mode"):
        fit_images(blank, in_channels=1, image_size=8, mode="squash")
    with pytest.raises(ConfigError, match="ink_threshold"):
        fit_images(blank, in_channels=1, image_size=8, mode="ink-box", ink_threshold=0.0)
