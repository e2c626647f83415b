"""Strategies against references written independently in numpy from the module docstring.

Reddi et al. 2021 (Algorithm 2) with ``delta = average - global``, ``m0 = 0``, ``v0 = tau^2``,
no bias correction; FedAvgM as in Hsu et al. 2019.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from coordinator.claims import RoundClaims
from coordinator.robust_folds import KrumFold, MedianFold, TrimmedMeanFold
from coordinator.round_fold import WeightedMeanFold
from coordinator.round_plan import RoundSetup
from coordinator.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
    StrategyWrapper,
    build_strategy,
)
from coordinator.tasks import ModelVersion
from gptfl.job_spec import ROBUST_STRATEGIES, StrategyName, StrategySpec, strategy_spec
from gptfl.task import LocalSettings
from gptfl.weights import WeightMap
from gptfl.weights_io import load_weights, save_weights

SHAPES = {"w": (3, 4), "b": (4,)}
ETA, BETA1, BETA2, TAU, MOMENTUM = 0.3, 0.8, 0.95, 0.05, 0.7
Arrays = dict[str, np.ndarray]


def _rng_arrays(seed: int, scale: float = 1.0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {k: scale * rng.standard_normal(s) for k, s in SHAPES.items()}


def _torch(arrays: Arrays, dtype: torch.dtype = torch.float32) -> WeightMap:
    return {k: torch.from_numpy(v).to(dtype) for k, v in arrays.items()}


# ---- references ----------------------------------------------------------------------------


def _adaptive_reference(v_rule: str) -> Callable[[Arrays, list[Arrays]], list[Arrays]]:
    def run(w0: Arrays, averages: list[Arrays]) -> list[Arrays]:
        w = {k: v.copy() for k, v in w0.items()}
        m = {k: np.zeros_like(v) for k, v in w.items()}
        v = {k: np.full_like(x, TAU**2) for k, x in w.items()}
        history = []
        for avg in averages:
            for k in w:
                d = avg[k] - w[k]
                m[k] = BETA1 * m[k] + (1 - BETA1) * d
                if v_rule == "adagrad":
                    v[k] = v[k] + d**2
                elif v_rule == "adam":
                    v[k] = BETA2 * v[k] + (1 - BETA2) * d**2
                else:  # yogi
                    v[k] = v[k] - (1 - BETA2) * d**2 * np.sign(v[k] - d**2)
                w[k] = w[k] + ETA * m[k] / (np.sqrt(v[k]) + TAU)
            history.append({k: x.copy() for k, x in w.items()})
        return history

    return run


def _avgm_reference(w0: Arrays, averages: list[Arrays]) -> list[Arrays]:
    w = {k: v.copy() for k, v in w0.items()}
    velocity = {k: np.zeros_like(v) for k, v in w.items()}
    history = []
    for avg in averages:
        for k in w:
            velocity[k] = MOMENTUM * velocity[k] + (avg[k] - w[k])
            w[k] = w[k] + ETA * velocity[k]
        history.append({k: x.copy() for k, x in w.items()})
    return history


def _spec(name: str) -> StrategySpec:
    if name in ("fedavg", "fedprox", *ROBUST_STRATEGIES):
        return strategy_spec(name=name)
    if name == "fedavgm":
        return strategy_spec(name=name, server_learning_rate=ETA, server_momentum=MOMENTUM)
    return strategy_spec(name=name, server_learning_rate=ETA, beta1=BETA1, beta2=BETA2, tau=TAU)


REFERENCES = {
    "fedadagrad": (FedAdagrad, _adaptive_reference("adagrad")),
    "fedadam": (FedAdam, _adaptive_reference("adam")),
    "fedyogi": (FedYogi, _adaptive_reference("yogi")),
    "fedavgm": (FedAvgM, _avgm_reference),
}


def _rounds(strategy: Strategy, w0: Arrays, averages: list[Arrays]) -> list[WeightMap]:
    weights = _torch(w0)
    history = []
    for avg in averages:
        weights = strategy.apply(weights, _torch(avg))
        history.append(weights)
    return history


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_server_optimizer_matches_the_reference_over_three_rounds(name: str) -> None:
    cls, reference = REFERENCES[name]
    strategy = build_strategy(_spec(name))
    assert type(strategy) is cls and strategy.name == name
    w0 = _rng_arrays(0)
    # averages near the global model, as after local training, and one far away
    averages = [_rng_arrays(1, 0.1), _rng_arrays(2, 0.5), _rng_arrays(3, 3.0)]
    averages = [{k: w0[k] + a[k] for k in w0} for a in averages]
    got = _rounds(strategy, w0, averages)
    want = reference(w0, averages)
    for r, (g, ref) in enumerate(zip(got, want, strict=True), start=1):
        for k in SHAPES:
            np.testing.assert_allclose(
                g[k].numpy(), ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} round {r} {k}"
            )


def test_the_adaptive_rules_really_differ() -> None:
    # guards the test above against a reference that could not tell the variants apart
    w0 = _rng_arrays(0)
    averages = [{k: w0[k] + a[k] for k in w0} for a in (_rng_arrays(1), _rng_arrays(2))]
    finals = {n: _rounds(build_strategy(_spec(n)), w0, averages)[-1]["w"] for n in REFERENCES}
    names = sorted(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(finals[a], finals[b]), (a, b)


def test_first_adam_step_is_bounded_by_eta() -> None:
    # with v0 = tau^2 the first step is at most eta per coordinate in magnitude
    strategy = build_strategy(_spec("fedadam"))
    w0 = _rng_arrays(0)
    avg = {k: w0[k] + 1000.0 for k in w0}
    new = strategy.apply(_torch(w0), _torch(avg))
    for k in SHAPES:
        assert (new[k] - _torch(w0)[k]).abs().max().item() <= ETA + 1e-4


LOCAL = LocalSettings(epochs=2, batch_size=16, learning_rate=0.1, momentum=0.5, seed=3)


class _SetsMomentum(StrategyWrapper):
    """A wrapper that adds its own local setting, as a privacy wrapper would."""

    def configure_local(self, settings: LocalSettings) -> LocalSettings:
        return dataclasses.replace(self.inner.configure_local(settings), momentum=0.0)


class _SetsWeightDecay(StrategyWrapper):
    def configure_local(self, settings: LocalSettings) -> LocalSettings:
        return dataclasses.replace(self.inner.configure_local(settings), weight_decay=0.01)


def test_wrappers_compose_and_keep_each_others_local_settings() -> None:
    stacked = _SetsWeightDecay(_SetsMomentum(FedProx(0.25)))
    local = stacked.configure_local(LOCAL)
    # each layer's change survives the layers around it; the rest is the job's
    assert (local.proximal_mu, local.momentum, local.weight_decay) == (0.25, 0.0, 0.01)
    assert (local.epochs, local.batch_size, local.seed) == (2, 16, 3)
    assert stacked.name == "_SetsWeightDecay(_SetsMomentum(fedprox))"


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_a_wrapper_passes_aggregation_and_state_through(name: str) -> None:
    w0, avg = _torch(_rng_arrays(0)), _torch(_rng_arrays(1))
    plain, wrapped = build_strategy(_spec(name)), _SetsMomentum(build_strategy(_spec(name)))
    expected = plain.apply(w0, avg)
    for k, v in wrapped.apply(w0, avg).items():
        assert torch.equal(v, expected[k])
    state = wrapped.state_dict()
    assert state and all(key.startswith("inner/") for key in state)
    restored = _SetsMomentum(build_strategy(_spec(name)))
    restored.load_state_dict(state)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key])
    with pytest.raises(ValueError, match="keeps no state"):
        restored.load_state_dict({**state, "own": torch.zeros(1)})


def test_fedavg_returns_the_average() -> None:
    w0, avg = _torch(_rng_arrays(0)), _torch(_rng_arrays(1))
    strategy = build_strategy(strategy_spec(name="fedavg"))
    assert isinstance(strategy, FedAvg) and strategy.configure_local(LOCAL) == LOCAL
    new = strategy.apply(w0, avg)
    for k in SHAPES:
        assert torch.equal(new[k], avg[k])


def test_fedprox_sends_mu_and_averages_like_fedavg() -> None:
    strategy = build_strategy(strategy_spec(name="fedprox", proximal_mu=0.25))
    assert isinstance(strategy, FedProx)
    assert strategy.configure_local(LOCAL) == dataclasses.replace(LOCAL, proximal_mu=0.25)
    w0, avg = _torch(_rng_arrays(0)), _torch(_rng_arrays(1))
    fedavg = FedAvg().apply(w0, avg)
    new = strategy.apply(w0, avg)
    for k in SHAPES:
        assert torch.equal(new[k], fedavg[k])
    assert strategy.state_dict() == {}


@pytest.mark.parametrize(
    ("spec", "fold"),
    [
        (strategy_spec(name="fedavg"), WeightedMeanFold),
        (strategy_spec(name="fedadam"), WeightedMeanFold),
        (strategy_spec(name="fedmedian"), MedianFold),
        (strategy_spec(name="fedtrimmedavg", beta=0.3), TrimmedMeanFold),
        (strategy_spec(name="krum", num_byzantine=1, num_selected=2), KrumFold),
    ],
)
def test_each_strategy_folds_its_rounds_its_own_way(spec: StrategySpec, fold: type) -> None:
    weights = _torch(_rng_arrays(0))
    claims = RoundClaims.of({"a": (10, 1), "b": (20, 1)})
    setup = RoundSetup(1, ("a", "b"), 2, ModelVersion.of(weights), 30.0, claims)
    made = build_strategy(spec).round_fold(setup)
    assert type(made) is fold
    assert made.expected == ModelVersion.of(weights).manifest.specs
    if isinstance(made, TrimmedMeanFold):
        assert made.beta == 0.3
    if isinstance(made, KrumFold):
        assert (made.num_byzantine, made.num_selected) == (1, 2)


@pytest.mark.parametrize("name", get_args(StrategyName))
def test_dtypes_are_preserved_and_unaveraged_tensors_kept(name: str) -> None:
    strategy = build_strategy(_spec(name))
    global_weights = {
        "w": torch.randn(3, 4).to(torch.float16),
        "b": torch.randn(4).to(torch.bfloat16),
        "steps": torch.tensor(7),
    }
    # the average comes from the round's fold: float32, and only the floating-point tensors
    average = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    new = strategy.apply(global_weights, average)
    assert new["w"].dtype == torch.float16
    assert new["b"].dtype == torch.bfloat16
    assert new["steps"].dtype == torch.int64 and int(new["steps"]) == 7
    assert new["steps"] is not global_weights["steps"]  # a copy, not an alias
    assert torch.isfinite(new["w"]).all()


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_state_round_trip_continues_identically(name: str, tmp_path: Path) -> None:
    w0 = _rng_arrays(0)
    averages = [{k: w0[k] + a[k] for k in w0} for a in map(_rng_arrays, (1, 2, 3, 4))]
    uninterrupted = _rounds(build_strategy(_spec(name)), w0, averages)

    first = build_strategy(_spec(name))
    after_two = _rounds(first, w0, averages[:2])[-1]
    state = first.state_dict()
    assert state, "a server optimizer has state to checkpoint"
    # through safetensors, as a checkpoint stores it
    save_weights(tmp_path / "strategy.safetensors", state)
    restored_state, _ = load_weights(tmp_path / "strategy.safetensors")
    second = build_strategy(_spec(name))
    second.load_state_dict(restored_state)
    resumed = _rounds(second, {k: v.numpy() for k, v in after_two.items()}, averages[2:])
    for got, want in zip(resumed, uninterrupted[2:], strict=True):
        for k in SHAPES:
            assert torch.equal(got[k], want[k]), k


def test_fresh_strategy_differs_from_a_restored_one() -> None:
    # without the state, round 3 would come out differently: the round trip above is not vacuous
    w0 = _rng_arrays(0)
    averages = [{k: w0[k] + a[k] for k in w0} for a in map(_rng_arrays, (1, 2, 3))]
    uninterrupted = _rounds(build_strategy(_spec("fedadam")), w0, averages)
    fresh = _rounds(
        build_strategy(_spec("fedadam")),
        {k: v.numpy() for k, v in uninterrupted[1].items()},
        averages[2:],
    )
    assert not torch.allclose(fresh[0]["w"], uninterrupted[2]["w"])


def test_stateless_strategies_refuse_foreign_state() -> None:
    FedAvg().load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        FedAvg().load_state_dict({"m/w": torch.zeros(1)})
