"""Chunked weight payloads (gptfl.weights) and weights at rest (gptfl.weights_io)."""

from __future__ import annotations

import dataclasses
import gc
import math
import zlib
from pathlib import Path

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl.errors import (
    ChecksumError,
    ChunkOrderError,
    ManifestMismatchError,
    NonFiniteError,
    ResourceLimitError,
    ValidationError,
)
from gptfl.weights import (
    ALIGNMENT,
    MAX_CHUNK_BYTES,
    Chunk,
    Manifest,
    PayloadReceiver,
    TensorInfo,
    TensorSpec,
    WeightMap,
    build_manifest,
    check_manifest,
    iter_chunks,
    manifest_and_crcs,
    new_payload_buffer,
    receive_all,
    specs_of,
)
from gptfl.weights_io import load_weights, save_weights

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)


def _mixed() -> WeightMap:
    return {
        "conv.weight": _tensor((4, 3, 3, 3), torch.float32, 0),
        "conv.bias": _tensor((4,), torch.float16, 1),
        "norm.weight": _tensor((5, 7), torch.bfloat16, 2),
        "steps": _tensor((3,), torch.int64, 3),
        "mask": _tensor((2, 9), torch.bool, 4),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }


def _round_trip(weights: WeightMap, chunk_size: int = MAX_CHUNK_BYTES) -> WeightMap:
    manifest = build_manifest(weights, chunk_size=chunk_size)
    return receive_all(manifest, iter_chunks(weights, manifest), expected=specs_of(weights))


def _assert_same(got: WeightMap, want: WeightMap) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def _payload(weights: WeightMap, chunk_size: int) -> tuple[Manifest, list[Chunk]]:
    manifest = build_manifest(weights, chunk_size=chunk_size)
    return manifest, list(iter_chunks(weights, manifest))


def _feed(manifest: Manifest, chunks: list[Chunk], **kwargs: object) -> WeightMap:
    receiver = PayloadReceiver(manifest, **kwargs)  # type: ignore[arg-type]
    for chunk in chunks:
        receiver.add(chunk)
    return receiver.finish()


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [64, 100, 4096, MAX_CHUNK_BYTES])
def test_mixed_dtypes_round_trip(chunk_size: int) -> None:
    weights = _mixed()
    _assert_same(_round_trip(weights, chunk_size), weights)


def test_manifest_describes_the_layout() -> None:
    weights = _mixed()
    manifest = build_manifest(weights)
    assert [t.name for t in manifest.tensors] == list(weights)
    assert manifest.specs == specs_of(weights)
    by_name = {t.name: t for t in manifest.tensors}
    assert by_name["norm.weight"].dtype == "bfloat16"
    assert by_name["mask"].dtype == "bool"
    assert by_name["scalar"].shape == ()
    assert by_name["empty"].nbytes == 0
    for info in manifest.tensors:
        assert info.offset % ALIGNMENT == 0
    payload = b"".join(c.data for c in iter_chunks(weights, manifest))
    assert len(payload) == manifest.total_bytes
    assert blake3.blake3(payload).hexdigest() == manifest.digest
    check_manifest(manifest, expected=specs_of(weights))


def test_non_contiguous_tensor_round_trips() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    weights = {"t": base.t()}
    got = _round_trip(weights, 16)
    assert torch.equal(got["t"], base.t())


def test_only_empty_tensors_make_an_empty_payload() -> None:
    weights = {"a": torch.empty(0), "b": torch.empty(3, 0, dtype=torch.int64)}
    manifest, chunks = _payload(weights, 64)
    assert manifest.total_bytes == 0
    assert manifest.num_chunks == 0
    assert chunks == []
    # BLAKE3 of no input, from the BLAKE3 specification's test vectors
    assert manifest.digest == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    _assert_same(receive_all(manifest, iter(chunks)), weights)


def test_expected_specs_may_come_in_any_order() -> None:
    weights = _mixed()
    manifest = build_manifest(weights)
    check_manifest(manifest, expected=tuple(reversed(specs_of(weights))))


