"""IID, Dirichlet non-IID and by-column partitions, and held-out splits."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl.data.partition import (
    PartitionSpec,
    column_partition,
    dirichlet_partition,
    iid_partition,
    split_fraction,
)
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


@pytest.mark.parametrize(("n", "count"), [(10, 3), (7, 7), (100, 1), (101, 4)])
def test_iid_parts_are_disjoint_random_and_balanced(n: int, count: int) -> None:
    parts = iid_partition(n, count=count, seed=3)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    sizes = [part.size for part in parts]
    assert max(sizes) - min(sizes) <= 1
    if count > 1:
        assert not np.array_equal(parts[0], np.arange(parts[0].size))  # shuffled, not cut
    again = iid_partition(n, count=count, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_needs_an_example_per_part() -> None:
    with pytest.raises(ValidationError, match="cannot split 2 examples into 3 non-empty parts"):
        iid_partition(2, count=3, seed=0)


def test_column_parts_follow_the_sorted_values() -> None:
    groups = np.array(["b", "a", "c", "a", "b", "a"])
    parts = column_partition(groups, count=3, name="site")
    assert [part.tolist() for part in parts] == [[1, 3, 5], [0, 4], [2]]


def test_column_with_another_number_of_values_is_refused() -> None:
    with pytest.raises(ValidationError) as error:
        column_partition(np.array([1, 2, 2, 5]), count=2, name="site")
    assert str(error.value) == (
        "column 'site' has 3 distinct values (1, 2, 5) but the partition count is 2: one part "
        "per value"
    )
    with pytest.raises(ValidationError, match=r"must have shape \(N,\)"):
        column_partition(np.zeros((2, 2)), count=1, name="site")


def test_the_spec_picks_the_scheme() -> None:
    labels = _labels(60, 3)
    iid = PartitionSpec(index=0, count=3, scheme="iid", seed=1).parts(labels)
    assert [p.size for p in iid] == [20, 20, 20]
    skewed = PartitionSpec(index=0, count=3, alpha=0.5, seed=1).parts(labels)
    expected = dirichlet_partition(labels, count=3, alpha=0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, expected, strict=True))
    by_site = PartitionSpec(index=0, count=2, scheme="column", column="site")
    assert [p.tolist() for p in by_site.parts(labels[:4], np.array([7, 3, 7, 3]))] == [
        [1, 3],
        [0, 2],
    ]


@pytest.mark.parametrize(
    "fields",
    [{"scheme": "column"}, {"scheme": "iid", "column": "site"}, {"column": "site"}],
)
def test_column_goes_with_scheme_column_only(fields: dict[str, str]) -> None:
    with pytest.raises(pydantic.ValidationError, match="column names the group array"):
        PartitionSpec.model_validate({"index": 0, "count": 2, **fields})
