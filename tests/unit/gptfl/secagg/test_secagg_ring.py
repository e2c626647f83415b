"""The ring: modular arithmetic in machine words, and the wire form's checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptfl.errors import ManifestMismatchError, SecureAggregationError
from gptfl.secagg.ring import Ring


@given(
    bits=st.integers(8, 53),
    pairs=st.lists(st.tuples(st.integers(0, 2**53), st.integers(0, 2**53)), min_size=1),
)
def test_add_and_subtract_are_modulo_two_to_the_bits(
    bits: int, pairs: list[tuple[int, int]]
) -> None:
    ring = Ring(bits)
    m = ring.modulus
    a = np.array([x % m for x, _ in pairs], dtype=ring.dtype)
    b = np.array([y % m for _, y in pairs], dtype=ring.dtype)
    total = a.copy()
    ring.add_into(total, b)
    assert total.tolist() == [(x % m + y % m) % m for x, y in pairs]
    ring.subtract_into(total, b)
    ring.subtract_into(total, b)
    assert total.tolist() == [(x % m - y % m) % m for x, y in pairs]


@pytest.mark.parametrize(("bits", "wire"), [(16, np.int32), (32, np.int32), (33, np.int64)])
def test_vectors_travel_as_signed_integers_of_their_width(bits: int, wire: type) -> None:
    ring = Ring(bits)
    vector = np.array([0, 1, ring.modulus - 1], dtype=ring.dtype)
    on_wire = ring.to_wire(vector)
    assert on_wire.dtype == wire
    np.testing.assert_array_equal(ring.from_wire(on_wire, length=3, what="v"), vector)


def test_the_wire_form_is_checked() -> None:
    ring = Ring(20)
    with pytest.raises(ManifestMismatchError, match="v has dtype int64, expected int32"):
        ring.from_wire(np.zeros(3, dtype=np.int64), length=3, what="v")
    with pytest.raises(ManifestMismatchError, match=r"shape \(2,\), expected \(3,\)"):
        ring.from_wire(np.zeros(2, dtype=np.int32), length=3, what="v")
    with pytest.raises(SecureAggregationError, match="outside the ring of 2\\^20"):
        ring.from_wire(np.array([0, 1 << 20, 0], dtype=np.int32), length=3, what="v")
    with pytest.raises(SecureAggregationError, match="outside the ring"):
        ring.from_wire(np.array([-1, 0, 0], dtype=np.int32), length=3, what="v")
