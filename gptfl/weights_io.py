"""Weights at rest: safetensors files with string metadata, written atomically.

:func:`save_weights` writes the safetensors format itself (an 8-byte little-endian header
size, a JSON header, then every tensor's bytes) straight from the tensors' memory, in pieces
of :data:`WRITE_PIECE_BYTES`: no copy of the model is made in the process. Every
:data:`SYNC_BYTES` written, the file's data is flushed to disk and dropped from the page
cache, so a checkpoint of a multi-GB model does not also leave GBs of dirty pages in memory
(which the kernel would otherwise fill, and reclaim, while the coordinator is receiving the
next round's updates). Any safetensors reader loads the files; :func:`load_weights` uses the
safetensors library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from gptfl import atomic_io
from gptfl.errors import ValidationError
from gptfl.weights import WeightMap, tensor_bytes

METADATA_KEY = "gptfl"
#: the largest single ``write`` (the GIL is released for each)
WRITE_PIECE_BYTES = 8 << 20
#: written data is synced to disk and dropped from the page cache after this many bytes
SYNC_BYTES = 64 << 20

# safetensors' names for torch dtypes (the format's "dtype" field)
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_weights(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, Any] | None = None,
    sync_bytes: int = SYNC_BYTES,
) -> None:
    """Saves ``weights`` to ``path`` atomically; ``metadata`` is stored as JSON in the header.

    The tensors are read while the file is written, so they must not change until this
    returns. ``sync_bytes`` is how much is written between syncs (tests make it small).

    Raises:
        ValidationError: a tensor's dtype has no safetensors name.
    """
    tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
    header = _header(tensors, {METADATA_KEY: json.dumps(dict(metadata or {}), sort_keys=True)})
    with atomic_io.atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            writer = _SyncingWriter(fd, sync_bytes)
            writer.write(memoryview(header))
            for tensor in tensors.values():
                if tensor.numel():
                    writer.write(tensor_bytes(tensor))
            writer.sync()
        finally:
            os.close(fd)


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The size prefix and JSON header of a safetensors file holding ``tensors`` in order."""
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        try:
            dtype = _SAFETENSORS_DTYPES[tensor.dtype]
        except KeyError:
            raise ValidationError(
                f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name"
            ) from None
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text


class _SyncingWriter:
    """Writes to ``fd`` in pieces; every ``sync_bytes`` syncs and drops the written pages."""

    def __init__(self, fd: int, sync_bytes: int) -> None:
        self._fd = fd
        self._sync_bytes = max(1, sync_bytes)
        self._written = 0
        self._synced = 0

    def write(self, data: memoryview) -> None:
        position = 0
        while position < len(data):
            step = min(WRITE_PIECE_BYTES, len(data) - position)
            written = os.write(self._fd, data[position : position + step])
            position += written
            self._written += written
            if self._written - self._synced >= self._sync_bytes:
                self.sync()

    def sync(self) -> None:
        """Flushes what was written to disk and drops it from the page cache."""
        os.fdatasync(self._fd)
        os.posix_fadvise(
            self._fd, self._synced, self._written - self._synced, os.POSIX_FADV_DONTNEED
        )
        self._synced = self._written


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
