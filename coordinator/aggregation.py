"""A running, sample-weighted sum of silo models.

Each accepted update is folded in as it arrives and then dropped, so the coordinator holds
one accumulator the size of the model whatever the number of silos. A secure-aggregation
round can hand in an already-summed update with its total sample count through
:meth:`RunningSum.add_sum`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from gptfl.errors import ValidationError
from gptfl.weights import WeightMap


class RunningSum:
    """Accumulates ``sum(n_i * w_i)`` and ``sum(n_i)`` over accepted updates (thread-safe)."""

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        # float32 accumulators (float64 would double memory for little gain at these counts);
        # non-float tensors (step counters and the like) are not averaged.
        self._sums = {
            name: torch.zeros_like(t, dtype=torch.float32)
            for name, t in template.items()
            if t.is_floating_point()
        }
        self._total_examples = 0
        self._count = 0
        self._finished = False
        self._lock = threading.Lock()

    @property
    def total_examples(self) -> int:
        return self._total_examples

    @property
    def count(self) -> int:
        return self._count

    def add(self, weights: Mapping[str, torch.Tensor], num_examples: int) -> None:
        """Folds ``num_examples * weights`` into the sum."""
        if num_examples <= 0:
            raise ValidationError(
                f"an update must report a positive sample count, got {num_examples}"
            )
        with self._lock:
            self._check_open()
            for name, acc in self._sums.items():
                acc.add_(weights[name].to(torch.float32), alpha=float(num_examples))
            self._total_examples += num_examples
            self._count += 1

    def add_sum(
        self, weighted_sum: Mapping[str, torch.Tensor], total_examples: int, count: int
    ) -> None:
        """Folds an already-weighted sum of ``count`` updates (secure aggregation)."""
        with self._lock:
            self._check_open()
            for name, acc in self._sums.items():
                acc.add_(weighted_sum[name].to(torch.float32))
            self._total_examples += total_examples
            self._count += count

    def mean(self, *, in_place: bool = False) -> WeightMap:
        """The sample-weighted average of everything folded in so far.

        ``in_place`` divides the accumulators themselves and hands them out, which saves a
        model-sized allocation when the round closes; the sum is finished after that and
        refuses further updates.
        """
        with self._lock:
            if self._total_examples == 0:
                raise ValidationError("no updates were aggregated")
            if not in_place:
                return {name: acc / self._total_examples for name, acc in self._sums.items()}
            for acc in self._sums.values():
                acc.div_(self._total_examples)
            self._finished = True
            return dict(self._sums)

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("this running sum was already averaged in place")
