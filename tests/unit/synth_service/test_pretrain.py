"""Centralised pretraining on synthetic data: it learns, reports per epoch, and checks its input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gptfl.data.dataset import ArrayDataset
from gptfl.errors import ValidationError
from gptfl.models import ModelSpec, build_model
from gptfl.synth_spec import PretrainSettings
from gptfl.training import evaluate
from synth_service.pretrain import (
    EpochMetrics,
    pretrain,
    random_shift,
    stratified_split,
)

SPEC = ModelSpec(arch="cnn-small", num_classes=4, in_channels=1, image_size=8)


def _bars(per_class: int, seed: int) -> ArrayDataset:
    """Class k is a bright bar (rows for k < 2, columns otherwise) at one of two positions."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.3, size=(4 * per_class, 1, 8, 8)).astype(np.float32)
    y = np.repeat(np.arange(4), per_class).astype(np.int64)
    for i, label in enumerate(y):
        position = 2 + 3 * (label % 2) + int(rng.integers(-1, 2))
        if label < 2:
            x[i, 0, position, 1:7] = 1.0
        else:
            x[i, 0, 1:7, position] = 1.0
    return ArrayDataset(x=x, y=y)


def test_pretraining_improves_validation_accuracy_over_random_init() -> None:
    data = _bars(per_class=50, seed=0)
    seen: list[EpochMetrics] = []
    settings = PretrainSettings(epochs=4, batch_size=16, learning_rate=0.05, val_fraction=0.2)
    result = pretrain(SPEC, data, settings, progress=seen.append)
    assert [m.epoch for m in seen] == [1, 2, 3, 4]
    assert list(result.history) == seen
    assert result.train_size == 160 and result.val_size == 40
    assert result.initial_val_accuracy <= 0.5
    assert result.final_val_accuracy >= 0.9
    assert result.final_val_accuracy > result.initial_val_accuracy + 0.4
    assert seen[-1].train_loss < seen[0].train_loss
    assert seen[-1].learning_rate < 1e-3  # the cosine schedule ends near zero
    # The returned weights are the trained model's, and they generalise to fresh data.
    model = build_model(SPEC)
    model.load_state_dict(result.state_dict)
    fresh = evaluate(model, _bars(per_class=25, seed=1), device=torch.device("cpu"))
    assert fresh.accuracy >= 0.9


def test_adamw_with_a_constant_schedule_learns_too() -> None:
    settings = PretrainSettings(
        epochs=3,
        batch_size=16,
        optimizer="adamw",
        learning_rate=3e-3,
        schedule="constant",
        weight_decay=0.01,
        warmup_epochs=1,
        max_shift=0,
    )
    result = pretrain(SPEC, _bars(per_class=40, seed=2), settings)
    assert result.final_val_accuracy >= 0.85
    assert result.history[-1].learning_rate == pytest.approx(3e-3)


def test_same_seed_same_weights() -> None:
    data = _bars(per_class=10, seed=3)
    settings = PretrainSettings(epochs=1, batch_size=8)
    first = pretrain(SPEC, data, settings).state_dict
    second = pretrain(SPEC, data, settings).state_dict
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_without_a_validation_split_metrics_are_nan() -> None:
    settings = PretrainSettings(epochs=1, batch_size=8, val_fraction=0.0)
    result = pretrain(SPEC, _bars(per_class=5, seed=4), settings)
    assert result.val_size == 0
    assert math.isnan(result.final_val_accuracy)


def test_data_that_does_not_fit_the_model_is_rejected() -> None:
    data = _bars(per_class=3, seed=5)
    settings = PretrainSettings(epochs=1)
    wrong_size = ModelSpec(arch="cnn-small", num_classes=4, in_channels=1, image_size=16)
    with pytest.raises(ValidationError, match=r"shape \(1, 8, 8\).*expects \(1, 16, 16\)"):
        pretrain(wrong_size, data, settings)
    too_few_classes = ModelSpec(arch="cnn-small", num_classes=3, in_channels=1, image_size=8)
    with pytest.raises(ValidationError, match="label 3 is out of range for 3 classes"):
        pretrain(too_few_classes, data, settings)


def test_stratified_split_holds_out_each_label_deterministically() -> None:
    y = np.repeat(np.arange(3), [10, 20, 1]).astype(np.int64)
    data = ArrayDataset(x=np.zeros((31, 1, 8, 8), dtype=np.float32), y=y)
    train, val = stratified_split(data, fraction=0.2, seed=0)
    assert np.bincount(val.y, minlength=3).tolist() == [2, 4, 0]
    assert np.bincount(train.y, minlength=3).tolist() == [8, 16, 1]
    again_train, _ = stratified_split(data, fraction=0.2, seed=0)
    np.testing.assert_array_equal(train.y, again_train.y)


def test_random_shift_moves_content_by_at_most_max_shift() -> None:
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    shifted = random_shift(x, 2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    positions = {tuple(torch.nonzero(img[0])[0].tolist()) for img in shifted}
    assert len(positions) > 5
    assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in positions)
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), torch.ones(64))
    assert random_shift(x, 0, generator=torch.Generator()) is x
