"""Fixed point in the ring: the error bound, the headroom, the refusal of a ring too small."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl.errors import ConfigError, NonFiniteError, SecureAggregationError
from gptfl.secagg.quantization import FixedPoint, sample_weights
from gptfl.secagg.ring import Ring


@st.composite
def quantizers(draw: st.DrawFn) -> FixedPoint:
    max_inputs = draw(st.integers(1, 300))
    bits = draw(st.integers(8 + math.ceil(math.log2(max_inputs + 1)), 53))
    clip = draw(st.floats(1e-3, 1e3))
    return FixedPoint(Ring(bits), clip, max_inputs)


@settings(max_examples=200, deadline=None)
@given(quantizer=quantizers(), data=st.data())
def test_a_dequantized_sum_is_within_the_bound_of_the_clipped_weighted_sum(
    quantizer: FixedPoint, data: st.DataObject
) -> None:
    count = data.draw(st.integers(1, min(quantizer.max_inputs, 12)))
    length = data.draw(st.integers(1, 30))
    c = quantizer.clip_range
    values = [
        np.array(
            data.draw(st.lists(st.floats(-3 * c, 3 * c), min_size=length, max_size=length)),
            dtype=np.float64,
        )
        for _ in range(count)
    ]
    weights = [data.draw(st.floats(1e-3, 1.0)) for _ in range(count)]
    ring = quantizer.ring
    total = ring.zeros(length)
    for vector, weight in zip(values, weights, strict=True):
        quantized = quantizer.quantize(vector, weight=weight)
        assert quantized.dtype == ring.dtype
        assert int(quantized.max()) <= quantizer.levels
        ring.add_into(total, quantized)
    exact = sum(np.clip(v, -c, c) * w for v, w in zip(values, weights, strict=True))
    error = np.abs(quantizer.dequantize_sum(total, count=count) - exact)
    assert error.max() <= quantizer.error_bound(count)


def test_the_sum_of_the_most_inputs_at_the_top_of_the_range_does_not_wrap() -> None:
    quantizer = FixedPoint(Ring(16), 1.0, 100)
    top = quantizer.quantize(np.full(4, 5.0))  # clipped to +clip_range: the largest level
    assert int(top[0]) == quantizer.levels
    total = quantizer.ring.zeros(4)
    for _ in range(100):
        quantizer.ring.add_into(total, top)
    assert int(total[0]) == 100 * quantizer.levels < 2**16
    np.testing.assert_allclose(quantizer.dequantize_sum(total, count=100), 100.0)
    # One more input could wrap, so the quantizer refuses to read such a sum.
    with pytest.raises(SecureAggregationError, match="room for 1 to 100"):
        quantizer.dequantize_sum(total, count=101)


def test_a_ring_too_small_for_the_silos_is_refused_with_the_bits_that_would_do() -> None:
    with pytest.raises(
        ConfigError, match=r"bits 16 leave 65 levels per silo for 1000 silos.*bits >= 18"
    ):
        FixedPoint(Ring(16), 1.0, 1000)
    FixedPoint(Ring(18), 1.0, 1000)  # what the message asks for is enough


@pytest.mark.parametrize("bits", [7, 54, 64])
def test_a_ring_width_outside_the_range_is_refused(bits: int) -> None:
    with pytest.raises(ConfigError, match="bits must be an integer in"):
        Ring(bits)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.inf, math.nan])
def test_a_bad_clip_range_is_refused(clip: float) -> None:
    with pytest.raises(ConfigError, match="clip_range"):
        FixedPoint(Ring(32), clip, 4)


def test_non_finite_values_are_refused() -> None:
    quantizer = FixedPoint(Ring(32), 1.0, 4)
    with pytest.raises(NonFiniteError):
        quantizer.quantize(np.array([0.0, math.nan]))
    with pytest.raises(ValueError, match="weight"):
        quantizer.quantize(np.zeros(2), weight=0.0)


def test_sample_weights_are_counts_over_the_largest() -> None:
    assert sample_weights({"a": 50, "b": 200, "c": 100}) == {"a": 0.25, "b": 1.0, "c": 0.5}
    with pytest.raises(ValueError, match="positive"):
        sample_weights({"a": 0})
