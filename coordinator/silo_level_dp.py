"""Silo-level differential privacy on the aggregate: DP-FedAvg (McMahan et al. 2018).

The guarantee covers all of one institution's data: whatever one silo sends, the released
global model changes little in distribution. :class:`SiloLevelDp` wraps any strategy:

- each round's fold (:class:`ClippedUpdateFold`) clips every silo's update
  ``delta_i = w_i - w_global`` to ``clip_norm`` (L2 over all floating-point tensors), sums
  the clipped updates with equal weight (a silo's sample count would otherwise be a
  sensitivity it controls), divides by the number of silos *selected* for the round (a fixed
  denominator: a silo that drops out cannot raise another's weight), and adds Gaussian noise
  of standard deviation ``noise_multiplier * clip_norm / selected`` to every coordinate;
- the inner strategy then sees ``w_global + noised mean update`` as the round's average, so
  FedAvg, FedProx and the FedOpt family work unchanged;
- an RDP accountant over the rounds released so far, each at its sampling rate
  (selected / connected silos), gives the job's (epsilon, delta).

Sampling is fixed-size without replacement, accounted as Poisson sampling at the same rate,
as is usual for DP-FedAvg (documented in docs/privacy.md).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from typing import Any

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from coordinator.round_fold import RoundFold
from coordinator.round_plan import RoundSetup
from coordinator.strategies import Strategy, StrategyWrapper
from gptfl.fleet_messages import UpdateHeader
from gptfl.job_spec import SiloLevelDpSpec
from gptfl.weights import TensorSpec, WeightMap


def _noise_generator() -> torch.Generator:
    """Noise nobody can predict: seeded from the OS's entropy, never from the job's seed."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class ClippedUpdateFold(RoundFold):
    """Clips each update to ``clip_norm``, sums with equal weight, noises the mean."""

    def __init__(
        self,
        global_weights: Mapping[str, torch.Tensor],
        expected: tuple[TensorSpec, ...],
        *,
        clip_norm: float,
        noise_std: float,
        denominator: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if denominator < 1:
            raise ValueError(f"denominator must be >= 1, got {denominator}")
        self._global = {k: v for k, v in global_weights.items() if v.is_floating_point()}
        self._sums = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in self._global.items()}
        self._expected = expected
        self._clip_norm = clip_norm
        self._noise_std = noise_std
        self._denominator = denominator
        self._generator = generator or _noise_generator()
        self._count = 0
        self._examples = 0
        self.clipped = 0  # updates whose norm exceeded the bound
        self._lock = threading.Lock()

    @property
    def expected(self) -> tuple[TensorSpec, ...]:
        return self._expected

    def fold(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        deltas = {
            k: weights[k].to(torch.float32) - g.to(torch.float32) for k, g in self._global.items()
        }
        norm = math.sqrt(sum(float(d.double().square().sum()) for d in deltas.values()))
        scale = min(1.0, self._clip_norm / norm) if norm > 0 else 1.0
        with self._lock:
            for name, total in self._sums.items():
                total.add_(deltas[name], alpha=scale)
            self._count += 1
            self._examples += header.num_examples
            self.clipped += scale < 1.0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_examples(self) -> int:
        return self._examples

    def average(self) -> WeightMap:
        with self._lock:
            average: WeightMap = {}
            for name, total in self._sums.items():
                noise = torch.randn(total.shape, generator=self._generator, dtype=torch.float32)
                mean_update = total.div_(self._denominator).add_(noise, alpha=self._noise_std)
                average[name] = self._global[name].to(torch.float32) + mean_update
            return average


class SiloLevelDp(StrategyWrapper):
    """DP-FedAvg around ``inner``; keeps the accountant's history in its checkpointed state."""

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        delta: float,
    ) -> None:
        super().__init__(inner)
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        #: (noise multiplier, sampling rate) of each round released so far
        self._history: list[tuple[float, float]] = []
        self._pending_rate: float | None = None

    @classmethod
    def from_spec(
        cls, inner: Strategy, spec: SiloLevelDpSpec, *, rounds: int, planned_rate: float
    ) -> SiloLevelDp:
        """The wrapper a job spec asks for; with ``target_epsilon`` the noise is calibrated
        so the target holds after ``rounds`` rounds at ``planned_rate``."""
        sigma = spec.noise_multiplier
        if sigma is None:
            assert spec.target_epsilon is not None  # the spec's validator guarantees one
            sigma = get_noise_multiplier(
                target_epsilon=spec.target_epsilon,
                target_delta=spec.delta,
                sample_rate=planned_rate,
                steps=rounds,
                accountant="rdp",
            )
        return cls(inner, clip_norm=spec.clip_norm, noise_multiplier=sigma, delta=spec.delta)

    def round_fold(self, setup: RoundSetup) -> RoundFold:
        selected = len(setup.silos)
        self._pending_rate = selected / max(setup.connected, selected)
        model = setup.global_model
        return ClippedUpdateFold(
            model.weights,
            model.manifest.specs,
            clip_norm=self.clip_norm,
            noise_std=self.noise_multiplier * self.clip_norm / selected,
            denominator=selected,
        )

    def apply(self, global_weights: Mapping[str, torch.Tensor], average: WeightMap) -> WeightMap:
        # The noised average is being released: this round is spent.
        self._history.append((self.noise_multiplier, self._pending_rate or 1.0))
        return self.inner.apply(global_weights, average)

    def epsilon(self) -> float:
        """The job's epsilon at :attr:`delta` over the rounds released so far."""
        if not self._history:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(sigma, rate, 1) for sigma, rate in self._history]
        return float(accountant.get_epsilon(self.delta))

    def privacy_spent(self) -> dict[str, Any]:
        return {
            "mechanism": "DP-FedAvg (silo-level)",
            "accountant": "rdp",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "rounds": len(self._history),
            "epsilon": self.epsilon(),
        }

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        return {"dp_history": torch.tensor(self._history, dtype=torch.float64).reshape(-1, 2)}

    def load_own_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        history = state.get("dp_history")
        self._history = (
            [] if history is None else [(float(s), float(q)) for s, q in history.tolist()]
        )
