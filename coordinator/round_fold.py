"""What a round's uploads must look like, and how an accepted one is folded in.

The update intake (:mod:`coordinator.update_intake`, on gRPC threads) never decides this
itself: it asks the round's :class:`RoundFold`. Plain rounds fold each silo model into a
sample-weighted running sum (:class:`WeightedMeanFold`); a secure-aggregation round expects
masked integer vectors of its own layout and folds them modulo its ring; a robust strategy
keeps every update until the round closes. Whatever the fold, the strategy is handed the
same thing at the close: the round's average of the silo models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from coordinator.aggregation import RunningSum
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
        """Raises a :class:`gptfl.errors.GptflError` when this verified update cannot be
        folded (a masked input the round refuses); by default every one that matches
        :attr:`expected` can. Called just before :meth:`fold`, under the same lock."""
        return None

    @abstractmethod
    def fold(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        """Folds one verified update in; ``weights`` may be views into a reused buffer, so
        nothing may keep a reference to them."""

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
    """FedAvg's fold: ``sum(n_i * w_i)`` and ``sum(n_i)`` as updates arrive, one model-sized
    accumulator whatever the number of silos (:class:`coordinator.aggregation.RunningSum`)."""

    def __init__(
        self, global_weights: Mapping[str, torch.Tensor], expected: tuple[TensorSpec, ...]
    ):
        self._sum = RunningSum(global_weights)
        self._expected = expected

    @property
    def expected(self) -> tuple[TensorSpec, ...]:
        return self._expected

    def fold(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        self._sum.add(weights, header.num_examples)

    @property
    def count(self) -> int:
        return self._sum.count

    @property
    def total_examples(self) -> int:
        return self._sum.total_examples

    def average(self) -> WeightMap:
        return self._sum.mean(in_place=True)  # the round takes no more updates
