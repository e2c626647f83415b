"""The trainer seam: plain SGD behind it, and Opacus taking over the pieces of gptfl.training.

The DP trainer is built on these pieces: Opacus's ``PrivacyEngine.make_private`` must accept
the loader and optimizer :mod:`gptfl.training` builds (on the zoo's ``cnn-small``, GroupNorm),
:func:`~gptfl.training.run_epochs` must train with what it returns (Poisson batches, empty
ones included, and the FedProx term kept), and the update must keep the model's own names.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from gptfl.data import ArrayDataset, SklearnDigitsSource, load_source
from gptfl.errors import ValidationError
from gptfl.models import ModelSpec, build_model
from gptfl.task import LocalSettings, TaskKind, TaskSpec
from gptfl.training import ProximalTerm, make_loader, make_optimizer, run_epochs, train_local
from gptfl.weights import WeightMap
from silo_agent.trainer import (
    SgdTrainer,
    TrainingRun,
    own_state_dict,
    without_inplace_activations,
)

CPU = torch.device("cpu")
SPEC = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_source(SklearnDigitsSource(kind="sklearn-digits"), in_channels=1, image_size=8)


@pytest.fixture(autouse=True)
def _quiet_opacus() -> Iterator[None]:
    # "Secure RNG turned off" (secure_mode is the DP trainer's choice, not these tests')
    # and torch's note on full backward hooks over inputs that need no gradient.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _state(model: torch.nn.Module) -> WeightMap:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _private(
    data: ArrayDataset, settings: LocalSettings, **kwargs: Any
) -> tuple[torch.nn.Module, PrivacyEngine, Any, Any, Any]:
    """The bare model and what make_private makes of the pieces gptfl.training builds."""
    model = without_inplace_activations(build_model(SPEC, seed=0))
    ModuleValidator.validate(model, strict=True)  # raises when Opacus cannot take the model
    engine = PrivacyEngine()
    private_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(model, settings),
        data_loader=make_loader(data, batch_size=settings.batch_size, seed=settings.seed),
        noise_multiplier=kwargs.pop("noise_multiplier", 1.0),
        max_grad_norm=kwargs.pop("max_grad_norm", 1.0),
        **kwargs,
    )
    return model, engine, private_model, optimizer, loader


def test_opacus_takes_the_pieces_and_trains_with_them(digits: ArrayDataset) -> None:
    data = digits.subset(np.arange(256))
    settings = LocalSettings(epochs=1, batch_size=64, learning_rate=0.1, seed=1)
    model, engine, private_model, optimizer, loader = _private(data, settings)
    assert isinstance(private_model, GradSampleModule)
    assert isinstance(optimizer, DPOptimizer)
    assert isinstance(loader, DPDataLoader)  # Poisson sampling
    before = _state(model)
    stats = run_epochs(private_model, optimizer, loader, epochs=1, device=CPU)
    assert stats.examples > 0 and math.isfinite(stats.loss)
    steps = sum(count for _, _, count in engine.accountant.history)
    assert steps == len(loader) == 4  # one DP step per batch of the epoch
    trained = _state(model)
    assert all(not torch.equal(trained[k], before[k]) for k in before)
    assert math.isfinite(engine.get_epsilon(delta=1e-5))

    # The wrapper's names carry its prefix; the update has the model's own names and values.
    assert all(name.startswith("_module.") for name in private_model.state_dict())
    update = own_state_dict(private_model, like=before)
    assert list(update) == list(before)
    assert all(torch.equal(update[k], trained[k]) and update[k].device == CPU for k in update)


def test_empty_poisson_batches_still_step_under_dp(digits: ArrayDataset) -> None:
    """10 examples in batches of 2 sample at rate 1/5: a batch is empty with probability
    0.8^10, about 0.11. Every batch, empty or not, is a DP step the accountant counts."""
    data = digits.subset(np.arange(10))

    def sizes(seed: int) -> list[int]:
        settings = LocalSettings(epochs=1, batch_size=2, learning_rate=0.1, seed=seed)
        *_, loader = _private(data, settings)
        return [len(y) for _ in range(3) for _, y in loader]

    seed = next(s for s in range(100) if 0 in sizes(s))  # the same sampling as the run below
    settings = LocalSettings(epochs=3, batch_size=2, learning_rate=0.1, seed=seed)
    model, engine, private_model, optimizer, loader = _private(data, settings)
    stats = run_epochs(private_model, optimizer, loader, epochs=3, device=CPU)
    steps = sum(count for _, _, count in engine.accountant.history)
    assert steps == len(sizes(seed)) == 15
    assert math.isfinite(stats.loss) or stats.examples == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fedprox_is_kept_under_dp_sgd(digits: ArrayDataset) -> None:
    """Without noise and with per-sample gradients clipped to 1e-7, only the proximal term
    moves the weights: each step of lr 0.1 with mu 5 halves every distance to the anchor.
    (Applied through autograd instead, DPOptimizer would drop it: nothing would move.)"""
    data = digits.subset(np.arange(64))
    settings = LocalSettings(epochs=1, batch_size=16, learning_rate=0.1, proximal_mu=5.0)
    model, engine, private_model, optimizer, loader = _private(
        data, settings, noise_multiplier=0.0, max_grad_norm=1e-7
    )
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    anchors = {name: value + 1.0 for name, value in start.items()}
    proximal = ProximalTerm.toward(model, 5.0, device=CPU, global_params=anchors)
    run_epochs(private_model, optimizer, loader, epochs=1, device=CPU, proximal=proximal)
    steps = sum(count for _, _, count in engine.accountant.history)
    assert steps == 4
    for name, p in model.named_parameters():
        expected = anchors[name] - 0.5**steps  # w - a = -1, halved at every step
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-5)


def test_sgd_trainer_trains_the_run_model_and_returns_its_own_names(
    digits: ArrayDataset,
) -> None:
    data = digits.subset(np.arange(200))
    local = LocalSettings(epochs=2, batch_size=32, learning_rate=0.05, proximal_mu=0.1, seed=2)
    task = TaskSpec("t1", "job", 1, TaskKind.TRAIN, SPEC, "sha", local, time.time() + 60)
    global_weights = _state(build_model(SPEC, seed=4))
    model = build_model(SPEC)
    model.load_state_dict(global_weights)
    SgdTrainer().check(task, num_examples=len(data))  # plain SGD refuses nothing
    outcome = SgdTrainer().train(TrainingRun(task, model, global_weights, data, CPU))

    reference = build_model(SPEC)
    reference.load_state_dict(global_weights)
    result = train_local(reference, data, local, device=CPU, global_params=global_weights)
    assert outcome.num_examples == 200
    assert outcome.metrics == {"loss": result.loss, "accuracy": result.accuracy}
    assert list(outcome.weights) == list(global_weights)
    assert all(torch.equal(outcome.weights[k], v) for k, v in reference.state_dict().items())
    assert all(
        torch.equal(global_weights[k], v) for k, v in _state(build_model(SPEC, seed=4)).items()
    )


class _Wrapper(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, attribute: str) -> None:
        super().__init__()
        self.add_module(attribute, inner)


def test_own_state_dict_takes_off_stacked_wrapper_prefixes() -> None:
    model = build_model(SPEC, seed=0)
    own = _state(model)
    wrapped = _Wrapper(_Wrapper(model, "_module"), "module")
    assert next(iter(wrapped.state_dict())).startswith("module._module.")
    update = own_state_dict(wrapped, like=own)
    assert list(update) == list(own)
    assert all(torch.equal(update[k], own[k]) for k in own)


def test_own_state_dict_refuses_an_update_the_coordinator_would_refuse() -> None:
    model = build_model(SPEC, seed=0)
    own = _state(model)
    first = next(iter(own))
    with pytest.raises(ValidationError, match="has no tensor 'extra.weight'"):
        own_state_dict(model, like={**own, "extra.weight": own[first]})
    with pytest.raises(ValidationError, match="a tensor the global model lacks: 'classifier"):
        own_state_dict(model, like={k: v for k, v in own.items() if not k.startswith("classifier")})
    with pytest.raises(ValidationError, match=f"'{first}' has shape"):
        own_state_dict(model, like={**own, first: own[first].flatten()})


def test_without_inplace_activations_changes_no_output() -> None:
    model = build_model(SPEC, seed=0)
    inputs = torch.rand(4, 1, 8, 8)
    before, state = model(inputs).detach(), _state(model)
    assert any(getattr(m, "inplace", False) for m in model.modules())
    assert without_inplace_activations(model) is model
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert torch.equal(model(inputs), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
