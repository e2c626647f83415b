"""The streaming safetensors writer: any safetensors reader loads what it writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gptfl import weights_io
from gptfl.errors import ValidationError
from gptfl.weights_io import load_weights, save_weights


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "z.first": torch.randn(7, 5, generator=gen),
        "a.second": torch.randn(3, 4, generator=gen).t(),  # not contiguous
        "half": torch.randn(9, generator=gen).to(torch.float16),
        "brain": torch.randn(6, generator=gen).to(torch.bfloat16),
        "double": torch.randn(2, generator=gen).to(torch.float64),
        "steps": torch.arange(5),
        "small": torch.arange(3, dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }


@pytest.mark.parametrize(("piece", "sync"), [(7, 10), (1 << 20, 1 << 30)])
def test_the_safetensors_library_reads_the_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int, sync: int
) -> None:
    # Small pieces and syncs cut tensors and the header at odd places.
    monkeypatch.setattr(weights_io, "WRITE_PIECE_BYTES", piece)
    weights = _weights()
    path = tmp_path / "model.safetensors"
    save_weights(path, weights, metadata={"round": 4}, sync_bytes=sync)
    loaded = load_file(str(path))
    assert set(loaded) == set(weights)
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads((handle.metadata() or {})["gptfl"]) == {"round": 4}
    assert load_weights(path)[1] == {"round": 4}


def test_the_file_is_header_then_the_tensors_in_order(tmp_path: Path) -> None:
    weights = {"b": torch.ones(2), "a": torch.full((3,), 2, dtype=torch.int16)}
    path = tmp_path / "m.safetensors"
    save_weights(path, weights)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    assert size % 8 == 0  # the data starts 8-byte aligned
    header = json.loads(data[8 : 8 + size])
    assert header["b"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert header["a"] == {"dtype": "I16", "shape": [3], "data_offsets": [8, 14]}
    body = data[8 + size :]
    assert body == weights["b"].numpy().tobytes() + weights["a"].numpy().tobytes()


def test_an_unsupported_dtype_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValidationError, match=r"tensor 'c'.*complex64"):
        save_weights(path, {"a": torch.ones(2), "c": torch.ones(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(path, {"a": torch.ones(2)}, metadata={"v": 1})

    def full_disk(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights_io.os, "fdatasync", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_weights(path, {"a": torch.zeros(2)}, metadata={"v": 2})
    assert load_weights(path)[1] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp left
