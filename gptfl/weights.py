"""Model weights as a checksummed byte payload that moves in chunks.

A weight map (tensor name -> tensor) is laid out as one payload: each tensor's bytes, C order,
little-endian, at a 64-byte aligned offset (so the receiver can view tensors in place without
copying). A :class:`Manifest` describes the layout and carries the digest of the whole
payload (BLAKE3-256, :data:`DIGEST_ALGORITHM`): the model's identity, and the end-to-end check
that a receiver reassembled exactly what was sent. The payload then moves as :class:`Chunk`
objects of at most :data:`MAX_CHUNK_BYTES`, each with a crc32 (the per-message check, which
names the chunk that went wrong). :class:`PayloadReceiver` checks everything a peer could get
wrong (names, shapes, dtypes, sizes, order, checksums, finiteness) before any tensor is
handed out.

Why BLAKE3 rather than sha256: both are cryptographic 256-bit hashes (a peer cannot make two
payloads with one digest), and every byte of a transfer goes through the digest on both ends;
BLAKE3 costs about a quarter of sha256's CPU here (0.016 s against 0.059 s per 100 MB of
cache-resident data on one core, docs/benchmarks.md).

This module knows nothing of protobuf; :mod:`gptfl.serde` converts to and from the wire.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import numpy
import torch
from zlib_ng.zlib_ng import crc32  # zlib's CRC-32 with SIMD, ~13x faster

from gptfl.errors import (
    ChecksumError,
    ChunkOrderError,
    ManifestMismatchError,
    NonFiniteError,
    ResourceLimitError,
    ValidationError,
)

MAX_CHUNK_BYTES = 1 << 20  # 1 MiB: far below gRPC's default 4 MiB message limit
ALIGNMENT = 64
DEFAULT_MAX_PAYLOAD_BYTES = 8 << 30
#: the hash of :attr:`Manifest.digest`: BLAKE3 with its default 256-bit output, lowercase hex
DIGEST_ALGORITHM = "blake3"
DIGEST_HEX_LENGTH = 64

WeightMap = dict[str, torch.Tensor]
#: a writable buffer a payload is received into (see :func:`new_payload_buffer`)
PayloadBuffer = bytearray | mmap.mmap

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValidationError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire name; unknown names are a :class:`ValidationError`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValidationError(
            f"unknown dtype {name!r}; expected one of {', '.join(sorted(_DTYPES))}"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor must be: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's place in a payload."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.dtype)


@dataclass(frozen=True)
class Manifest:
    """The layout and digest of a weight payload.

    ``digest`` is the BLAKE3-256 hex digest of the payload (:func:`payload_digest`): the
    same weights always have the same digest, on every participant.
    """

    tensors: tuple[TensorInfo, ...]
    total_bytes: int
    digest: str
    chunk_size: int = MAX_CHUNK_BYTES

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return tuple(t.spec for t in self.tensors)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.total_bytes / self.chunk_size) if self.total_bytes else 0


@dataclass(frozen=True)
class Chunk:
    """One slice of a payload, in order.

    ``data`` may be a view (into a tensor being sent, or into a received message); it is only
    valid while that memory is, so a receiver copies it (as :class:`PayloadReceiver` does).
    """

    index: int
    offset: int
    data: bytes | memoryview
    crc32: int


def specs_of(weights: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """The name/shape/dtype of each tensor, in the map's order."""
    return tuple(
        TensorSpec(name, tuple(t.shape), dtype_name(t.dtype)) for name, t in weights.items()
    )


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, C order, as a view (a copy only for a non-contiguous tensor; a
    bool tensor is viewed as one byte per element)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


def _layout(weights: Mapping[str, torch.Tensor]) -> tuple[list[TensorInfo], int]:
    infos = []
    offset = 0
    for name, tensor in weights.items():
        offset = _aligned(offset)
        nbytes = tensor.numel() * tensor.element_size()
        infos.append(
            TensorInfo(name, tuple(tensor.shape), dtype_name(tensor.dtype), offset, nbytes)
        )
        offset += nbytes
    return infos, offset


