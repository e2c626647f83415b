"""The ~100 MB model the transfer and aggregation benches move: a few large float32 tensors."""

from __future__ import annotations

import math

import torch

from gptfl.weights import WeightMap

DEFAULT_MODEL_MB = 100.0
DEFAULT_TENSORS = 4


def big_weights(
    total_mb: float = DEFAULT_MODEL_MB, *, tensors: int = DEFAULT_TENSORS, seed: int = 0
) -> WeightMap:
    """``tensors`` square float32 matrices (plus a small bias each), ``total_mb`` MB in all."""
    side = int(math.sqrt(total_mb * 1e6 / 4 / tensors))
    generator = torch.Generator().manual_seed(seed)
    weights: WeightMap = {}
    for i in range(tensors):
        weights[f"layer{i}.weight"] = torch.randn(side, side, generator=generator)
        weights[f"layer{i}.bias"] = torch.randn(side, generator=generator)
    return weights


def model_specs(total_mb: float = DEFAULT_MODEL_MB, *, tensors: int = DEFAULT_TENSORS) -> WeightMap:
    """The tensors :func:`big_weights` makes, as meta tensors (no memory, no random draw)."""
    side = int(math.sqrt(total_mb * 1e6 / 4 / tensors))
    specs: WeightMap = {}
    for i in range(tensors):
        specs[f"layer{i}.weight"] = torch.empty(side, side, device="meta")
        specs[f"layer{i}.bias"] = torch.empty(side, device="meta")
    return specs


def nbytes(weights: WeightMap) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())
