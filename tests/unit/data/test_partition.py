"""Dirichlet non-IID partitions and held-out splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl.data.partition import PartitionSpec, dirichlet_partition, split_fraction
from gptfl.errors import ValidationError


def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=40, max_value=400),
    classes=st.integers(min_value=1, max_value=10),
    count=st.integers(min_value=1, max_value=8),
    alpha=st.sampled_from([0.3, 1.0, 10.0]),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_every_index_appears_exactly_once(
    n: int, classes: int, count: int, alpha: float, seed: int
) -> None:
    # min_per_part=0: any draw is acceptable, so the property holds for every input (with a
    # minimum, a few rare inputs are refused by design, e.g. one class of 40 examples split
    # 8 ways at alpha 0.3; the minimum has tests of its own below)
    parts = dirichlet_partition(
        _labels(n, classes, seed), count=count, alpha=alpha, seed=seed, min_per_part=0
    )
    assert len(parts) == count
    assert all(part.dtype == np.int64 for part in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_same_seed_same_parts_other_seed_other_parts() -> None:
    labels = _labels()
    first = dirichlet_partition(labels, count=5, alpha=0.5, seed=3)
    second = dirichlet_partition(labels, count=5, alpha=0.5, seed=3)
    other = dirichlet_partition(labels, count=5, alpha=0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def _mean_max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[part]).max() / part.size for part in parts]))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = _labels(2000)
    skewed = dirichlet_partition(labels, count=8, alpha=0.1, seed=0)
    near_iid = dirichlet_partition(labels, count=8, alpha=100.0, seed=0)
    skewed_fraction = _mean_max_class_fraction(labels, skewed)
    iid_fraction = _mean_max_class_fraction(labels, near_iid)
    # IID parts of 10 balanced classes have a top class share near 0.1 (a bit above by noise).
    assert iid_fraction < 0.2
    assert skewed_fraction > 0.4
    assert skewed_fraction > 2 * iid_fraction


def test_min_per_part_is_met() -> None:
    parts = dirichlet_partition(_labels(300), count=10, alpha=0.1, seed=1, min_per_part=5)
    assert min(part.size for part in parts) >= 5


def test_impossible_minimum_is_a_clear_error() -> None:
    with pytest.raises(ValidationError, match="cannot split 10 examples into 4 parts"):
        dirichlet_partition(_labels(10), count=4, alpha=1.0, seed=0, min_per_part=3)


def test_unreachable_minimum_gives_up_after_bounded_attempts() -> None:
    # One class and a tiny alpha: nearly all mass lands on one part every draw.
    labels = np.zeros(100, dtype=np.int64)
    with pytest.raises(ValidationError, match="attempts"):
        dirichlet_partition(labels, count=10, alpha=0.001, seed=0, min_per_part=10)


@pytest.mark.parametrize(("n", "fraction", "held"), [(1797, 0.2, 359), (10, 0.0, 0), (0, 0.5, 0)])
def test_split_fraction_sizes_and_coverage(n: int, fraction: float, held: int) -> None:
    kept, held_out = split_fraction(n, fraction=fraction, seed=0)
    assert held_out.size == held
    assert kept.size == n - held
    assert np.array_equal(np.sort(np.concatenate([kept, held_out])), np.arange(n))


def test_split_fraction_is_deterministic() -> None:
    a = split_fraction(100, fraction=0.3, seed=5)
    b = split_fraction(100, fraction=0.3, seed=5)
    c = split_fraction(100, fraction=0.3, seed=6)
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_fraction_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValidationError, match="fraction"):
        split_fraction(10, fraction=fraction, seed=0)


def test_partition_spec_index_must_be_below_count() -> None:
    assert PartitionSpec(index=3, count=4).alpha == 0.5
    with pytest.raises(ValueError, match="index must be < count"):
        PartitionSpec(index=4, count=4)