def _segments(
    weights: Mapping[str, torch.Tensor], infos: Sequence[TensorInfo]
) -> Iterator[memoryview]:
    """The payload as a sequence of byte views: padding, tensor bytes, padding, ..."""
    position = 0
    for info, tensor in zip(infos, weights.values(), strict=True):
        if info.offset > position:
            yield memoryview(bytes(info.offset - position))
        yield tensor_bytes(tensor)
        position = info.offset + info.nbytes


def _hasher(*, all_cores: bool = False) -> blake3.blake3:
    """A BLAKE3 hasher. ``all_cores`` lets one large update (a whole tensor) use every core;
    a receiver that hashes 1 MiB chunks as they arrive keeps to its own thread."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO if all_cores else 1)


def payload_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """The BLAKE3 hex digest of the payload of ``weights`` (one pass over the bytes, no copy)."""
    digest = _hasher(all_cores=True)
    for segment in _segments(weights, _layout(weights)[0]):
        digest.update(segment)
    return digest.hexdigest()


def build_manifest(
    weights: Mapping[str, torch.Tensor], *, chunk_size: int = MAX_CHUNK_BYTES
) -> Manifest:
    """Lays out ``weights`` and hashes the payload (one pass over the bytes, no copy)."""
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK_BYTES}], got {chunk_size}")
    infos, total = _layout(weights)
    return Manifest(tuple(infos), total, payload_digest(weights), chunk_size)


def iter_chunks(
    weights: Mapping[str, torch.Tensor],
    manifest: Manifest,
    *,
    crcs: Sequence[int] | None = None,
) -> Iterator[Chunk]:
    """Cuts the payload of ``weights`` (laid out as in ``manifest``) into checksummed chunks.

    A chunk that lies inside one tensor is a view of that tensor's memory (no copy); only a
    chunk that spans tensors or padding is joined into new bytes. ``crcs``, from an earlier
    :func:`manifest_and_crcs` of the same weights, saves computing the checksums again (the
    coordinator sends one model version to every silo).
    """
    size = manifest.chunk_size
    if crcs is not None and len(crcs) != manifest.num_chunks:
        raise ValueError(f"{len(crcs)} checksums for {manifest.num_chunks} chunks")
    pending: list[memoryview] = []
    pending_bytes = 0
    index = 0
    offset = 0

    def emit(data: bytes | memoryview) -> Chunk:
        nonlocal index, offset
        crc = crcs[index] if crcs is not None else crc32(data)
        chunk = Chunk(index, offset, data, crc)
        index += 1
        offset += len(data)
        return chunk

    for segment in _segments(weights, manifest.tensors):
        start = 0
        while start < len(segment):
            take = min(size - pending_bytes, len(segment) - start)
            piece = segment[start : start + take]
            start += take
            if take == size:  # a whole chunk inside this segment: send the view itself
                yield emit(piece)
                continue
            pending.append(piece)
            pending_bytes += take
            if pending_bytes == size:
                yield emit(b"".join(pending))
                pending, pending_bytes = [], 0
    if pending_bytes:
        yield emit(b"".join(pending))


def manifest_and_crcs(
    weights: Mapping[str, torch.Tensor], *, chunk_size: int = MAX_CHUNK_BYTES
) -> tuple[Manifest, tuple[int, ...]]:
    """:func:`build_manifest` and every chunk's crc32 (for :func:`iter_chunks`): what a sender
    that serves the same weights many times (the coordinator, to every silo) computes once."""
    manifest = build_manifest(weights, chunk_size=chunk_size)
    return manifest, tuple(chunk.crc32 for chunk in iter_chunks(weights, manifest))


def check_manifest(
    manifest: Manifest,
    *,
    expected: Sequence[TensorSpec] | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> None:
    """Checks a peer's manifest for consistency and, when given, against ``expected``.

    Raises:
        ManifestMismatchError: names, shapes or dtypes differ from ``expected``.
        ValidationError: the layout is inconsistent (overlaps, sizes, digest format).
        ResourceLimitError: the payload is larger than ``max_bytes``.
    """
    if manifest.total_bytes > max_bytes:
        raise ResourceLimitError(
            f"payload of {manifest.total_bytes} bytes exceeds the limit of {max_bytes}"
        )
    if not 0 < manifest.chunk_size <= MAX_CHUNK_BYTES:
        raise ValidationError(f"chunk_size {manifest.chunk_size} is outside (0, {MAX_CHUNK_BYTES}]")
    digest = manifest.digest
    if len(digest) != DIGEST_HEX_LENGTH or any(c not in "0123456789abcdef" for c in digest):
        raise ValidationError(
            f"manifest digest is not a {DIGEST_HEX_LENGTH}-digit lowercase hex "
            f"{DIGEST_ALGORITHM} digest"
        )
    position = 0
    seen: set[str] = set()
    for info in manifest.tensors:
        if info.name in seen:
            raise ValidationError(f"tensor {info.name!r} appears twice in the manifest")
        seen.add(info.name)
        if any(d < 0 for d in info.shape):
            raise ValidationError(f"tensor {info.name!r} has a negative dimension {info.shape}")
        itemsize = torch.empty((), dtype=torch_dtype(info.dtype)).element_size()
        if info.nbytes != math.prod(info.shape) * itemsize:
            raise ValidationError(
                f"tensor {info.name!r}: nbytes {info.nbytes} does not match shape "
                f"{list(info.shape)} of {info.dtype}"
            )
        if info.offset < position or info.offset % ALIGNMENT:
            raise ValidationError(
                f"tensor {info.name!r}: offset {info.offset} overlaps or is unaligned"
            )
        position = info.offset + info.nbytes
    if position > manifest.total_bytes:
        raise ValidationError(
            f"tensors end at byte {position}, past total_bytes {manifest.total_bytes}"
        )
    if manifest.total_bytes - position >= ALIGNMENT:
        raise ValidationError("total_bytes has trailing space no tensor uses")
    if expected is not None:
        _compare_specs(manifest.specs, tuple(expected))


def _compare_specs(got: tuple[TensorSpec, ...], want: tuple[TensorSpec, ...]) -> None:
    """Same names (in any order), and each with the expected shape and dtype."""
    got_by_name = {s.name: s for s in got}
    want_by_name = {s.name: s for s in want}
    missing = sorted(want_by_name.keys() - got_by_name.keys())
    extra = sorted(got_by_name.keys() - want_by_name.keys())
    if missing or extra:
        raise ManifestMismatchError(
            f"tensor names differ from the expected model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for name, w in want_by_name.items():
        g = got_by_name[name]
        if g.shape != w.shape:
            raise ManifestMismatchError(
                f"tensor {name!r} has shape {list(g.shape)}, expected {list(w.shape)}"
            )
        if g.dtype != w.dtype:
            raise ManifestMismatchError(f"tensor {name!r} has dtype {g.dtype}, expected {w.dtype}")


def new_payload_buffer(nbytes: int) -> PayloadBuffer:
    """A zero-filled writable buffer of ``nbytes`` whose pages are mapped as they are first
    written.

    ``bytearray(n)`` zeroes all of its memory before it returns: for a received model, that
    faults in every page (0.05 s per 100 MB here, far more on a VM whose host backs memory
    lazily) before the first chunk is taken from the stream, which stalls the sender. An
    anonymous private mapping faults each page in when its chunk is copied, as chunks arrive,
    and goes back to the system as a whole when freed.
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if nbytes == 0 or not flags:  # mmap refuses empty maps; platforms without MAP_ANONYMOUS
        return bytearray(nbytes)
    return mmap.mmap(-1, nbytes, flags=flags)


