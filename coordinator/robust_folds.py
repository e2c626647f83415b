"""Robust aggregation: folds that keep every update of a round and reduce them at its close.

A mean lets one silo move the model anywhere; these reductions bound what a minority can do:

- :class:`MedianFold`: the coordinate-wise median (Yin et al. 2018; Flower's FedMedian);
- :class:`TrimmedMeanFold`: per coordinate, drop the ``floor(beta * n)`` largest and smallest
  values and average the rest (Yin et al. 2018; Flower's FedTrimmedAvg);
- :class:`KrumFold`: (multi-)Krum (Blanchard et al. 2017; Flower's Krum): score each update
  by the summed squared distances to its ``n - f - 2`` nearest others, average the
  ``num_selected`` best by sample count.

Median and trimmed mean ignore the sample counts (a silo's claim cannot buy it weight);
Krum's average of the selected updates uses them, bounded as for FedAvg.

**Memory.** Each fold keeps a float32 copy of every accepted update's floating-point tensors:
``N`` model copies for ``N`` updates, against the one accumulator of FedAvg's
:class:`coordinator.round_fold.WeightedMeanFold`. At the close, the coordinate-wise folds
sort ``N`` values at a time over column blocks (temporaries of about ``SORT_VALUES`` values);
Krum computes the ``N (N - 1) / 2`` pairwise distances block by block (no extra copies) and
sums the selected updates one tensor at a time in float64.

**Order.** The result never depends on the order the updates arrived in: sorting along the
update axis, pairwise distances (``(a - b)^2 == (b - a)^2`` exactly) and Krum's choice (ties
broken by sample count, then by content) see only the set of updates, and every sum runs in
an order fixed by the values.
"""

from __future__ import annotations

import functools
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping

import torch

from coordinator.round_fold import RoundFold
from gptfl.errors import ValidationError
from gptfl.fleet_messages import UpdateHeader
from gptfl.weights import TensorSpec, WeightMap

#: values per sorting step at the close (a block of columns times the number of updates)
SORT_VALUES = 1 << 20
#: values per step of a pairwise distance (at most torch's 32768-value grain: each step
#: runs on the calling thread)
DISTANCE_BLOCK = 1 << 15

Update = tuple[dict[str, torch.Tensor], int]
#: reduces an ascending ``[count, columns]`` block of values to one value per column
SortedReduction = Callable[[torch.Tensor], torch.Tensor]


