"""Shamir sharing of 32-byte secrets: any threshold of shares recovers, fewer fail cleanly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl.errors import BelowThresholdError, SecureAggregationError
from gptfl.secagg import shamir
from gptfl.secagg.shamir import Share


@settings(max_examples=200, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    holders=st.integers(1, 12),
    data=st.data(),
)
def test_any_threshold_of_shares_recovers_the_secret(
    secret: bytes, holders: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(1, holders))
    points = data.draw(
        st.lists(st.integers(1, 2**32 - 1), min_size=holders, max_size=holders, unique=True)
    )
    shares = shamir.split(secret, threshold=threshold, points=points)
    assert [s.x for s in shares] == points
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(threshold, holders))]
    assert shamir.reconstruct(subset, threshold=threshold) == secret


def test_fewer_shares_than_the_threshold_fail_cleanly() -> None:
    shares = shamir.split(bytes(range(32)), threshold=3, points=[1, 2, 3, 4])
    with pytest.raises(BelowThresholdError, match="2 share"):
        shamir.reconstruct(shares[:2], threshold=3)
    # The same share twice counts once.
    with pytest.raises(BelowThresholdError, match="2 share"):
        shamir.reconstruct([shares[0], shares[0], shares[1]], threshold=3)


def test_below_the_threshold_the_shares_look_alike_for_any_secret() -> None:
    # threshold - 1 shares at fixed points: their values are uniform whatever the secret,
    # so two very different secrets give share values of the same spread.
    a = [shamir.split(bytes(32), threshold=2, points=[1, 2])[0].y for _ in range(200)]
    b = [shamir.split(b"\xff" * 32, threshold=2, points=[1, 2])[0].y for _ in range(200)]
    for values in (a, b):
        top_bits = [v >> 519 for v in values]  # the top two bits of a 521-bit field element
        assert {0, 1, 2, 3} >= set(top_bits) and len(set(top_bits)) >= 3


def test_a_share_of_another_secret_is_detected_among_extra_shares() -> None:
    first = shamir.split(b"a" * 32, threshold=2, points=[1, 2, 3])
    second = shamir.split(b"b" * 32, threshold=2, points=[1, 2, 3])
    with pytest.raises(SecureAggregationError, match="point 3 is not of the same secret"):
        shamir.reconstruct([first[0], first[1], second[2]], threshold=2)
    with pytest.raises(SecureAggregationError, match="two different shares at point 1"):
        shamir.reconstruct([first[0], second[0], first[1]], threshold=2)


def test_bad_splits_and_shares_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split(b"short", threshold=1, points=[1])
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(bytes(32), threshold=1, points=[1, 1])
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(bytes(32), threshold=3, points=[1, 2])
    with pytest.raises(SecureAggregationError, match="point"):
        Share(0, 1)
    with pytest.raises(SecureAggregationError, match="outside the field"):
        Share(1, shamir.PRIME)
    with pytest.raises(SecureAggregationError, match="66 bytes"):
        Share.from_value_bytes(1, b"\x00")
    share = shamir.split(bytes(32), threshold=1, points=[7])[0]
    assert Share.from_value_bytes(7, share.value_bytes()) == share
