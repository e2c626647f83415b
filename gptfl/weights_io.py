"""Weights at rest: safetensors files with string metadata, written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptfl import atomic_io
from gptfl.errors import ValidationError
from gptfl.weights import WeightMap

METADATA_KEY = "gptfl"


def save_weights(
    path: Path, weights: Mapping[str, torch.Tensor], *, metadata: Mapping[str, Any] | None = None
) -> None:
    """Saves ``weights`` to ``path`` atomically; ``metadata`` is stored as JSON in the header."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
    header = {METADATA_KEY: json.dumps(dict(metadata or {}), sort_keys=True)}
    with atomic_io.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_weights(path: Path) -> tuple[WeightMap, dict[str, Any]]:
    """Loads a safetensors file written by :func:`save_weights` (or any safetensors file)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise ValidationError(f"{path}: no such weights file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValidationError(f"{path}: not a readable safetensors file ({exc})") from None
    metadata: dict[str, Any] = json.loads(header.get(METADATA_KEY, "{}"))
    # safetensors lists tensors by name; that order is deterministic.
    return tensors, metadata