class KeptUpdates(RoundFold):
    """Keeps every update's floating-point tensors (float32 copies) until the round closes;
    subclasses reduce them (thread-safe)."""

    def __init__(
        self,
        global_weights: Mapping[str, torch.Tensor],
        expected: tuple[TensorSpec, ...],
        *,
        capacity: int,
    ) -> None:
        """Args:
        global_weights: the round's global model (its floating-point tensors are reduced).
        expected: what an upload must hold.
        capacity: the most updates the round can bring (one per selected silo).
        """
        self._names = [name for name, t in global_weights.items() if t.is_floating_point()]
        self._shapes = {name: global_weights[name].shape for name in self._names}
        self._expected = expected
        self._capacity = capacity
        self._updates: list[Update] = []
        self._examples = 0
        self._finished = False
        self._lock = threading.Lock()

    @property
    def expected(self) -> tuple[TensorSpec, ...]:
        return self._expected

    def fold(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        kept = {name: weights[name].to(torch.float32, copy=True) for name in self._names}
        with self._lock:
            if self._finished:
                raise RuntimeError("this round's updates were already reduced")
            if len(self._updates) >= self._capacity:
                raise ValidationError(f"the round takes at most {self._capacity} updates")
            self._updates.append((kept, header.num_examples))
            self._examples += header.num_examples

    @property
    def count(self) -> int:
        return len(self._updates)

    @property
    def total_examples(self) -> int:
        return self._examples

    def average(self) -> WeightMap:
        """The reduction of the kept updates; they are dropped as it returns."""
        with self._lock:
            self._finished = True
            updates, self._updates = self._updates, []
        if not updates:
            raise ValidationError("no updates were aggregated")
        return self._reduce(updates)

    @abstractmethod
    def _reduce(self, updates: list[Update]) -> WeightMap:
        """The round's aggregate of ``updates`` (float32 tensors, one per kept name)."""

    def _per_coordinate(self, updates: list[Update], reduce_sorted: SortedReduction) -> WeightMap:
        """Applies ``reduce_sorted`` to each block of columns, its values sorted along the
        update axis (``[count, columns]``, ascending)."""
        result: WeightMap = {}
        for name in self._names:
            out = torch.empty(self._shapes[name], dtype=torch.float32)
            target = out.view(-1)
            for start, block in _column_blocks(updates, name):
                ordered = torch.sort(block, dim=0).values
                target[start : start + block.shape[1]].copy_(reduce_sorted(ordered))
            result[name] = out
        return result


def _column_blocks(updates: list[Update], name: str) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first column, [count, columns] block)`` over tensor ``name`` of every update."""
    count = len(updates)
    numel = updates[0][0][name].numel()
    columns = max(1, SORT_VALUES // count)
    for start in range(0, numel, columns):
        yield (
            start,
            torch.stack([kept[name].view(-1)[start : start + columns] for kept, _ in updates]),
        )


def _median_of_sorted(ordered: torch.Tensor) -> torch.Tensor:
    """The median of each column of an ascending ``[count, columns]`` block; with an even
    count the mean of the two middle values, in float64 and rounded once (as numpy's)."""
    count = ordered.shape[0]
    middle = count // 2
    if count % 2:
        return ordered[middle]
    return (ordered[middle - 1].double() + ordered[middle].double()) / 2


class MedianFold(KeptUpdates):
    """The coordinate-wise median of the round's updates."""

    def _reduce(self, updates: list[Update]) -> WeightMap:
        return self._per_coordinate(updates, _median_of_sorted)


class TrimmedMeanFold(KeptUpdates):
    """Per coordinate, the mean of the values left once the ``floor(beta * count)`` largest
    and as many smallest are dropped."""

    def __init__(
        self,
        global_weights: Mapping[str, torch.Tensor],
        expected: tuple[TensorSpec, ...],
        *,
        capacity: int,
        beta: float,
    ) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        super().__init__(global_weights, expected, capacity=capacity)
        self.beta = beta

    def _reduce(self, updates: list[Update]) -> WeightMap:
        cut = int(self.beta * len(updates))

        def trimmed_mean(ordered: torch.Tensor) -> torch.Tensor:
            kept = ordered[cut : ordered.shape[0] - cut].double()
            return kept.sum(dim=0) / kept.shape[0]

        return self._per_coordinate(updates, trimmed_mean)


class KrumFold(KeptUpdates):
    """(Multi-)Krum: the ``num_selected`` updates closest to their neighbours, averaged by
    sample count (Krum itself with ``num_selected`` 1: that one update)."""

    def __init__(
        self,
        global_weights: Mapping[str, torch.Tensor],
        expected: tuple[TensorSpec, ...],
        *,
        capacity: int,
        num_byzantine: int,
        num_selected: int,
    ) -> None:
        if num_byzantine < 0 or num_selected < 1:
            raise ValueError("num_byzantine must be >= 0 and num_selected >= 1")
        super().__init__(global_weights, expected, capacity=capacity)
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected
        #: the scores of the last reduction, by position in the chosen order (for tests, logs)
        self.last_scores: list[float] = []

    def scores(self, updates: list[Update]) -> list[float]:
        """Each update's Krum score: the sum of its ``max(1, n - f - 2)`` smallest squared
        distances to the other updates (0 for a lone update)."""
        count = len(updates)
        distances = [[0.0] * count for _ in range(count)]
        for i in range(count):
            for j in range(i + 1, count):
                distances[i][j] = distances[j][i] = self._squared_distance(
                    updates[i][0], updates[j][0]
                )
        nearest = min(count - 1, max(1, count - self.num_byzantine - 2))
        return [
            sum(sorted(distances[i][j] for j in range(count) if j != i)[:nearest])
            for i in range(count)
        ]

    def _squared_distance(
        self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]
    ) -> float:
        total = 0.0
        for name in self._names:
            left, right = a[name].view(-1), b[name].view(-1)
            for start in range(0, left.numel(), DISTANCE_BLOCK):
                diff = left[start : start + DISTANCE_BLOCK].double()
                diff.sub_(right[start : start + DISTANCE_BLOCK])
                total += float(diff.square_().sum())
        return total

    def _reduce(self, updates: list[Update]) -> WeightMap:
        scores = self.scores(updates)

        def compare(i: int, j: int) -> int:
            if scores[i] != scores[j]:
                return -1 if scores[i] < scores[j] else 1
            if updates[i][1] != updates[j][1]:
                return -1 if updates[i][1] < updates[j][1] else 1
            return self._compare_content(updates[i][0], updates[j][0])

        order = sorted(range(len(updates)), key=functools.cmp_to_key(compare))
        chosen = order[: self.num_selected]
        self.last_scores = [scores[i] for i in order]
        if len(chosen) == 1:
            return dict(updates[chosen[0]][0])
        total = sum(updates[i][1] for i in chosen)
        mean: WeightMap = {}
        for name in self._names:
            acc = torch.zeros(self._shapes[name], dtype=torch.float64)
            for i in chosen:  # in the chosen order: fixed by the values, not by arrival
                kept, weight = updates[i]
                acc.add_(kept[name].double(), alpha=weight)
            mean[name] = acc.div_(total).to(torch.float32)
        return mean

    def _compare_content(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> int:
        """Orders two updates by their first differing value (0 when identical: then either
        may go first, with the same result)."""
        for name in self._names:
            left, right = a[name].view(-1), b[name].view(-1)
            differ = torch.nonzero(left != right)
            if differ.numel():
                first = int(differ[0, 0])
                return -1 if float(left[first]) < float(right[first]) else 1
        return 0
