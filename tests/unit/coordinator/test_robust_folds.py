"""The robust folds against numpy references, and their independence of the arrival order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator import robust_folds
from coordinator.robust_folds import KeptUpdates, KrumFold, MedianFold, TrimmedMeanFold
from coordinator.tasks import ModelVersion
from gptfl.errors import ValidationError
from gptfl.fleet_messages import UpdateHeader
from gptfl.weights import WeightMap

SHAPES = {"a": (3, 4), "b": (5,)}
TEMPLATE = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
SPECS = ModelVersion.of(TEMPLATE).manifest.specs

values_st = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def _updates_st(min_size: int = 1) -> st.SearchStrategy[list[np.ndarray]]:
    """Each update as one flat float32 vector over the tensors of SHAPES."""
    size = sum(int(np.prod(shape)) for shape in SHAPES.values())
    vector = hnp.arrays(np.float32, size, elements=values_st)
    return st.lists(vector, min_size=min_size, max_size=7)


def _as_weights(vector: np.ndarray) -> WeightMap:
    weights, start = {}, 0
    for name, shape in SHAPES.items():
        count = int(np.prod(shape))
        weights[name] = torch.from_numpy(vector[start : start + count].copy()).reshape(shape)
        start += count
    return weights


def _flat(weights: WeightMap) -> np.ndarray:
    return np.concatenate([weights[name].numpy().reshape(-1) for name in SHAPES])


def _fold(fold: KeptUpdates, vectors: list[np.ndarray], counts: list[int]) -> np.ndarray:
    for vector, n in zip(vectors, counts, strict=True):
        fold.fold(_as_weights(vector), UpdateHeader("t", 1, n))
    assert fold.count == len(vectors) and fold.total_examples == sum(counts)
    return _flat(fold.average())


def _median() -> MedianFold:
    return MedianFold(TEMPLATE, SPECS, capacity=10)


@settings(max_examples=80, deadline=None)
@given(vectors=_updates_st())
def test_median_is_numpys_median(vectors: list[np.ndarray]) -> None:
    got = _fold(_median(), vectors, [1] * len(vectors))
    want = np.median(np.stack(vectors).astype(np.float64), axis=0).astype(np.float32)
    np.testing.assert_array_equal(got, want)  # the two middle values' mean, rounded once


def _trim_mean(stacked: np.ndarray, beta: float) -> np.ndarray:
    """scipy.stats.trim_mean along axis 0, as Flower's FedTrimmedAvg computes it."""
    cut = int(beta * stacked.shape[0])
    ordered = np.sort(stacked.astype(np.float64), axis=0)
    return ordered[cut : stacked.shape[0] - cut].mean(axis=0)


@settings(max_examples=80, deadline=None)
@given(vectors=_updates_st(), beta=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.49]))
def test_trimmed_mean_is_the_trim_mean_reference(vectors: list[np.ndarray], beta: float) -> None:
    fold = TrimmedMeanFold(TEMPLATE, SPECS, capacity=10, beta=beta)
    got = _fold(fold, vectors, [5] * len(vectors))
    want = _trim_mean(np.stack(vectors), beta)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-6)


def _krum_reference(
    vectors: list[np.ndarray], counts: list[int], num_byzantine: int, to_keep: int
) -> tuple[np.ndarray, list[float]]:
    """Flower's aggregate_krum, rewritten: scores over the n - f - 2 closest others."""
    flat = np.stack(vectors).astype(np.float64)
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    n = len(vectors)
    closest = min(n - 1, max(1, n - num_byzantine - 2))
    scores = [float(np.sort(np.delete(distances[i], i))[:closest].sum()) for i in range(n)]
    best = np.argsort(scores, kind="stable")[:to_keep]
    weights = np.asarray([counts[i] for i in best], dtype=np.float64)
    return (weights[:, None] * flat[best]).sum(axis=0) / weights.sum(), scores


