"""How far an update lies from the global model, measured while it streams in, and the
job's bound on it (``update_bounds``).

:class:`StreamingDistance` reads the receive buffer as the chunks land in it: each block of
a tensor is compared with the global model as soon as all its bytes are there, so the norm
is ready when the last chunk is, without a copy of the model (a few 128 KiB temporaries).
Blocks are cut at fixed places in each tensor, whatever the sender's chunk size, and summed
in one order, so the same update always has the same norm.

The bound of a round (:func:`bound_for_round`) depends only on the job spec and the norms of
earlier rounds, never on the order this round's updates arrive in: a median of the round's
own norms "so far" would let the first arrivals go unbounded and would make which update is
refused depend on timing, breaking the bit-identical aggregation of
:mod:`coordinator.aggregation`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from coordinator.job_state import RoundRecord
from gptfl.job_spec import UpdateBoundsSpec
from gptfl.weights import Manifest, PayloadBuffer, TensorInfo, torch_dtype

#: values per partial sum of squares: fixed, so the norm does not depend on how the payload
#: was cut into chunks, and small enough to be summed by one thread
NORM_BLOCK = 1 << 14
#: values rescaled per step when an update is clipped (like NORM_BLOCK, at most torch's
#: 32768-value grain: each step runs on the calling thread, with no thread-pool handoff)
CLIP_BLOCK = 1 << 15


class StreamingDistance:
    """The L2 distance of a payload being received from ``reference``, over the
    floating-point tensors, computed as the payload's bytes arrive in ``buffer``."""

    def __init__(
        self, manifest: Manifest, reference: Mapping[str, torch.Tensor], buffer: PayloadBuffer
    ) -> None:
        self._tensors: list[tuple[TensorInfo, torch.dtype, torch.Tensor]] = []
        for info in manifest.tensors:  # in offset order (check_manifest)
            dtype = torch_dtype(info.dtype)
            if dtype.is_floating_point and math.prod(info.shape) > 0:
                self._tensors.append((info, dtype, reference[info.name].reshape(-1)))
        self._buffer = buffer
        self._index = 0  # the tensor being measured
        self._measured = 0  # values of it measured so far
        self._sum_sq = 0.0

    def advance(self, received: int) -> None:
        """Measures every whole block that the first ``received`` bytes of the payload hold."""
        while self._index < len(self._tensors):
            info, dtype, reference = self._tensors[self._index]
            count = reference.numel()
            itemsize = reference.element_size()
            available = min(count, max(0, (received - info.offset) // itemsize))
            end = count if available == count else available - available % NORM_BLOCK
            if end > self._measured:
                values = torch.frombuffer(
                    self._buffer,
                    dtype=dtype,
                    count=end - self._measured,
                    offset=info.offset + self._measured * itemsize,
                )
                for start in range(0, values.numel(), NORM_BLOCK):
                    part = values[start : start + NORM_BLOCK].to(torch.float64)
                    first = self._measured + start
                    part.sub_(reference[first : first + part.numel()])
                    self._sum_sq += float(part.square_().sum())
                self._measured = end
            if self._measured < count:
                return
            self._index += 1
            self._measured = 0

    def norm(self) -> float:
        """The distance; valid once :meth:`advance` has seen the whole payload."""
        if self._index < len(self._tensors):
            raise RuntimeError("the payload has not been measured to its end")
        return math.sqrt(self._sum_sq)


def clip_in_place(
    weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], scale: float
) -> None:
    """``w = reference + (w - reference) * scale`` for every floating-point tensor, in place
    (the received buffer is the coordinator's own), block by block in float64."""
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            continue
        values = tensor.view(-1)
        base = reference[name].reshape(-1)
        for start in range(0, values.numel(), CLIP_BLOCK):
            part = values[start : start + CLIP_BLOCK].to(torch.float64)
            origin = base[start : start + CLIP_BLOCK].to(torch.float64)
            values[start : start + CLIP_BLOCK].copy_(part.sub_(origin).mul_(scale).add_(origin))


@dataclass(frozen=True)
class NormBound:
    """A round's bound on update norms: what it is, what happens above it, and whence it
    came (for the refusal's message)."""

    limit: float
    action: Literal["reject", "clip"]
    source: str


def bound_for_round(
    spec: UpdateBoundsSpec | None, earlier: Sequence[RoundRecord]
) -> NormBound | None:
    """The bound of the next round from the job's ``update_bounds`` and earlier rounds.

    ``max_norm_vs_median`` takes the median of the accepted updates' norms of the latest
    earlier rounds, going back until at least ``median_of`` norms are gathered; with fewer
    (the first rounds) or a median of 0, only ``max_norm`` bounds the round, if given.
    """
    if spec is None:
        return None
    candidates: list[tuple[float, str]] = []
    if spec.max_norm is not None:
        candidates.append((spec.max_norm, f"update_bounds.max_norm {spec.max_norm:g}"))
    if spec.max_norm_vs_median is not None:
        norms: list[float] = []
        for record in reversed(earlier):
            norms.extend(record.update_norms)
            if len(norms) >= spec.median_of:
                break
        median = statistics.median(norms) if len(norms) >= spec.median_of else 0.0
        if median > 0:
            candidates.append(
                (
                    spec.max_norm_vs_median * median,
                    f"update_bounds.max_norm_vs_median {spec.max_norm_vs_median:g} times the "
                    f"median {median:.4g} of {len(norms)} norms of earlier rounds",
                )
            )
    if not candidates:
        return None
    limit, source = min(candidates)
    return NormBound(limit, spec.action, source)
