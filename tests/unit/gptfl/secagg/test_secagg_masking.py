"""Key agreement, seeds and masks: pairs agree, masks cancel, seeds bind the round and pair."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gptfl.errors import SecureAggregationError
from gptfl.secagg.masking import agree, apply_mask, expand, pairwise_seed, pairwise_sign
from gptfl.secagg.messages import RoundContext
from gptfl.secagg.ring import Ring
from gptfl.secagg.silo_session import public_bytes


def test_two_silos_derive_the_same_seed_and_their_masks_cancel() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    context = RoundContext("job", 3).encode()
    seed_ab = pairwise_seed(a, public_bytes(b), context=context, me="a", peer="b")
    seed_ba = pairwise_seed(b, public_bytes(a), context=context, me="b", peer="a")
    assert seed_ab == seed_ba
    ring = Ring(32)
    x, y = np.arange(100, dtype=np.uint32), np.arange(100, dtype=np.uint32)[::-1].copy()
    masked_x, masked_y = x.copy(), y.copy()
    apply_mask(masked_x, seed_ab, ring, sign=pairwise_sign("a", "b"))
    apply_mask(masked_y, seed_ba, ring, sign=pairwise_sign("b", "a"))
    assert not np.array_equal(masked_x, x)
    total = masked_x.copy()
    ring.add_into(total, masked_y)
    np.testing.assert_array_equal(total, x + y)


def test_seeds_are_bound_to_the_round_and_the_pair() -> None:
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    one = RoundContext("job", 1).encode()
    seed = pairwise_seed(a, public_bytes(b), context=one, me="a", peer="b")
    assert seed != pairwise_seed(
        a, public_bytes(b), context=RoundContext("job", 2).encode(), me="a", peer="b"
    )
    assert seed != pairwise_seed(
        a, public_bytes(b), context=RoundContext("other", 1).encode(), me="a", peer="b"
    )
    assert seed != pairwise_seed(a, public_bytes(c), context=one, me="a", peer="c")


def test_expansion_is_deterministic_and_differs_between_seeds() -> None:
    ring = Ring(24)
    first = expand(b"\x01" * 32, ring, 10_000)
    np.testing.assert_array_equal(first, expand(b"\x01" * 32, ring, 10_000))
    assert np.mean(first == expand(b"\x02" * 32, ring, 10_000)) < 0.001
    assert int(first.max()) < 2**24
    # A longer expansion starts with the shorter one (one stream per seed).
    np.testing.assert_array_equal(expand(b"\x01" * 32, ring, 5_000_000)[:10_000], first)


def test_a_malformed_or_degenerate_public_key_is_refused() -> None:
    key = X25519PrivateKey.generate()
    with pytest.raises(SecureAggregationError, match="32-byte X25519 key"):
        agree(key, b"\x01" * 31, what="mask key of b")
    with pytest.raises(SecureAggregationError, match="degenerate"):
        agree(key, bytes(32), what="mask key of b")  # the point of order 1
