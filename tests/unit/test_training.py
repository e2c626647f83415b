"""Local training and evaluation on real data (sklearn digits) with the zoo's small CNN."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from gptfl.data import ArrayDataset, SklearnDigitsSource, load_source
from gptfl.errors import ConfigError, ValidationError
from gptfl.models import ModelSpec, build_model
from gptfl.task import LocalSettings
from gptfl.training import (
    ProximalTerm,
    evaluate,
    make_loader,
    make_optimizer,
    resolve_device,
    run_epochs,
    train_local,
)

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
    settings = LocalSettings(epochs=3, batch_size=64, learning_rate=0.05, momentum=0.9)
    result = train_local(model, train, settings, device=CPU)
    after = evaluate(model, test, device=CPU, batch_size=100)
    assert before.accuracy < 0.3
    assert result.num_examples == 1438
    assert result.accuracy > 0.8 and result.loss < 0.6
    assert after.num_examples == 359
    assert after.accuracy > 0.85
    assert after.loss < before.loss
    assert not model.training


def test_seeded_training_is_reproducible(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    train = digits[0].subset(np.arange(128))
    settings = LocalSettings(epochs=1, batch_size=32, learning_rate=0.05, momentum=0.9, seed=4)

    def run(seed: int) -> tuple[dict[str, torch.Tensor], float]:
        model = build_model(SPEC, seed=1)
        loss = train_local(model, train, dataclasses.replace(settings, seed=seed), device=CPU).loss
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
        settings = LocalSettings(epochs=2, batch_size=32, learning_rate=0.05, proximal_mu=mu)
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
    settings = LocalSettings(epochs=1, batch_size=32, learning_rate=0.01, proximal_mu=1.0)
    incomplete = dict(list(_params(model).items())[1:])
    with pytest.raises(ValidationError, match="lacks parameter"):
        train_local(model, digits[0], settings, device=CPU, global_params=incomplete)


def test_empty_data(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    empty = digits[1].subset(np.arange(0))
    model = build_model(SPEC, seed=0)
    with pytest.raises(ValidationError, match="empty"):
        train_local(model, empty, LocalSettings(1, 8, 0.1), device=CPU)
    result = evaluate(model, empty, device=CPU)
    assert result.num_examples == 0
    assert math.isnan(result.loss) and math.isnan(result.accuracy)


def test_batch_larger_than_data_and_single_example(
    digits: tuple[ArrayDataset, ArrayDataset],
) -> None:
    model = build_model(SPEC, seed=0)
    one = digits[0].subset(np.arange(1))
    result = train_local(model, one, LocalSettings(2, 64, 0.01), device=CPU)
    assert result.num_examples == 1 and result.accuracy in (0.0, 1.0)


def test_the_loader_keeps_the_seeded_randperm_order(
    digits: tuple[ArrayDataset, ArrayDataset],
) -> None:
    """Each epoch is the next torch.randperm of one generator seeded with the task's seed
    (the order of the loop before the DataLoader: the demo's figures do not move), in
    batches whose last one is short, and the global RNG is not drawn from."""
    data = digits[0].subset(np.arange(70))
    rng_before = torch.get_rng_state()
    loader = make_loader(data, batch_size=32, seed=9)
    epochs = [[(x.clone(), y.clone()) for x, y in loader] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), rng_before)
    generator = torch.Generator().manual_seed(9)
    for batches in epochs:
        order = torch.randperm(len(data), generator=generator)
        assert [len(y) for _, y in batches] == [32, 32, 6]
        assert torch.equal(torch.cat([x for x, _ in batches]), torch.from_numpy(data.x)[order])
        assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(data.y)[order])
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])  # a new order each epoch
    again = [y for _, y in make_loader(data, batch_size=32, seed=9)]
    assert all(torch.equal(a, b) for a, b in zip(again, [y for _, y in epochs[0]], strict=True))


def test_an_empty_batch_makes_its_step_and_adds_nothing_to_the_figures(
    digits: tuple[ArrayDataset, ArrayDataset],
) -> None:
    """Poisson sampling (DP-SGD) can draw an empty batch: its step still happens (the noise
    step a DP accountant counts), the figures come from the examples seen, and no nan."""
    train = digits[0]
    x, y = torch.from_numpy(train.x[:8]), torch.from_numpy(train.y[:8])
    empty = (x[:0], y[:0])
    model = build_model(SPEC, seed=0)
    optimizer = make_optimizer(model, LocalSettings(epochs=1, batch_size=8, learning_rate=0.05))
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    stats = run_epochs(model, optimizer, [empty, (x, y), empty], epochs=1, device=CPU)
    assert len(steps) == 3
    assert stats.examples == 8
    assert math.isfinite(stats.loss) and 0.0 <= stats.accuracy <= 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    nothing = run_epochs(model, optimizer, [empty], epochs=2, device=CPU)
    assert nothing.examples == 0 and math.isnan(nothing.loss) and math.isnan(nothing.accuracy)
    assert len(steps) == 5


class _ReplacingOptimizer(torch.optim.Optimizer):
    """Replaces every gradient with zeros in its step, then lets the optimizer it wraps
    update: the shape of a DP optimizer (Opacus's DPOptimizer sets ``p.grad`` to the
    clipped, noised sum of per-sample gradients, then calls ``original_optimizer.step``)."""

    def __init__(self, original: torch.optim.Optimizer) -> None:
        self.original_optimizer = original

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none)

    def step(self, closure: object = None) -> None:
        for group in self.original_optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        self.original_optimizer.step()


def test_the_proximal_term_survives_an_optimizer_that_replaces_gradients(
    digits: tuple[ArrayDataset, ArrayDataset],
) -> None:
    """With the data's gradient replaced by zeros, one SGD step of lr 0.1 with mu 5 moves
    every parameter exactly half way to its anchor: the term was added after the wrapper."""
    train = digits[0]
    batch = (torch.from_numpy(train.x[:16]), torch.from_numpy(train.y[:16]))
    model = build_model(SPEC, seed=0)
    anchors = {k: v + 1.0 for k, v in _params(model).items()}
    start = _params(model)
    settings = LocalSettings(epochs=1, batch_size=16, learning_rate=0.1, proximal_mu=5.0)
    proximal = ProximalTerm.toward(model, 5.0, device=CPU, global_params=anchors)
    assert proximal is not None
    optimizer = _ReplacingOptimizer(make_optimizer(model, settings))
    run_epochs(model, optimizer, [batch], epochs=1, device=CPU, proximal=proximal)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), start[name] + 0.5)
    # the hook is gone with the loop: another step without the term moves nothing
    run_epochs(model, optimizer, [batch], epochs=1, device=CPU)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), start[name] + 0.5)
    assert ProximalTerm.toward(model, 0.0, device=CPU, global_params=anchors) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"learning_rate": 0.0},
        {"momentum": 1.0},
        {"weight_decay": -1.0},
        {"weight_decay": math.inf},
        {"proximal_mu": -0.1},
        {"seed": -1},
    ],
)
def test_settings_are_validated(fields: dict[str, float]) -> None:
    base: dict[str, float] = {"epochs": 1, "batch_size": 8, "learning_rate": 0.1}
    with pytest.raises(ConfigError):
        LocalSettings(**(base | fields))  # type: ignore[arg-type]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu:0", "gpu", "cuda:x"):
        with pytest.raises(ConfigError, match=f"unsupported device '{bad}'"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")
