"""Weights at rest: safetensors files with string metadata, written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        raise ValidationError(f"{path}: no such weights file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValidationError(f"{path}: not a readable safetensors file ({exc})") from None
    raw = header.get("__metadata__", {}).get(METADATA_KEY, "{}")
    metadata: dict[str, Any] = json.loads(raw)
    # safetensors sorts tensors by name on load; keep that order (it is deterministic).
    return dict(tensors), metadata
