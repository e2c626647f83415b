"""What a round's uploads must look like, and how an accepted one is folded in.

The update intake (:mod:`coordinator.update_intake`, on gRPC threads) never decides this
itself: it asks the round's :class:`RoundFold`. Plain rounds fold each silo model into a
sample-weighted exact sum (:class:`WeightedMeanFold`); a secure-aggregation round expects
masked integer vectors of its own layout and folds them modulo its ring; a robust strategy
keeps every update until the round closes (:mod:`coordinator.robust_folds`). Whatever the
fold, the strategy is handed the same thing at the close: the round's aggregate of the silo
models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from coordinator.aggregation import ExactSum
from gptfl.fleet_messages import UpdateHeader
from gptfl.weights import TensorSpec, WeightMap


class RoundFold(ABC):
    """One round's accumulator of accepted updates (thread-safe: uploads fold concurrently)."""

    @property
    @abstractmethod
    def expected(self) -> tuple[TensorSpec, ...]:
        """The tensors an upload must hold: names, shapes and dtypes, in manifest order."""

    @property
    def integer_payload(self) -> bool:
        """True when uploads are integer tensors (masked fixed-point values) that the
        strategy never sees one by one; False (the default) when they are model weights,
        whose floating-point tensors must be finite."""
        return False

    def check(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        """Raises a :class:`gptfl.errors.GptflError` if this verified update cannot be folded
        (nothing by default). Called before the update's task closes, so a refusal leaves the
        task open and the fold untouched."""
        return None  # a hook: most folds take whatever passed verification

    @abstractmethod
    def fold(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        """Folds one verified, checked update in with weight ``header.num_examples``;
        ``weights`` may be views into a reused buffer, so nothing may keep a reference to
        them."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates folded in so far."""

    @property
    @abstractmethod
    def total_examples(self) -> int:
        """The sample counts of the folded updates, summed."""

    @abstractmethod
    def average(self) -> WeightMap:
        """The round's sample-weighted average of the silo models (floating-point tensors
        only). Called once, when the round closes; the fold takes no update after it."""


class WeightedMeanFold(RoundFold):
    """FedAvg's fold: ``sum(n_i * w_i)`` and ``sum(n_i)`` as updates arrive, in one exact
    fixed-point accumulator whatever the number of silos
    (:class:`coordinator.aggregation.ExactSum`): the round's average is bit-identical
    whatever order the updates arrive in."""

    def __init__(
        self,
        global_weights: Mapping[str, torch.Tensor],
        expected: tuple[TensorSpec, ...],
        *,
        max_total_weight: int,
    ):
        self._sum = ExactSum(global_weights, max_total_weight=max_total_weight)
        self._expected = expected

    @property
    def expected(self) -> tuple[TensorSpec, ...]:
        return self._expected

    def check(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        self._sum.check(weights)

    def fold(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        self._sum.add(weights, header.num_examples)

    @property
    def count(self) -> int:
        return self._sum.count

    @property
    def total_examples(self) -> int:
        return self._sum.total_examples

    def average(self) -> WeightMap:
        return self._sum.mean()