class PayloadReceiver:
    """Reassembles a payload chunk by chunk and verifies it before handing out tensors.

    Memory: one buffer of ``total_bytes`` (:func:`new_payload_buffer`); the tensors returned
    by :meth:`finish` are views into it, so a received model costs one copy of its size. A
    caller that receives payloads of one size again and again can pass ``buffer`` (of exactly
    ``total_bytes``) to reuse its memory: a new buffer's pages are faulted in on first write,
    which costs twice the payload's digest (bench/transfer.py). The tensors are then only
    valid until the buffer's next use.

    Each chunk is checked (crc32), copied and hashed as it arrives, while it is in the cache:
    :meth:`finish` only compares the digest.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        expected: Sequence[TensorSpec] | None = None,
        max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        buffer: PayloadBuffer | None = None,
    ) -> None:
        check_manifest(manifest, expected=expected, max_bytes=max_bytes)
        if buffer is not None and len(buffer) != manifest.total_bytes:
            raise ValueError(f"buffer of {len(buffer)} bytes for {manifest.total_bytes}")
        self.manifest = manifest
        self._buffer = buffer if buffer is not None else new_payload_buffer(manifest.total_bytes)
        # numpy copies release the GIL (a memoryview slice assignment holds it): the transport's
        # threads go on while a chunk is copied, and page faults of a new buffer are taken then
        self._array = numpy.frombuffer(self._buffer, dtype=numpy.uint8)
        self._digest = _hasher()
        self._received = 0
        self._next_index = 0

    def add(self, chunk: Chunk) -> None:
        """Adds the next chunk; raises on order, size or crc32 problems."""
        size = len(chunk.data)
        if chunk.index != self._next_index or chunk.offset != self._received:
            raise ChunkOrderError(
                f"chunk {chunk.index} at offset {chunk.offset} arrived out of order; expected "
                f"chunk {self._next_index} at offset {self._received}"
            )
        if size == 0 or size > self.manifest.chunk_size:
            raise ChunkOrderError(
                f"chunk {chunk.index} holds {size} bytes; chunks hold 1 to "
                f"{self.manifest.chunk_size}"
            )
        if self._received + size > self.manifest.total_bytes:
            raise ChunkOrderError(
                f"chunk {chunk.index} runs past the declared {self.manifest.total_bytes} bytes"
            )
        if crc32(chunk.data) != chunk.crc32:
            raise ChecksumError(f"chunk {chunk.index} failed its crc32 check")
        self._array[self._received : self._received + size] = numpy.frombuffer(
            chunk.data, dtype=numpy.uint8
        )
        self._digest.update(chunk.data)
        self._received += size
        self._next_index += 1

    def finish(self, *, require_finite: bool = True) -> WeightMap:
        """Verifies completeness, the digest and (optionally) finiteness; returns the tensors."""
        if self._received != self.manifest.total_bytes:
            raise ChunkOrderError(
                f"stream ended after {self._received} of {self.manifest.total_bytes} bytes"
            )
        if self._digest.hexdigest() != self.manifest.digest:
            raise ChecksumError(
                f"payload digest ({DIGEST_ALGORITHM}) does not match the manifest's"
            )
        weights: WeightMap = {}
        for info in self.manifest.tensors:
            dtype = torch_dtype(info.dtype)
            count = math.prod(info.shape)
            if count == 0:
                tensor = torch.empty(info.shape, dtype=dtype)
            else:
                tensor = torch.frombuffer(
                    self._buffer, dtype=dtype, count=count, offset=info.offset
                ).reshape(info.shape)
            if require_finite and tensor.is_floating_point() and not _all_finite(tensor):
                raise NonFiniteError(f"tensor {info.name!r} holds NaN or infinite values")
            weights[info.name] = tensor
        return weights


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or infinite.

    A NaN or infinity anywhere makes the sum non-finite, so a finite sum proves the tensor
    finite without the full-size temporary of ``isfinite``; only a non-finite sum (which an
    overflow of large finite values can also cause) needs the exact check. The sum is taken
    in float32 (float64 for float64 tensors): a float64 sum of float32 data is 25 times
    slower here and an overflow only costs the exact check.
    """
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(tensor).all())


def receive_all(
    manifest: Manifest,
    chunks: Iterator[Chunk],
    *,
    expected: Sequence[TensorSpec] | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> WeightMap:
    """Convenience: feeds every chunk to a :class:`PayloadReceiver` and finishes it."""
    receiver = PayloadReceiver(manifest, expected=expected, max_bytes=max_bytes)
    for chunk in chunks:
        receiver.add(chunk)
    return receiver.finish()
