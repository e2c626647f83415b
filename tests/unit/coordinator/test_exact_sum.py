"""ExactSum and WeightedMeanFold: FedAvg's fold, bit-identical whatever the arrival order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import BLOCK, HEADROOM_BITS, SUM_BITS, ExactSum, RunningSum
from coordinator.round_fold import WeightedMeanFold
from coordinator.strategies import FedAvg
from coordinator.tasks import ModelVersion
from gptfl.errors import ValidationError, WeightRangeError
from gptfl.fleet_messages import UpdateHeader
from gptfl.weights import WeightMap, build_manifest

SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (3, 5)}


def _template() -> WeightMap:
    """A global model whose largest magnitude is below 1 in every tensor."""
    gen = torch.Generator().manual_seed(99)
    return {name: torch.rand(shape, generator=gen) for name, shape in SHAPES.items()}


def _update(seed: int, *, scale: float = 1.0) -> WeightMap:
    gen = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def _digest(weights: WeightMap) -> str:
    return build_manifest(weights).digest


def _exact_mean(updates: list[tuple[WeightMap, int]], template: WeightMap) -> WeightMap:
    total = ExactSum(template, max_total_weight=sum(n for _, n in updates))
    for update, n in updates:
        total.check(update)
        total.add(update, n)
    return total.mean()


def test_every_arrival_order_of_four_updates_gives_the_same_model() -> None:
    template = _template()
    # values of very different magnitudes: float32 addition of these is far from associative
    updates = [
        (_update(1, scale=1e-4), 7),
        (_update(2, scale=3.0), 500),
        (_update(3, scale=0.01), 41),
        (_update(4, scale=30.0), 3),
    ]
    digests = set()
    for order in itertools.permutations(updates):
        fold = WeightedMeanFold(
            template, ModelVersion.of(template).manifest.specs, max_total_weight=551
        )
        for update, n in order:
            fold.check(update, UpdateHeader("t", 1, n))
            fold.fold(update, UpdateHeader("t", 1, n))
        digests.add(ModelVersion.of(FedAvg().apply(template, fold.average())).manifest.digest)
    assert len(digests) == 1
    # the test can fail: the float32 running sum of the same updates depends on the order
    float_digests = set()
    for order in itertools.permutations(updates):
        running = RunningSum(template)
        for update, n in order:
            running.add(update, n)
        float_digests.add(_digest(running.mean()))
    assert len(float_digests) > 1


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 10**6), min_size=1, max_size=6),
    scales=st.lists(st.sampled_from([1e-6, 1e-3, 0.1, 1.0, 100.0]), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
    spare=st.integers(0, 10**6),
)
def test_the_mean_is_within_its_quantisation_bound_of_the_float64_mean(
    counts: list[int], scales: list[float], seed: int, spare: int
) -> None:
    template = _template()
    updates = [_update(seed + i, scale=scales[i]) for i in range(len(counts))]
    max_total = sum(counts) + spare  # the bound may exceed what arrived (silos missing)
    total = ExactSum(template, max_total_weight=max_total)
    for update, n in zip(updates, counts, strict=True):
        total.add(update, n)
    mean = total.mean()
    weights = np.asarray(counts, dtype=np.float64)
    for name in SHAPES:
        reference = np.tensordot(weights, np.stack([u[name].double().numpy() for u in updates]), 1)
        reference /= weights.sum()
        assert total.limit(name) == 2.0**HEADROOM_BITS  # the template's values are below 1
        scale = 2.0**SUM_BITS / total.limit(name)
        quantisation = len(counts) * max_total / (2 * scale * sum(counts))
        got = mean[name].double().numpy()
        # float32 rounds the result once: half an ulp of the float32 value, plus quantisation
        half_ulp = np.spacing(np.abs(got).astype(np.float32)).astype(np.float64) / 2
        assert np.all(np.abs(got - reference) <= half_ulp + quantisation * 1.01), name


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 10**9), min_size=1, max_size=8),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=8, max_size=8),
)
def test_values_at_the_range_limit_with_all_the_weight_never_overflow(
    counts: list[int], signs: list[float]
) -> None:
    template = {"w": torch.full((3,), 0.75)}  # largest magnitude < 1: range 2^HEADROOM_BITS
    limit = 2.0**HEADROOM_BITS
    total = ExactSum(template, max_total_weight=sum(counts))
    assert total.limit("w") == limit
    updates = [{"w": torch.full((3,), signs[i] * limit)} for i in range(len(counts))]
    for update, n in zip(updates, counts, strict=True):
        total.check(update)
        total.add(update, n)
    expected = sum(signs[i] * n for i, n in enumerate(counts)) / sum(counts) * limit
    np.testing.assert_allclose(total.mean()["w"].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_a_value_beyond_the_range_is_refused_by_name() -> None:
    template = _template()
    total = ExactSum(template, max_total_weight=1000)
    update = _update(1)
    update["fc.weight"][1, 2] = 1e37  # finite, but it would overflow a float32 sum of a few
    with pytest.raises(WeightRangeError, match=r"'fc.weight'.*1e\+37"):
        total.check(update)
    update["fc.weight"][1, 2] = -(2.0**HEADROOM_BITS) * 1.01
    with pytest.raises(WeightRangeError, match="fc.weight"):
        total.check(update)
    update["fc.weight"][1, 2] = -(2.0**HEADROOM_BITS)  # the limit itself is in range
    total.check(update)


def test_the_range_follows_the_global_models_largest_magnitude() -> None:
    total = ExactSum(
        {"big": torch.tensor([3000.0, -5000.0]), "small": torch.zeros(2)}, max_total_weight=1
    )
    assert total.limit("big") == 2.0 ** (13 + HEADROOM_BITS)  # 5000 < 2^13
    assert total.limit("small") == 2.0**HEADROOM_BITS
    total.check({"big": torch.tensor([4e9, 0.0]), "small": torch.zeros(2)})


def test_weights_past_the_rounds_bound_are_refused() -> None:
    total = ExactSum(_template(), max_total_weight=10)
    total.add(_update(1), 6)
    with pytest.raises(ValidationError, match="above its bound 10"):
        total.add(_update(2), 5)
    with pytest.raises(ValidationError, match="positive weight"):
        total.add(_update(2), 0)
    total.add(_update(2), 4)
    assert (total.count, total.total_examples) == (2, 10)


def test_non_float_tensors_are_not_averaged_and_the_sum_is_spent_by_its_mean() -> None:
    template = {**_template(), "steps": torch.tensor(3, dtype=torch.int64)}
    total = ExactSum(template, max_total_weight=5)
    total.add({**_update(1), "steps": torch.tensor(99)}, 5)
    mean = total.mean()
    assert set(mean) == set(SHAPES) and all(t.dtype == torch.float32 for t in mean.values())
    with pytest.raises(RuntimeError, match="already averaged"):
        total.add(_update(2), 1)
    with pytest.raises(RuntimeError, match="already averaged"):
        total.mean()
    with pytest.raises(ValidationError, match="no updates"):
        ExactSum(template, max_total_weight=5).mean()


def test_tensors_larger_than_a_block_are_summed_whole() -> None:
    template = {"w": torch.zeros(BLOCK * 2 + 17)}
    a = {"w": torch.linspace(-1, 1, BLOCK * 2 + 17)}
    b = {"w": torch.linspace(1, -1, BLOCK * 2 + 17)}
    mean = _exact_mean([(a, 1), (b, 3)], template)["w"]
    torch.testing.assert_close(mean, (a["w"].double() + 3 * b["w"].double()).div(4).float())


def test_the_accumulator_is_two_model_copies_of_int64() -> None:
    template = _template()
    total = ExactSum(template, max_total_weight=3)
    assert not total._sums  # nothing held while the round's silos train
    model_bytes = sum(t.numel() * t.element_size() for t in template.values())
    for seed in range(3):
        total.add(_update(seed), 1)
        accumulator = sum(t.numel() * t.element_size() for t in total._sums.values())
        assert accumulator == 2 * model_bytes  # int64 against float32: 2x, not N copies


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_precision_models_are_summed_too(dtype: torch.dtype) -> None:
    template = {"w": torch.zeros(5, dtype=dtype)}
    a = {"w": torch.tensor([0.5, -1.0, 2.0, 0.0, 3.25], dtype=dtype)}
    b = {"w": torch.tensor([1.5, 1.0, -2.0, 0.125, 0.75], dtype=dtype)}
    mean = _exact_mean([(a, 3), (b, 1)], template)["w"]
    expected = (3 * a["w"].double() + b["w"].double()) / 4
    torch.testing.assert_close(mean.double(), expected, rtol=0, atol=1e-7)