def test_unsupported_dtype_is_rejected() -> None:
    with pytest.raises(ValidationError, match="unsupported tensor dtype"):
        build_manifest({"c": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize("chunk_size", [0, MAX_CHUNK_BYTES + 1])
def test_chunk_size_outside_the_limit_is_refused(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        build_manifest({"a": torch.zeros(2)}, chunk_size=chunk_size)


_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(st.tuples(_shapes, st.sampled_from(DTYPES)), min_size=1, max_size=5),
    chunk_size=st.sampled_from([64, 96, 100, 128, 1000]),
    seed=st.integers(0, 2**16),
)
def test_any_shapes_round_trip_in_well_formed_chunks(
    specs: list[tuple[tuple[int, ...], torch.dtype]], chunk_size: int, seed: int
) -> None:
    weights = {f"t{i}": _tensor(shape, dtype, seed + i) for i, (shape, dtype) in enumerate(specs)}
    manifest, chunks = _payload(weights, chunk_size)
    assert len(chunks) == manifest.num_chunks == math.ceil(manifest.total_bytes / chunk_size)
    position = 0
    for i, chunk in enumerate(chunks):
        assert chunk.index == i
        assert chunk.offset == position
        assert 0 < len(chunk.data) <= chunk_size
        assert chunk.crc32 == zlib.crc32(chunk.data)
        if i < len(chunks) - 1:
            assert len(chunk.data) == chunk_size  # only the last chunk may be short
        position += len(chunk.data)
    assert position == manifest.total_bytes
    _assert_same(receive_all(manifest, iter(chunks), expected=specs_of(weights)), weights)


@settings(max_examples=40, deadline=None)
@given(
    chunk_size=st.sampled_from([64, 100, 256]),
    whole=st.integers(0, 3),
    delta=st.integers(-2, 2),
)
def test_payload_sizes_around_the_chunk_boundary(chunk_size: int, whole: int, delta: int) -> None:
    size = max(whole * chunk_size + delta, 1)
    weights = {"bytes": _tensor((size,), torch.int64, size).to(torch.uint8)}
    manifest, chunks = _payload(weights, chunk_size)
    assert manifest.total_bytes == size
    assert [len(c.data) for c in chunks] == [chunk_size] * (size // chunk_size) + (
        [size % chunk_size] if size % chunk_size else []
    )
    _assert_same(receive_all(manifest, iter(chunks)), weights)


@pytest.mark.parametrize("elements", [(1 << 18) - 1, 1 << 18, (1 << 18) + 1])
def test_default_chunks_hold_at_most_one_mebibyte(elements: int) -> None:
    weights = {"w": torch.arange(elements, dtype=torch.float32)}
    manifest, chunks = _payload(weights, MAX_CHUNK_BYTES)
    assert max(len(c.data) for c in chunks) <= MAX_CHUNK_BYTES
    assert len(chunks) == math.ceil(elements * 4 / MAX_CHUNK_BYTES)
    _assert_same(receive_all(manifest, iter(chunks)), weights)


# ---- corruption in the stream --------------------------------------------------------------


@pytest.fixture()
def payload() -> tuple[WeightMap, Manifest, list[Chunk]]:
    weights = {"a": torch.randn(40), "b": torch.randn(3, 10)}
    manifest, chunks = _payload(weights, 64)
    assert len(chunks) >= 4
    return weights, manifest, chunks


def _flip(chunk: Chunk, *, fix_crc: bool) -> Chunk:
    data = bytearray(chunk.data)
    data[len(data) // 2] ^= 0x01
    crc = zlib.crc32(bytes(data)) if fix_crc else chunk.crc32
    return dataclasses.replace(chunk, data=bytes(data), crc32=crc)


def test_flipped_byte_fails_the_crc(payload: tuple[WeightMap, Manifest, list[Chunk]]) -> None:
    _, manifest, chunks = payload
    chunks[1] = _flip(chunks[1], fix_crc=False)
    with pytest.raises(ChecksumError, match="chunk 1 failed its crc32"):
        _feed(manifest, chunks)


def test_flipped_byte_with_a_matching_crc_fails_the_digest(
    payload: tuple[WeightMap, Manifest, list[Chunk]],
) -> None:
    _, manifest, chunks = payload
    chunks[2] = _flip(chunks[2], fix_crc=True)
    with pytest.raises(ChecksumError, match="payload digest"):
        _feed(manifest, chunks)


@pytest.mark.parametrize(
    "reorder",
    [
        pytest.param(lambda c: [c[1], c[0], *c[2:]], id="swapped"),
        pytest.param(lambda c: [c[0], *c[2:]], id="skipped"),
        pytest.param(lambda c: [c[0], c[0], *c[1:]], id="duplicated"),
        pytest.param(
            lambda c: [c[0], dataclasses.replace(c[1], offset=c[1].offset + 1)], id="offset"
        ),
    ],
)
def test_chunks_out_of_order_are_refused(
    payload: tuple[WeightMap, Manifest, list[Chunk]], reorder: object
) -> None:
    _, manifest, chunks = payload
    with pytest.raises(ChunkOrderError, match="out of order"):
        _feed(manifest, reorder(chunks))  # type: ignore[operator]


def test_truncated_stream_is_refused(payload: tuple[WeightMap, Manifest, list[Chunk]]) -> None:
    _, manifest, chunks = payload
    with pytest.raises(ChunkOrderError, match="stream ended after"):
        _feed(manifest, chunks[:-1])


def test_chunk_past_the_declared_size_is_refused(
    payload: tuple[WeightMap, Manifest, list[Chunk]],
) -> None:
    _, manifest, chunks = payload
    last = chunks[-1]
    extra = Chunk(last.index + 1, last.offset + len(last.data), b"x", zlib.crc32(b"x"))
    with pytest.raises(ChunkOrderError, match="runs past"):
        _feed(manifest, [*chunks, extra])


@pytest.mark.parametrize("data", [b"", bytes(65)])
def test_empty_or_oversized_chunk_is_refused(
    payload: tuple[WeightMap, Manifest, list[Chunk]], data: bytes
) -> None:
    _, manifest, _ = payload
    with pytest.raises(ChunkOrderError, match="chunks hold 1 to 64"):
        _feed(manifest, [Chunk(0, 0, data, zlib.crc32(data))])


def test_wrong_digest_in_the_manifest_is_detected(
    payload: tuple[WeightMap, Manifest, list[Chunk]],
) -> None:
    _, manifest, chunks = payload
    forged = dataclasses.replace(manifest, digest=blake3.blake3(b"other").hexdigest())
    with pytest.raises(ChecksumError, match=r"payload digest \(blake3\) does not match"):
        _feed(forged, chunks)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_values_are_refused(bad: float, dtype: torch.dtype) -> None:
    values = torch.zeros(10, dtype=dtype)
    values[7] = bad
    weights = {"fine": torch.ones(3), "broken": values}
    manifest, chunks = _payload(weights, 64)
    with pytest.raises(NonFiniteError, match="'broken'"):
        _feed(manifest, chunks)
    receiver = PayloadReceiver(manifest)
    for chunk in chunks:
        receiver.add(chunk)
    assert not torch.isfinite(receiver.finish(require_finite=False)["broken"]).all()


# ---- manifests against what the receiver expects --------------------------------------------


def _specs() -> tuple[TensorSpec, ...]:
    return (TensorSpec("w", (2, 3), "float32"), TensorSpec("b", (3,), "float32"))


def _manifest_for(specs: tuple[TensorSpec, ...]) -> Manifest:
    from gptfl.weights import torch_dtype

    return build_manifest({s.name: torch.zeros(s.shape, dtype=torch_dtype(s.dtype)) for s in specs})


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        pytest.param((TensorSpec("w", (2, 3), "float32"),), r"missing \['b'\]", id="missing"),
        pytest.param(
            (*_specs(), TensorSpec("extra.bias", (1,), "float32")),
            r"unexpected \['extra.bias'\]",
            id="extra",
        ),
        pytest.param(
            (TensorSpec("w", (3, 2), "float32"), TensorSpec("b", (3,), "float32")),
            r"tensor 'w' has shape \[3, 2\], expected \[2, 3\]",
            id="shape",
        ),
        pytest.param(
            (TensorSpec("w", (2, 3), "float32"), TensorSpec("b", (3,), "float16")),
            "tensor 'b' has dtype float16, expected float32",
            id="dtype",
        ),
    ],
)
def test_manifest_that_differs_from_the_expected_model_is_refused(
    sent: tuple[TensorSpec, ...], message: str
) -> None:
    manifest = _manifest_for(sent)
    with pytest.raises(ManifestMismatchError, match=message):
        PayloadReceiver(manifest, expected=_specs())


def test_payload_over_max_bytes_is_refused_before_allocation() -> None:
    manifest = build_manifest({"w": torch.zeros(100)})
    with pytest.raises(ResourceLimitError, match="exceeds the limit of 399"):
        PayloadReceiver(manifest, max_bytes=399)
    PayloadReceiver(manifest, max_bytes=400)


def _two_tensor_manifest() -> Manifest:
    return build_manifest({"a": torch.zeros(10), "b": torch.zeros(4, dtype=torch.int64)})


def _edit_tensor(manifest: Manifest, index: int, **changes: object) -> Manifest:
    tensors = list(manifest.tensors)
    tensors[index] = dataclasses.replace(tensors[index], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(manifest, tensors=tuple(tensors))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(lambda m: _edit_tensor(m, 1, offset=0), "overlaps", id="overlap"),
        pytest.param(lambda m: _edit_tensor(m, 1, offset=65), "unaligned", id="unaligned"),
        pytest.param(lambda m: _edit_tensor(m, 0, nbytes=36), "does not match shape", id="nbytes"),
        pytest.param(
            lambda m: _edit_tensor(m, 0, shape=(11,)), "does not match shape", id="shape-nbytes"
        ),
        pytest.param(lambda m: _edit_tensor(m, 0, shape=(-1,)), "negative", id="negative-dim"),
        pytest.param(lambda m: _edit_tensor(m, 1, name="a"), "appears twice", id="dup-name"),
        pytest.param(lambda m: _edit_tensor(m, 0, dtype="float8"), "unknown dtype", id="dtype"),
        pytest.param(
            lambda m: dataclasses.replace(m, total_bytes=m.total_bytes - 1), "past", id="short"
        ),
        pytest.param(
            lambda m: dataclasses.replace(m, total_bytes=m.total_bytes + ALIGNMENT),
            "trailing",
            id="trailing",
        ),
        pytest.param(lambda m: dataclasses.replace(m, digest="ABC"), "digest", id="digest-format"),
        pytest.param(
            lambda m: dataclasses.replace(m, chunk_size=MAX_CHUNK_BYTES + 1),
            "chunk_size",
            id="chunk-size",
        ),
    ],
)
def test_inconsistent_manifest_is_refused(edit: object, message: str) -> None:
    manifest = _two_tensor_manifest()
    check_manifest(manifest)  # the unedited one is fine
    bad = edit(manifest)  # type: ignore[operator]
    with pytest.raises(ValidationError, match=message):
        check_manifest(bad)
    with pytest.raises(ValidationError, match=message):
        PayloadReceiver(bad)


