"""Aggregation strategies behind one interface.

A strategy decides two things: what the silos are told for local training
(:meth:`Strategy.configure_local`, e.g. FedProx's ``mu``) and how the round's aggregate of
the silo models becomes the next global model (:meth:`Strategy.apply`). The aggregate comes
from the round's fold (:meth:`Strategy.round_fold`): the exact sample-weighted average of
:class:`coordinator.round_fold.WeightedMeanFold` by default, so every strategy works with
streamed (and, later, securely summed) updates; the robust strategies (FedMedian,
FedTrimmedAvg, Krum) keep every update and reduce them robustly instead
(:mod:`coordinator.robust_folds`), then take the aggregate as the model, as FedAvg does.

Strategies compose: a :class:`StrategyWrapper` (differential privacy, robust clipping) holds
another strategy, adjusts what it needs and passes the rest through, so a wrapper's change to
the local settings survives the strategies around it.

Server optimizers follow Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2,
with ``delta = average - global`` (the negative pseudo-gradient) and no bias correction::

    m = beta1 * m + (1 - beta1) * delta
    v = v + delta^2                                              (FedAdagrad)
    v = beta2 * v + (1 - beta2) * delta^2                        (FedAdam)
    v = v - (1 - beta2) * delta^2 * sign(v - delta^2)            (FedYogi)
    w = w + eta * m / (sqrt(v) + tau)

FedAvgM (Hsu et al. 2019): ``velocity = momentum * velocity + delta``,
``w = w + eta * velocity``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch

from coordinator.robust_folds import KrumFold, MedianFold, TrimmedMeanFold
from coordinator.round_fold import RoundFold, WeightedMeanFold
from coordinator.round_plan import RoundSetup
from gptfl.job_spec import (
    AdaptiveSpec,
    FedAvgMSpec,
    FedAvgSpec,
    FedMedianSpec,
    FedProxSpec,
    FedTrimmedAvgSpec,
    KrumSpec,
    StrategySpec,
)
from gptfl.task import LocalSettings
from gptfl.weights import WeightMap


class Strategy(ABC):
    """Turns the average of the silo models into the next global model."""

    name: str = "base"

    def configure_local(self, settings: LocalSettings) -> LocalSettings:
        """The local training settings a silo is sent, from the job's (the one hook).

        Returns ``settings`` changed where this strategy needs it (``dataclasses.replace``),
        every other field as it came: a wrapper calls its inner strategy's hook first.
        """
        return settings

    def round_fold(self, setup: RoundSetup) -> RoundFold:
        """How a round folds the silos' updates (the sample-weighted running sum by default).

        A wrapper can replace or wrap the fold (clip each update before it folds), a robust
        strategy can keep every update and reduce them at the close.
        """
        model = setup.global_model
        return WeightedMeanFold(
            model.weights, model.manifest.specs, max_total_weight=setup.claims.max_total_weight
        )

    def privacy_spent(self) -> dict[str, Any]:
        """What a privacy wrapper has spent on the aggregate so far ({} without one)."""
        return {}

    @abstractmethod
    def apply(self, global_weights: Mapping[str, torch.Tensor], average: WeightMap) -> WeightMap:
        """The next global model from the current one and the silos' weighted average."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Optimizer state to checkpoint (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(state)[:3]}")


class StrategyWrapper(Strategy):
    """A strategy around another: everything passes through to ``inner`` unless overridden.

    Subclasses override what they change and call ``self.inner`` for the rest, so wrappers
    stack (``DpWrapper(ClipWrapper(FedAdam(...)))``) and each keeps the others' changes.
    Checkpointed state is the inner strategy's, under ``inner/``, beside the wrapper's own.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name = f"{type(self).__name__}({inner.name})"

    def configure_local(self, settings: LocalSettings) -> LocalSettings:
        return self.inner.configure_local(settings)

    def round_fold(self, setup: RoundSetup) -> RoundFold:
        return self.inner.round_fold(setup)

    def privacy_spent(self) -> dict[str, Any]:
        return self.inner.privacy_spent()

    def apply(self, global_weights: Mapping[str, torch.Tensor], average: WeightMap) -> WeightMap:
        return self.inner.apply(global_weights, average)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapper's own state (none by default)."""
        return {}

    def load_own_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(state)[:3]}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        inner = {f"inner/{k}": v for k, v in self.inner.state_dict().items()}
        return {**self.own_state_dict(), **inner}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        inner = {k.removeprefix("inner/"): v for k, v in state.items() if k.startswith("inner/")}
        self.inner.load_state_dict(inner)
        self.load_own_state_dict({k: v for k, v in state.items() if not k.startswith("inner/")})


def _cast_like(
    global_weights: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
) -> WeightMap:
    """The new values in the global model's dtypes; tensors that were not averaged are kept."""
    return {
        name: new[name].to(t.dtype) if name in new else t.clone()
        for name, t in global_weights.items()
    }


class FedAvg(Strategy):
    """The next global model is the sample-weighted average (McMahan et al. 2017)."""

    name = "fedavg"

    def apply(self, global_weights: Mapping[str, torch.Tensor], average: WeightMap) -> WeightMap:
        return _cast_like(global_weights, average)