@settings(max_examples=80, deadline=None)
@given(
    vectors=_updates_st(min_size=2),
    counts_seed=st.integers(0, 2**16),
    num_byzantine=st.integers(0, 3),
    num_selected=st.integers(1, 4),
)
def test_krum_picks_and_averages_as_the_reference(
    vectors: list[np.ndarray], counts_seed: int, num_byzantine: int, num_selected: int
) -> None:
    counts = list(np.random.default_rng(counts_seed).integers(1, 100, len(vectors)))
    keep = min(num_selected, len(vectors))
    want, scores = _krum_reference(vectors, counts, num_byzantine, keep)
    ranked = sorted(scores)
    # a choice between tied scores is the fold's own tie-break, not the reference's
    assume(keep == len(ranked) or ranked[keep - 1] < ranked[keep])
    fold = KrumFold(TEMPLATE, SPECS, capacity=10, num_byzantine=num_byzantine, num_selected=keep)
    got = _fold(fold, vectors, counts)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(fold.last_scores, ranked, rtol=1e-9)


def test_krum_keeps_out_the_outlier_a_mean_would_take() -> None:
    honest = [np.full(17, v, dtype=np.float32) for v in (0.9, 1.0, 1.1, 1.05)]
    attack = np.full(17, 1e6, dtype=np.float32)
    fold = KrumFold(TEMPLATE, SPECS, capacity=5, num_byzantine=1, num_selected=3)
    got = _fold(fold, [*honest[:2], attack, *honest[2:]], [10, 10, 10**6, 10, 10])
    assert np.all(np.abs(got - 1.0) < 0.11)


@pytest.mark.parametrize(
    "make",
    [
        _median,
        lambda: TrimmedMeanFold(TEMPLATE, SPECS, capacity=10, beta=0.25),
        lambda: KrumFold(TEMPLATE, SPECS, capacity=10, num_byzantine=1, num_selected=2),
        lambda: KrumFold(TEMPLATE, SPECS, capacity=10, num_byzantine=0, num_selected=1),
    ],
)
def test_every_arrival_order_gives_the_same_bits(make: type[KeptUpdates]) -> None:
    rng = np.random.default_rng(7)
    size = sum(int(np.prod(s)) for s in SHAPES.values())
    vectors = [rng.normal(0, scale, size).astype(np.float32) for scale in (1e-3, 1, 30, 0.1)]
    vectors.append(vectors[1].copy())  # an identical pair: ties go by count, then content
    counts = [3, 8, 1, 50, 8]
    results = {
        _fold(make(), [vectors[i] for i in order], [counts[i] for i in order]).tobytes()
        for order in itertools.permutations(range(5))
    }
    assert len(results) == 1


def test_large_tensors_are_reduced_in_column_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(robust_folds, "SORT_VALUES", 8)  # several blocks for 17 values
    monkeypatch.setattr(robust_folds, "DISTANCE_BLOCK", 3)
    rng = np.random.default_rng(3)
    vectors = [rng.normal(size=17).astype(np.float32) for _ in range(3)]
    got = _fold(_median(), vectors, [1, 1, 1])
    np.testing.assert_array_equal(got, np.median(np.stack(vectors), axis=0))
    want, _ = _krum_reference(vectors, [1, 2, 3], 0, 2)
    fold = KrumFold(TEMPLATE, SPECS, capacity=3, num_byzantine=0, num_selected=2)
    np.testing.assert_allclose(_fold(fold, vectors, [1, 2, 3]), want, rtol=1e-6)


def test_the_fold_keeps_copies_and_refuses_more_than_its_capacity() -> None:
    fold = MedianFold(TEMPLATE, SPECS, capacity=2)
    buffer = _as_weights(np.ones(17, dtype=np.float32))
    fold.fold(buffer, UpdateHeader("t", 1, 1))
    buffer["a"].fill_(5.0)  # the receive buffer is reused: the fold must hold its own copy
    fold.fold(buffer, UpdateHeader("t", 1, 1))
    with pytest.raises(ValidationError, match="at most 2 updates"):
        fold.fold(buffer, UpdateHeader("t", 1, 1))
    assert _flat(fold.average())[:12].tolist() == [3.0] * 12
    with pytest.raises(RuntimeError, match="already reduced"):
        fold.fold(buffer, UpdateHeader("t", 1, 1))
    with pytest.raises(ValidationError, match="no updates"):
        _median().average()