def test_overlap_is_found_even_when_aligned() -> None:
    manifest = build_manifest({"a": torch.zeros(40), "b": torch.zeros(4)})
    assert manifest.tensors[1].offset == 192
    overlapping = _edit_tensor(manifest, 1, offset=128)
    with pytest.raises(ValidationError, match="offset 128 overlaps"):
        check_manifest(overlapping)


def test_tensor_info_spec() -> None:
    info = TensorInfo("x", (2,), "int64", 0, 16)
    assert info.spec == TensorSpec("x", (2,), "int64")


# ---- weights at rest -----------------------------------------------------------------------


def test_safetensors_round_trip_keeps_values_and_metadata(tmp_path: Path) -> None:
    weights = _mixed()
    metadata = {"round": 3, "model": {"arch": "cnn-small"}, "note": "ok"}
    path = tmp_path / "sub" / "model.safetensors"
    save_weights(path, weights, metadata=metadata)
    loaded, meta = load_weights(path)
    assert meta == metadata
    assert set(loaded) == set(weights)
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]  # no temp left


def test_safetensors_without_metadata_loads_empty_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(path, {"a": torch.ones(2)})
    assert load_weights(path)[1] == {}


def test_missing_weights_file_is_a_validation_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no such weights file"):
        load_weights(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_file_is_a_validation_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(path, {"a": torch.randn(100)}, metadata={"round": 1})
    data = path.read_bytes()
    path.write_bytes(b"not a safetensors file at all" if damage == "garbage" else data[:-50])
    with pytest.raises(ValidationError, match="not a readable safetensors file"):
        load_weights(path)


def test_chunks_inside_a_tensor_are_views_not_copies() -> None:
    weights = {"big": torch.arange(3 * 4096, dtype=torch.float32), "small": torch.ones(3)}
    manifest = build_manifest(weights, chunk_size=4096)
    chunks = list(iter_chunks(weights, manifest))
    assert isinstance(chunks[0].data, memoryview)  # wholly inside "big"
    assert isinstance(chunks[-1].data, bytes)  # the tail spans padding and "small"
    assert receive_all(manifest, iter(chunks)).keys() == weights.keys()


def test_given_checksums_are_used_and_must_fit() -> None:
    weights = _mixed()
    manifest = build_manifest(weights, chunk_size=64)
    same, crcs = manifest_and_crcs(weights, chunk_size=64)
    assert same == manifest  # the same manifest, digest included
    assert [c.crc32 for c in iter_chunks(weights, manifest)] == list(crcs)
    wrong = tuple(c ^ 1 for c in crcs)
    assert [c.crc32 for c in iter_chunks(weights, manifest, crcs=wrong)] == list(wrong)
    with pytest.raises(ValueError, match="checksums for"):
        list(iter_chunks(weights, manifest, crcs=crcs[:-1]))


def test_a_reused_buffer_receives_a_new_payload_correctly() -> None:
    first, second = _mixed(), {k: v.clone() for k, v in _mixed().items()}
    second["conv.weight"] += 1.0
    manifest_a = build_manifest(first, chunk_size=128)
    buffer = bytearray(manifest_a.total_bytes)
    receiver = PayloadReceiver(manifest_a, buffer=buffer)
    for chunk in iter_chunks(first, manifest_a):
        receiver.add(chunk)
    receiver.finish()
    manifest_b = build_manifest(second, chunk_size=128)
    receiver = PayloadReceiver(manifest_b, buffer=buffer)
    for chunk in iter_chunks(second, manifest_b):
        receiver.add(chunk)
    got = receiver.finish()
    assert torch.equal(got["conv.weight"], second["conv.weight"])


def test_a_buffer_of_the_wrong_size_is_refused() -> None:
    weights = _mixed()
    manifest = build_manifest(weights)
    with pytest.raises(ValueError, match="buffer of"):
        PayloadReceiver(manifest, buffer=bytearray(manifest.total_bytes + 1))


# ---- receive buffers -----------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, 1, 4097, 3 << 20])
def test_a_new_payload_buffer_is_zeroed_and_writable(nbytes: int) -> None:
    buffer = new_payload_buffer(nbytes)
    assert len(buffer) == nbytes
    view = memoryview(buffer)
    assert not view.readonly
    assert bytes(view[:64]) == bytes(min(64, nbytes))
    if nbytes:
        view[nbytes - 1] = 7
        assert buffer[nbytes - 1] == 7


def test_received_tensors_keep_their_buffer_alive() -> None:
    # The default buffer is a memory mapping: the tensors, views into it, must keep it
    # mapped after the receiver (its only other reference) is gone.
    weights = {"w": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(3)}
    manifest = build_manifest(weights)
    receiver = PayloadReceiver(manifest)
    for chunk in iter_chunks(weights, manifest):
        receiver.add(chunk)
    got = receiver.finish()
    del receiver
    gc.collect()
    _ = [torch.ones(300_000) for _ in range(8)]  # memory that could reuse a freed mapping
    _assert_same(got, weights)
