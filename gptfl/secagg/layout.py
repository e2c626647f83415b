"""Where a model's update sits in the one flat vector that secure aggregation masks.

Both sides lay out the same tensors in the same order: every floating-point tensor of the
global model (integer buffers such as BatchNorm's step counter are not averaged), sorted by
name, flattened and concatenated. A silo masks ``its model - the global model`` in this
layout and uploads it as one integer tensor, :data:`MASKED_TENSOR`; the coordinator unmasks
the sum in the same layout and puts it back into the model's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from gptfl.errors import ManifestMismatchError
from gptfl.secagg.ring import Ring
from gptfl.weights import TensorSpec, WeightMap

#: the name of the one tensor a masked upload holds
MASKED_TENSOR = "secagg.masked"
_FLOATING = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class UpdateLayout:
    """The floating-point tensors of a model, in the order they are flattened.

    Attributes:
        tensors: their specs, sorted by name.
    """

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, specs: Iterable[TensorSpec]) -> UpdateLayout:
        """The layout of a model with these tensors (its manifest's specs)."""
        return cls(tuple(sorted((s for s in specs if s.dtype in _FLOATING), key=lambda s: s.name)))

    @property
    def length(self) -> int:
        """How many values the flat vector holds."""
        return sum(math.prod(spec.shape) for spec in self.tensors)

    def masked_spec(self, ring: Ring) -> TensorSpec:
        """What a masked upload in this layout must be."""
        return TensorSpec(MASKED_TENSOR, (self.length,), ring.wire_dtype.name)

    def flatten_update(
        self, weights: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor]
    ) -> npt.NDArray[np.float64]:
        """``weights - global_weights`` over the layout's tensors, as one float64 vector.

        Raises:
            ManifestMismatchError: a tensor is missing or of another shape.
        """
        out = np.empty(self.length, dtype=np.float64)
        position = 0
        for spec in self.tensors:
            size = math.prod(spec.shape)
            for where, tensors in (("trained", weights), ("global", global_weights)):
                tensor = tensors.get(spec.name)
                if tensor is None or tuple(tensor.shape) != spec.shape:
                    raise ManifestMismatchError(
                        f"the {where} model has no tensor {spec.name!r} of shape {spec.shape}"
                    )
            trained = _as_numpy(weights[spec.name])
            base = _as_numpy(global_weights[spec.name])
            np.subtract(trained, base, out=out[position : position + size], dtype=np.float64)
            position += size
        return out

    def add_to(
        self, global_weights: Mapping[str, torch.Tensor], update: npt.NDArray[np.float64]
    ) -> WeightMap:
        """``global_weights + update`` over the layout's tensors, in their own dtypes."""
        if update.shape != (self.length,):
            raise ValueError(f"an update of {self.length} values expected, got {update.shape}")
        out: WeightMap = {}
        position = 0
        for spec in self.tensors:
            size = math.prod(spec.shape)
            base = global_weights[spec.name]
            piece = torch.from_numpy(update[position : position + size]).reshape(spec.shape)
            out[spec.name] = (base.double() + piece).to(base.dtype)
            position += size
        return out


def _as_numpy(tensor: torch.Tensor) -> npt.NDArray[np.floating]:
    """A flat numpy view of a float tensor (bfloat16, which numpy lacks, as float32)."""
    flat = tensor.detach().cpu().reshape(-1)
    if flat.dtype is torch.bfloat16:
        flat = flat.float()
    return flat.numpy()