class FedProx(FedAvg):
    """FedAvg on the server; the silos add ``mu/2 ||w - w_global||^2`` (Li et al. 2020)."""

    name = "fedprox"

    def __init__(self, proximal_mu: float) -> None:
        self.proximal_mu = proximal_mu

    def configure_local(self, settings: LocalSettings) -> LocalSettings:
        return dataclasses.replace(settings, proximal_mu=self.proximal_mu)


class FedMedian(FedAvg):
    """The next global model is the coordinate-wise median of the silo models."""

    name = "fedmedian"

    def round_fold(self, setup: RoundSetup) -> RoundFold:
        model = setup.global_model
        return MedianFold(model.weights, model.manifest.specs, capacity=len(setup.silos))


class FedTrimmedAvg(FedAvg):
    """The next global model is the coordinate-wise ``beta``-trimmed mean of the silo models."""

    name = "fedtrimmedavg"

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def round_fold(self, setup: RoundSetup) -> RoundFold:
        model = setup.global_model
        return TrimmedMeanFold(
            model.weights, model.manifest.specs, capacity=len(setup.silos), beta=self.beta
        )


class Krum(FedAvg):
    """The next global model is the (multi-)Krum choice among the silo models."""

    name = "krum"

    def __init__(self, *, num_byzantine: int, num_selected: int) -> None:
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected

    def round_fold(self, setup: RoundSetup) -> RoundFold:
        model = setup.global_model
        return KrumFold(
            model.weights,
            model.manifest.specs,
            capacity=len(setup.silos),
            num_byzantine=self.num_byzantine,
            num_selected=self.num_selected,
        )


class _ServerOptimizer(Strategy):
    """Shared bookkeeping of the server-optimizer strategies: named state tensors."""

    def __init__(self) -> None:
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    def _slot(self, slot: str, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        table = self._state.setdefault(slot, {})
        if name not in table:
            table[name] = torch.full_like(like, fill, dtype=torch.float32)
        return table[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{slot}/{name}": t for slot, table in self._state.items() for name, t in table.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = {}
        for key, tensor in state.items():
            slot, _, name = key.partition("/")
            self._state.setdefault(slot, {})[name] = tensor.to(torch.float32).clone()

    def apply(self, global_weights: Mapping[str, torch.Tensor], average: WeightMap) -> WeightMap:
        updated: WeightMap = {}
        for name, avg in average.items():
            current = global_weights[name].to(torch.float32)
            delta = avg.to(torch.float32) - current
            updated[name] = current + self._step(name, delta)
        return _cast_like(global_weights, updated)

    @abstractmethod
    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The change to apply to tensor ``name`` given this round's ``delta``."""


class FedAvgM(_ServerOptimizer):
    name = "fedavgm"

    def __init__(self, *, server_learning_rate: float, server_momentum: float) -> None:
        super().__init__()
        self.lr = server_learning_rate
        self.momentum = server_momentum

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        velocity = self._slot("velocity", name, delta)
        velocity.mul_(self.momentum).add_(delta)
        return self.lr * velocity


class _Adaptive(_ServerOptimizer):
    def __init__(
        self, *, server_learning_rate: float, beta1: float, beta2: float, tau: float
    ) -> None:
        super().__init__()
        self.lr = server_learning_rate
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        m = self._slot("m", name, delta)
        v = self._slot("v", name, delta, fill=self._initial_v())
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        self._update_v(v, delta * delta)
        return self.lr * m / (v.sqrt() + self.tau)

    def _initial_v(self) -> float:
        # Reddi et al. initialise v to tau^2 so the first step is bounded.
        return self.tau * self.tau

    @abstractmethod
    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None: ...


class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)


class FedAdam(_Adaptive):
    name = "fedadam"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1 - self.beta2)


class FedYogi(_Adaptive):
    name = "fedyogi"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.sub_((1 - self.beta2) * delta_sq * torch.sign(v - delta_sq))


def build_strategy(spec: StrategySpec) -> Strategy:
    """The strategy a job spec names, with its settings."""
    match spec:
        case FedAvgSpec():
            return FedAvg()
        case FedProxSpec():
            return FedProx(spec.proximal_mu)
        case FedAvgMSpec():
            return FedAvgM(
                server_learning_rate=spec.server_learning_rate,
                server_momentum=spec.server_momentum,
            )
        case AdaptiveSpec():
            adaptive = {
                "server_learning_rate": spec.server_learning_rate,
                "beta1": spec.beta1,
                "beta2": spec.beta2,
                "tau": spec.tau,
            }
            optimizers: dict[str, Callable[..., Strategy]] = {
                "fedadam": FedAdam,
                "fedyogi": FedYogi,
                "fedadagrad": FedAdagrad,
            }
            return optimizers[spec.name](**adaptive)
        case FedMedianSpec():
            return FedMedian()
        case FedTrimmedAvgSpec():
            return FedTrimmedAvg(spec.beta)
        case KrumSpec():
            return Krum(num_byzantine=spec.num_byzantine, num_selected=spec.num_selected)
    raise AssertionError(f"unhandled strategy {spec}")  # the spec's union forbids this
