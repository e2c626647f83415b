"""Sample-weighted sums of silo models.

:class:`ExactSum` is what a round folds FedAvg updates into: ``sum(n_i * w_i)`` in int64
fixed point. Integer addition is associative, so the sum, and the global model made from it,
are bit-identical whatever order the updates arrive in (and however a restarted round
interleaves them). Each accepted update is folded in as it arrives and then dropped, so the
coordinator holds one accumulator (8 bytes per averaged value) whatever the number of silos.

:class:`RunningSum` is the plain float32 running sum the coordinator used before; its result
depends on the order of the additions. It stays for the benches that simulate federations
in one process (bench/gptfl_levers.py) and as the reference the exact sum is measured
against.

**The fixed point.** Per tensor, the range is ``L = 2^e``, where ``2^(e - HEADROOM_BITS)`` is
the smallest power of two at or above the global model's largest magnitude in that tensor
(taken as at least 1: a tensor of zeros may still grow), and the scale
``S = 2^(SUM_BITS - e)``. An update of weight ``n`` adds ``round(w * S * n / T)`` for each
value ``w``, where ``T`` is the most the round's weights can add up to (the selected silos'
bounds, :mod:`coordinator.claims`). With ``|w| <= L`` (checked before the fold) and the
folded weights summing to at most ``T`` (refused otherwise), no accumulator exceeds
``2^SUM_BITS (1 + 2^-52) + count / 2 < 2^63``: it cannot overflow. The mean is the sum times
``T / (S * sum(n))``, rounded once to float32; its quantisation error is at most
``count * T / (2 * S * sum(n))``: with every silo reporting its bound, ``count * 2^(e - 62)``,
which is 2^-42 (2.3e-13) per silo for a tensor whose values are at most 1 in magnitude,
2^11 times below float32's own rounding of a weight of 0.01 (2^-31). Every step is elementwise
(no reductions), so the result is also the same on any machine.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from gptfl.errors import ValidationError, WeightRangeError
from gptfl.weights import WeightMap

#: a tensor's range is this many powers of two above the global model's largest magnitude
HEADROOM_BITS = 20
#: every accumulator stays within 2^SUM_BITS; the two bits up to int64's limit hold the
#: rounding terms
SUM_BITS = 61
#: values converted per step: 512 KiB float64 and int64 temporaries, which stay in cache.
#: The steps run in numpy, one thread: as torch operations on blocks this size each
#: synchronised the intra-op thread pool, several times slower on a loaded machine.
BLOCK = 1 << 16


def _blocks(tensor: torch.Tensor) -> Iterator[tuple[int, np.ndarray]]:
    """``(first index, values)`` over a tensor's values, :data:`BLOCK` at a time, as numpy
    arrays (views where numpy has the dtype; float16 and bfloat16 blocks are converted)."""
    flat = tensor.detach().reshape(-1)
    direct = flat.dtype in (torch.float32, torch.float64, torch.int64)
    whole = flat.numpy() if direct else None
    for start in range(0, flat.numel(), BLOCK):
        if whole is not None:
            yield start, whole[start : start + BLOCK]
        else:
            yield start, flat[start : start + BLOCK].to(torch.float32).numpy()


def _range_exponent(tensor: torch.Tensor) -> int:
    """``e`` such that ``2^(e - HEADROOM_BITS)`` is the smallest power of two at or above the
    tensor's largest magnitude, taken as at least 1."""
    if tensor.numel() == 0:
        return HEADROOM_BITS
    low, high = torch.aminmax(tensor.detach())
    mantissa, exponent = math.frexp(max(-float(low), float(high), 1.0))  # m in [0.5, 1)
    if mantissa == 0.5:  # an exact power of two is its own ceiling
        exponent -= 1
    return exponent + HEADROOM_BITS


