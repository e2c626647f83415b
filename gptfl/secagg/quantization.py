"""Fixed point in the ring ``Z_{2^bits}``, with the headroom that keeps a sum from wrapping.

A silo clips each value of its (weighted) update to ``[-clip_range, clip_range]`` and maps it
to one of ``levels + 1`` integers ``0 .. levels``, with ``levels = floor((2^bits - 1) /
max_inputs)``. A sum of at most ``max_inputs`` such integers is then at most ``2^bits - 1``:
it never wraps, so the unmasked sum in the ring is the true integer sum, and dequantizing it
gives the sum of the clipped values to within ``count * step / 2`` per element.

The clipping is the silo's: with masking the coordinator can no longer bound one update, so
the silo enforces the range before it masks (docs/secure-aggregation.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gptfl.errors import ConfigError, NonFiniteError, SecureAggregationError
from gptfl.secagg.ring import Ring, RingVector

#: the coarsest quantization accepted: at least 2^8 levels per silo
MIN_LEVEL_BITS = 8
# Float64 rounding in quantize/dequantize adds at most this much (times clip_range) per
# input to the rounding error of half a step; see error_bound.
_FLOAT_SLACK = 2.0**-48
_BLOCK = 1 << 16


@dataclass(frozen=True)
class FixedPoint:
    """The quantizer of one job: a ring, a clipping range and the most inputs ever summed.

    Attributes:
        ring: the ring the values live in.
        clip_range: values are clipped to ``[-clip_range, clip_range]`` before quantizing.
        max_inputs: the most silos whose values are summed (a round never selects more).

    Raises:
        ConfigError: a clip range that is not a positive finite number, ``max_inputs < 1``,
            or a ring too small for ``max_inputs`` silos at :data:`MIN_LEVEL_BITS` each (the
            message says which bits would do).
    """

    ring: Ring
    clip_range: float
    max_inputs: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(
                f"secure aggregation clip_range must be a positive number, got {self.clip_range}"
            )
        if isinstance(self.max_inputs, bool) or self.max_inputs < 1:
            raise ConfigError(
                f"secure aggregation max_silos must be a positive integer, got {self.max_inputs}"
            )
        if self.levels < 1 << MIN_LEVEL_BITS:
            need = MIN_LEVEL_BITS + math.ceil(math.log2(self.max_inputs + 1))
            raise ConfigError(
                f"secure aggregation bits {self.ring.bits} leave {self.levels} levels per silo "
                f"for {self.max_inputs} silos (fewer would wrap the ring's sum); need "
                f"bits >= {need} or fewer silos"
            )

    @property
    def levels(self) -> int:
        """The largest integer one input quantizes to (its values are ``0 .. levels``)."""
        return (self.ring.modulus - 1) // self.max_inputs

    @property
    def step(self) -> float:
        """The value of one quantization level."""
        return 2.0 * self.clip_range / self.levels

    def quantize(self, values: npt.NDArray[np.floating], *, weight: float = 1.0) -> RingVector:
        """Clips ``values``, scales them by ``weight`` and rounds them to the nearest level.

        Args:
            values: a flat vector of finite floats.
            weight: the input's share in a weighted sum, in ``(0, 1]`` (see
                :func:`sample_weights`); applied after clipping, so the result stays in range.

        Returns:
            The quantized vector in the ring.

        Raises:
            NonFiniteError: a value is NaN or infinite.
            ValueError: ``weight`` is outside ``(0, 1]``.
        """
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        c = self.clip_range
        scale, offset = weight / self.step, c / self.step
        out = np.empty(len(values), dtype=self.ring.dtype)
        # A block at a time, so each value is worked on while it is in the CPU's cache (a
        # model-sized float64 vector per step would be memory-bound).
        for start in range(0, len(values), _BLOCK):
            x = np.array(values[start : start + _BLOCK], dtype=np.float64)
            if not np.isfinite(x).all():
                raise NonFiniteError("an update to quantize holds NaN or infinite values")
            np.clip(x, -c, c, out=x)
            x *= scale  # (x * weight + c) / step
            x += offset
            np.rint(x, out=x)
            np.clip(x, 0, self.levels, out=x)  # float rounding never leaves the range
            out[start : start + len(x)] = x
        return out

    def dequantize_sum(self, total: RingVector, *, count: int) -> npt.NDArray[np.float64]:
        """The sum of ``count`` inputs' clipped, weighted values from the sum of their levels.

        Raises:
            SecureAggregationError: ``count`` is below 1 or above ``max_inputs`` (such a sum
                could have wrapped).
        """
        if not 1 <= count <= self.max_inputs:
            raise SecureAggregationError(
                f"a sum of {count} inputs cannot be dequantized: the ring has room for "
                f"1 to {self.max_inputs}"
            )
        out = total.astype(np.float64)
        out *= self.step
        out -= count * self.clip_range
        return out

    def error_bound(self, count: int) -> float:
        """The most :meth:`dequantize_sum` of ``count`` inputs can differ, per element, from
        the exact sum of the inputs' clipped and weighted values."""
        return count * (self.step / 2 + self.clip_range * _FLOAT_SLACK)


def sample_weights(num_examples: Mapping[str, int]) -> dict[str, float]:
    """Each silo's weight in a sample-weighted sum: its count over the largest count.

    The weights are at most 1, so weighted values stay within the clipping range; the
    coordinator divides the unmasked sum by the survivors' weights summed, which gives
    FedAvg's average ``sum(n_i x_i) / sum(n_i)``.

    Raises:
        ValueError: no counts, or a count that is not positive.
    """
    if not num_examples:
        raise ValueError("no sample counts to weight")
    if any(n <= 0 for n in num_examples.values()):
        raise ValueError("sample counts must be positive")
    largest = max(num_examples.values())
    return {silo: n / largest for silo, n in num_examples.items()}
