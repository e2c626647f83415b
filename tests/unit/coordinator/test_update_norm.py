"""Update norms measured while the payload streams in, clipping, and a round's bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import update_norm
from coordinator.job_state import RoundRecord
from coordinator.update_norm import (
    NORM_BLOCK,
    StreamingDistance,
    bound_for_round,
    clip_in_place,
)
from gptfl.job_spec import UpdateBoundsSpec
from gptfl.weights import PayloadReceiver, WeightMap, build_manifest, iter_chunks


def _model(seed: int, scale: float = 1.0) -> WeightMap:
    gen = torch.Generator().manual_seed(seed)
    return {
        "big": scale * torch.randn(NORM_BLOCK * 2 + 5, generator=gen),
        "steps": torch.tensor([7], dtype=torch.int64),  # not a weight: not measured
        "small": scale * torch.randn(3, 3, generator=gen),
        "empty": torch.zeros(0),
    }


def _received_norm(update: WeightMap, reference: WeightMap, chunk_size: int) -> float:
    manifest = build_manifest(update, chunk_size=chunk_size)
    buffer = bytearray(manifest.total_bytes)
    receiver = PayloadReceiver(manifest, buffer=buffer)
    distance = StreamingDistance(manifest, reference, buffer)
    position = 0
    for chunk in iter_chunks(update, manifest):
        receiver.add(chunk)
        position += len(chunk.data)
        distance.advance(position)
    receiver.finish()
    return distance.norm()


def _reference_norm(update: WeightMap, reference: WeightMap) -> float:
    squares = sum(
        float((update[k].double() - reference[k].double()).square().sum())
        for k in update
        if update[k].is_floating_point()
    )
    return math.sqrt(squares)


@settings(max_examples=25, deadline=None)
@given(chunk_size=st.integers(1, 70_000), seed=st.integers(0, 1000))
def test_the_streamed_norm_is_the_distance_whatever_the_chunk_size(
    chunk_size: int, seed: int
) -> None:
    reference, update = _model(seed), _model(seed + 1, scale=2.0)
    got = _received_norm(update, reference, chunk_size)
    assert got == pytest.approx(_reference_norm(update, reference), rel=1e-12)
    # blocks are cut at fixed places, so every chunk size gives the same bits
    assert got == _received_norm(update, reference, 1 << 20)


def test_the_norm_is_not_ready_before_the_last_byte() -> None:
    reference = _model(0)
    manifest = build_manifest(reference)
    distance = StreamingDistance(manifest, reference, bytearray(manifest.total_bytes))
    small = next(info for info in manifest.tensors if info.name == "small")
    distance.advance(small.offset + small.nbytes - 1)  # one byte of the last value missing
    with pytest.raises(RuntimeError, match="not been measured"):
        distance.norm()
    distance.advance(manifest.total_bytes)
    zeros = {k: torch.zeros_like(v) for k, v in reference.items()}  # the buffer, never filled
    assert distance.norm() == pytest.approx(_reference_norm(zeros, reference), rel=1e-12)


def test_clipping_scales_the_update_onto_the_bound() -> None:
    reference, update = _model(0), _model(1, scale=30.0)
    original = {k: v.clone() for k, v in update.items()}
    norm = _reference_norm(update, reference)
    clip_in_place(update, reference, 2.0 / norm)
    assert _reference_norm(update, reference) == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(update["steps"], original["steps"])
    direction = (original["small"] - reference["small"]) * (2.0 / norm)
    torch.testing.assert_close(update["small"] - reference["small"], direction)


def test_large_tensors_are_clipped_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(update_norm, "CLIP_BLOCK", 7)
    reference, update = {"w": torch.zeros(20)}, {"w": torch.arange(20.0)}
    clip_in_place(update, reference, 0.5)
    torch.testing.assert_close(update["w"], torch.arange(20.0) * 0.5)


def _round(number: int, norms: tuple[float, ...]) -> RoundRecord:
    return RoundRecord(number, 3, len(norms), 0, 10, 1.0, 0.5, update_norms=norms)


def test_the_bound_of_a_round_comes_from_the_spec_and_earlier_rounds() -> None:
    assert bound_for_round(None, []) is None
    fixed = UpdateBoundsSpec(max_norm=5.0)
    assert bound_for_round(fixed, []) == update_norm.NormBound(
        5.0, "reject", "update_bounds.max_norm 5"
    )
    relative = UpdateBoundsSpec(max_norm_vs_median=3.0, median_of=3, action="clip")
    assert bound_for_round(relative, []) is None  # no history yet: unbounded
    assert bound_for_round(relative, [_round(1, (1.0, 2.0))]) is None  # 2 < median_of
    history = [_round(1, (100.0, 100.0, 100.0)), _round(2, (1.0, 2.0)), _round(3, (4.0,))]
    bound = bound_for_round(relative, history)
    assert bound is not None and bound.action == "clip"
    assert bound.limit == 3.0 * 2.0  # the median of the latest 3 norms, 1, 2 and 4
    assert "median 2 of 3 norms" in bound.source
    both = UpdateBoundsSpec(max_norm=5.0, max_norm_vs_median=3.0, median_of=3)
    lower = bound_for_round(both, history)
    assert lower is not None and lower.limit == 5.0
    assert bound_for_round(relative, [_round(1, (0.0, 0.0, 0.0))]) is None  # median 0


def test_update_bounds_need_a_bound() -> None:
    with pytest.raises(ValueError, match="max_norm, max_norm_vs_median or both"):
        UpdateBoundsSpec(action="clip")