class ExactSum:
    """``sum(n_i * w_i)`` and ``sum(n_i)`` over accepted updates, in int64 fixed point
    (thread-safe); the sum does not depend on the order the updates are added in."""

    def __init__(self, template: Mapping[str, torch.Tensor], *, max_total_weight: int) -> None:
        """Args:
        template: the global model; its floating-point tensors are summed (any other
            tensor is not averaged), each with a range set by its largest magnitude.
        max_total_weight: the most the weights of the added updates may sum to.
        """
        if max_total_weight < 1:
            raise ValueError(f"max_total_weight must be >= 1, got {max_total_weight}")
        self._max_total = max_total_weight
        self._exponents = {
            name: _range_exponent(t) for name, t in template.items() if t.is_floating_point()
        }
        self._shapes = {name: template[name].shape for name in self._exponents}
        # allocated at the first update, not when the round opens: the round's memory is
        # then not raised while its silos train (or the last round's checkpoint is written)
        self._sums: dict[str, torch.Tensor] = {}
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

    @property
    def max_total_weight(self) -> int:
        return self._max_total

    def limit(self, name: str) -> float:
        """The largest magnitude tensor ``name`` may hold in an added update."""
        return math.ldexp(1.0, self._exponents[name])

    def check(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Refuses an update whose values lie beyond the range the sum can hold exactly.

        Raises:
            WeightRangeError: a value beyond its tensor's range (named in the message).
        """
        for name in self._exponents:
            tensor = weights[name]
            if tensor.numel() == 0:
                continue
            low, high = torch.aminmax(tensor)
            largest = max(-float(low), float(high))
            if largest > self.limit(name):
                raise WeightRangeError(
                    f"tensor {name!r} holds a value of magnitude {largest:.4g}, beyond the "
                    f"round's aggregation range of {self.limit(name):.4g} (2^{HEADROOM_BITS} "
                    f"times the global model's largest magnitude in it)"
                )

    def add(self, weights: Mapping[str, torch.Tensor], weight: int) -> None:
        """Adds ``weight * weights``; call :meth:`check` first (values beyond the range would
        break the no-overflow guarantee)."""
        if weight <= 0:
            raise ValidationError(f"an update must have a positive weight, got {weight}")
        with self._lock:
            self._check_open()
            if self._total_examples + weight > self._max_total:
                # the claims allow no more (coordinator/claims.py): refused, not wrapped round
                raise ValidationError(
                    f"an update of weight {weight} would take the round's total to "
                    f"{self._total_examples + weight}, above its bound {self._max_total}"
                )
            if not self._sums:
                self._sums = {
                    name: torch.zeros(shape, dtype=torch.int64)
                    for name, shape in self._shapes.items()
                }
            fraction = weight / self._max_total  # rounded once: the same for every order
            scaled = np.empty(BLOCK, dtype=np.float64)
            rounded = np.empty(BLOCK, dtype=np.int64)
            for name, acc in self._sums.items():
                factor = math.ldexp(fraction, SUM_BITS - self._exponents[name])
                target = acc.view(-1).numpy()
                for start, part in _blocks(weights[name]):
                    values, whole = scaled[: part.size], rounded[: part.size]
                    np.multiply(part, factor, out=values, dtype=np.float64)
                    np.rint(values, out=values)
                    np.copyto(whole, values, casting="unsafe")  # exact: an integer < 2^62
                    block = target[start : start + part.size]
                    np.add(block, whole, out=block)
            self._total_examples += weight
            self._count += 1

    def mean(self) -> WeightMap:
        """The weighted average of everything added, in float32; the sum is spent after it
        (each accumulator is freed as soon as its tensor is converted)."""
        with self._lock:
            self._check_open()
            if self._total_examples == 0:
                raise ValidationError("no updates were aggregated")
            self._finished = True
            ratio = self._max_total / self._total_examples
            mean: WeightMap = {}
            scaled = np.empty(BLOCK, dtype=np.float64)
            for name in list(self._sums):
                acc = self._sums.pop(name)
                factor = math.ldexp(ratio, self._exponents[name] - SUM_BITS)
                result = torch.empty(acc.shape, dtype=torch.float32)
                target = result.view(-1).numpy()
                for start, part in _blocks(acc):
                    values = scaled[: part.size]
                    np.multiply(part, factor, out=values, dtype=np.float64)
                    np.copyto(target[start : start + part.size], values, casting="same_kind")
                del acc
                mean[name] = result
            return mean

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("this sum was already averaged")


class RunningSum:
    """Accumulates ``sum(n_i * w_i)`` and ``sum(n_i)`` in float32 (thread-safe); the result
    depends on the order of the additions (see :class:`ExactSum` for one that does not)."""

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
