"""RunningSum: the sample-weighted average that FedAvg and every server optimizer start from."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import RunningSum
from gptfl.errors import ValidationError
from gptfl.weights import WeightMap

SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (3, 5)}

counts_st = st.lists(st.integers(1, 10_000), min_size=1, max_size=6)


def _template() -> WeightMap:
    return {name: torch.zeros(shape) for name, shape in SHAPES.items()}


def _update(seed: int, *, scale: float = 1.0) -> WeightMap:
    gen = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def _assert_close(got: WeightMap, want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=name)


@settings(max_examples=40, deadline=None)
@given(counts=counts_st, seed=st.integers(0, 2**16))
def test_identical_updates_average_to_that_update(counts: list[int], seed: int) -> None:
    update = _update(seed, scale=10.0)
    total = RunningSum(_template())
    for n in counts:
        total.add(update, n)
    assert total.count == len(counts)
    assert total.total_examples == sum(counts)
    _assert_close(total.mean(), {k: v.numpy() for k, v in update.items()})


@settings(max_examples=40, deadline=None)
@given(counts=counts_st, seed=st.integers(0, 2**16))
def test_mean_is_weighted_by_sample_counts(counts: list[int], seed: int) -> None:
    updates = [_update(seed + i) for i in range(len(counts))]
    total = RunningSum(_template())
    for update, n in zip(updates, counts, strict=True):
        total.add(update, n)
    weights = np.asarray(counts, dtype=np.float64)
    reference = {
        name: np.tensordot(weights, np.stack([u[name].double().numpy() for u in updates]), 1)
        / weights.sum()
        for name in SHAPES
    }
    _assert_close(total.mean(), reference)


def test_a_large_count_dominates() -> None:
    # the unweighted mean would be 0.5; the weighted one is almost all the big silo's value
    total = RunningSum({"w": torch.zeros(2)})
    total.add({"w": torch.ones(2)}, 999)
    total.add({"w": torch.zeros(2)}, 1)
    assert torch.allclose(total.mean()["w"], torch.full((2,), 0.999))


@settings(max_examples=30, deadline=None)
@given(counts=counts_st, seed=st.integers(0, 2**16), data=st.data())
def test_folding_order_does_not_matter(counts: list[int], seed: int, data: st.DataObject) -> None:
    updates = [(_update(seed + i), n) for i, n in enumerate(counts)]
    shuffled = data.draw(st.permutations(updates))
    first, second = RunningSum(_template()), RunningSum(_template())
    for update, n in updates:
        first.add(update, n)
    for update, n in shuffled:
        second.add(update, n)
    _assert_close(second.mean(), {k: v.numpy() for k, v in first.mean().items()})


@settings(max_examples=30, deadline=None)
@given(counts=counts_st, seed=st.integers(0, 2**16))
def test_add_sum_equals_the_sum_of_adds(counts: list[int], seed: int) -> None:
    updates = [_update(seed + i) for i in range(len(counts))]
    one_by_one = RunningSum(_template())
    for update, n in zip(updates, counts, strict=True):
        one_by_one.add(update, n)
    presummed = {
        name: sum((n * u[name] for u, n in zip(updates, counts, strict=True)), torch.zeros(shape))
        for name, shape in SHAPES.items()
    }
    at_once = RunningSum(_template())
    at_once.add_sum(presummed, sum(counts), len(counts))
    assert at_once.count == one_by_one.count
    assert at_once.total_examples == one_by_one.total_examples
    _assert_close(at_once.mean(), {k: v.numpy() for k, v in one_by_one.mean().items()})


def test_non_float_tensors_are_not_averaged() -> None:
    template = {"w": torch.zeros(3), "steps": torch.zeros((), dtype=torch.int64)}
    total = RunningSum(template)
    total.add({"w": torch.ones(3), "steps": torch.tensor(5)}, 2)
    total.add({"w": torch.full((3,), 4.0), "steps": torch.tensor(9)}, 1)
    mean = total.mean()
    assert set(mean) == {"w"}
    assert torch.allclose(mean["w"], torch.full((3,), 2.0))


def test_half_precision_updates_accumulate_in_float32() -> None:
    total = RunningSum({"w": torch.zeros(4, dtype=torch.float16)})
    # 3000 * 30 = 90000 overflows float16 (max 65504); the accumulator must not
    total.add({"w": torch.full((4,), 30.0, dtype=torch.float16)}, 3000)
    total.add({"w": torch.full((4,), 10.0, dtype=torch.float16)}, 1000)
    mean = total.mean()["w"]
    assert mean.dtype == torch.float32
    assert torch.allclose(mean, torch.full((4,), 25.0))


@pytest.mark.parametrize("n", [0, -5])
def test_non_positive_sample_counts_are_rejected(n: int) -> None:
    total = RunningSum(_template())
    with pytest.raises(ValidationError, match="positive sample count"):
        total.add(_update(0), n)
    assert total.count == 0 and total.total_examples == 0
    total.add(_update(1), 3)
    _assert_close(total.mean(), {k: v.numpy() for k, v in _update(1).items()})


def test_mean_of_nothing_is_an_error() -> None:
    with pytest.raises(ValidationError, match="no updates"):
        RunningSum(_template()).mean()


def test_mean_is_a_snapshot() -> None:
    total = RunningSum({"w": torch.zeros(2)})
    total.add({"w": torch.ones(2)}, 1)
    before = total.mean()
    total.add({"w": torch.full((2,), 3.0)}, 1)
    assert torch.equal(before["w"], torch.ones(2))


def test_many_threads_folding_at_once_lose_nothing() -> None:
    threads_n, adds_per_thread = 8, 40
    total = RunningSum({"w": torch.zeros(256), "b": torch.zeros(3)})
    start = threading.Barrier(threads_n)

    def fold(i: int) -> None:
        update = {"w": torch.full((256,), float(i + 1)), "b": torch.full((3,), float(i + 1))}
        start.wait()
        for _ in range(adds_per_thread):
            total.add(update, i + 1)

    threads = [threading.Thread(target=fold, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert total.count == threads_n * adds_per_thread
    weights = range(1, threads_n + 1)
    assert total.total_examples == adds_per_thread * sum(weights)
    # integer-valued sums are exact in float32, so any lost or torn add shows
    expected = sum(w * w for w in weights) / sum(weights)
    mean = total.mean()
    assert torch.equal(mean["w"], torch.full((256,), expected, dtype=torch.float32))
    assert torch.equal(mean["b"], torch.full((3,), expected, dtype=torch.float32))


def test_mean_in_place_equals_the_mean_and_finishes_the_sum() -> None:
    total = RunningSum(_template())
    total.add(_update(0), 2)
    total.add(_update(1), 5)
    expected = {k: v.numpy() for k, v in total.mean().items()}
    _assert_close(total.mean(in_place=True), expected)
    with pytest.raises(RuntimeError, match="averaged in place"):
        total.add(_update(2), 1)
