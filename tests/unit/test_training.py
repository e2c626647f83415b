"""Local training and evaluation on real data (sklearn digits) with the zoo's small CNN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gptfl.data import ArrayDataset, SklearnDigitsSource, load_source
from gptfl.errors import ConfigError, ValidationError
from gptfl.models import ModelSpec, build_model
from gptfl.training import TrainSettings, evaluate, resolve_device, train_local

CPU = torch.device("cpu")
SPEC = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)


@pytest.fixture(scope="module")
def digits() -> tuple[ArrayDataset, ArrayDataset]:
    train = load_source(SklearnDigitsSource(kind="sklearn-digits"), in_channels=1, image_size=8)
    test = load_source(
        SklearnDigitsSource(kind="sklearn-digits", split="test"), in_channels=1, image_size=8
    )
    return train, test


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_training_learns_digits(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    train, test = digits
    model = build_model(SPEC, seed=0)
    before = evaluate(model, test, device=CPU)
    # batch 64 does not divide 1438: the last batch of each epoch is short
    settings = TrainSettings(epochs=3, batch_size=64, learning_rate=0.05, momentum=0.9)
    result = train_local(model, train, settings, device=CPU)
    after = evaluate(model, test, device=CPU, batch_size=100)
    assert before.accuracy < 0.3
    assert result.num_examples == 1438
    assert result.accuracy > 0.8 and result.loss < 0.6 and result.seconds > 0
    assert after.num_examples == 359
    assert after.accuracy > 0.85
    assert after.loss < before.loss
    assert not model.training


def test_seeded_training_is_reproducible(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    train = digits[0].subset(np.arange(128))
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=0.05, momentum=0.9, seed=4)

    def run(seed: int) -> tuple[dict[str, torch.Tensor], float]:
        model = build_model(SPEC, seed=1)
        loss = train_local(
            model, train, TrainSettings(**{**settings.__dict__, "seed": seed}), device=CPU
        ).loss
        return _params(model), loss

    first, first_loss = run(4)
    second, second_loss = run(4)
    other, _ = run(5)
    assert first_loss == second_loss
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[name] - b[name]).pow(2).sum()) for name in a))


def test_fedprox_keeps_weights_near_global(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    train = digits[0].subset(np.arange(200))
    start = build_model(SPEC, seed=2)
    global_params = _params(start)

    def drift(mu: float, *, explicit_global: bool) -> float:
        model = build_model(SPEC, seed=2)
        settings = TrainSettings(epochs=2, batch_size=32, learning_rate=0.05, proximal_mu=mu)
        train_local(
            model,
            train,
            settings,
            device=CPU,
            global_params=global_params if explicit_global else None,
        )
        return _distance(_params(model), global_params)

    # mu = 15 is large but stable: the proximal step shrinks w - w_global by lr * mu = 0.75.
    plain = drift(0.0, explicit_global=False)
    prox = drift(15.0, explicit_global=True)
    prox_default_anchor = drift(15.0, explicit_global=False)
    assert prox < 0.5 * plain
    # Without global_params the anchor is the model's starting weights, i.e. the same here.
    assert prox_default_anchor == pytest.approx(prox, rel=1e-5)


def test_fedprox_rejects_mismatched_global_params(
    digits: tuple[ArrayDataset, ArrayDataset],
) -> None:
    model = build_model(SPEC, seed=0)
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=0.01, proximal_mu=1.0)
    incomplete = dict(list(_params(model).items())[1:])
    with pytest.raises(ValidationError, match="lacks parameter"):
        train_local(model, digits[0], settings, device=CPU, global_params=incomplete)


def test_empty_data(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    empty = digits[1].subset(np.arange(0))
    model = build_model(SPEC, seed=0)
    with pytest.raises(ValidationError, match="empty"):
        train_local(model, empty, TrainSettings(1, 8, 0.1), device=CPU)
    result = evaluate(model, empty, device=CPU)
    assert result.num_examples == 0
    assert math.isnan(result.loss) and math.isnan(result.accuracy)


def test_batch_larger_than_data_and_single_example(
    digits: tuple[ArrayDataset, ArrayDataset],
) -> None:
    model = build_model(SPEC, seed=0)
    one = digits[0].subset(np.arange(1))
    result = train_local(model, one, TrainSettings(2, 64, 0.01), device=CPU)
    assert result.num_examples == 1 and result.accuracy in (0.0, 1.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"learning_rate": 0.0},
        {"momentum": 1.0},
        {"weight_decay": -1.0},
        {"proximal_mu": -0.1},
    ],
)
def test_settings_are_validated(fields: dict[str, float]) -> None:
    base: dict[str, float] = {"epochs": 1, "batch_size": 8, "learning_rate": 0.1}
    with pytest.raises(ConfigError):
        TrainSettings(**(base | fields))  # type: ignore[arg-type]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu:0", "gpu", "cuda:x"):
        with pytest.raises(ConfigError, match=f"unsupported device '{bad}'"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")
