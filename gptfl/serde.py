"""Conversions between wire messages (protobuf) and domain objects.

The only module besides servicers and clients that touches generated protobuf classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pydantic

from gptfl.chunk_wire import decode_chunk_part, encode_chunk_part
from gptfl.errors import ValidationError
from gptfl.models.spec import ModelSpec
from gptfl.proto.v1 import common_pb2, fleet_pb2
from gptfl.task import LocalSettings, TaskKind, TaskSpec
from gptfl.weights import Chunk, Manifest, TensorInfo


def manifest_to_pb(manifest: Manifest) -> common_pb2.Manifest:
    return common_pb2.Manifest(
        tensors=[
            common_pb2.TensorInfo(
                name=t.name, shape=list(t.shape), dtype=t.dtype, offset=t.offset, nbytes=t.nbytes
            )
            for t in manifest.tensors
        ],
        total_bytes=manifest.total_bytes,
        digest=manifest.digest,
        chunk_size=manifest.chunk_size,
    )


def manifest_from_pb(pb: common_pb2.Manifest) -> Manifest:
    return Manifest(
        tensors=tuple(
            TensorInfo(t.name, tuple(int(d) for d in t.shape), t.dtype, t.offset, t.nbytes)
            for t in pb.tensors
        ),
        total_bytes=pb.total_bytes,
        digest=pb.digest,
        chunk_size=pb.chunk_size,
    )


def fill_chunk(target: common_pb2.Chunk, chunk: Chunk) -> None:
    """Writes ``chunk`` into a message's chunk field in place.

    Building the field in place matters for throughput: passing a ready ``Chunk`` message to
    the parent's constructor copies its 1 MiB payload once more (about 0.13 s per 100 MB,
    bench/transfer.py).
    """
    target.index = chunk.index
    target.offset = chunk.offset
    target.data = chunk.data if isinstance(chunk.data, bytes) else bytes(chunk.data)
    target.crc32 = chunk.crc32


def chunk_from_pb(pb: common_pb2.Chunk) -> Chunk:
    return Chunk(index=pb.index, offset=pb.offset, data=pb.data, crc32=pb.crc32)


# The two streams that carry weights (Fleet.DownloadModel and Fleet.UploadUpdate) move their
# chunks through gptfl.chunk_wire instead of the generated classes: a sender yields the encoded
# bytes of each chunk part, a receiver gets a Chunk (its data a view into the received message)
# or, for every other part, the protobuf message. The functions below are the (de)serializers
# both ends register for these two methods.

_WEIGHT_PART_CHUNK = common_pb2.WeightStreamPart.DESCRIPTOR.fields_by_name["chunk"].number
_UPLOAD_PART_CHUNK = fleet_pb2.UploadPart.DESCRIPTOR.fields_by_name["chunk"].number

WeightPart = common_pb2.WeightStreamPart | Chunk
UploadPart = fleet_pb2.UploadPart | Chunk


def serialize_part(part: common_pb2.WeightStreamPart | fleet_pb2.UploadPart | bytes) -> bytes:
    """A weight-stream part on the wire; bytes are an already encoded chunk part."""
    return part if isinstance(part, bytes) else part.SerializeToString()


def deserialize_weight_part(raw: bytes) -> WeightPart:
    chunk = decode_chunk_part(raw, _WEIGHT_PART_CHUNK)
    return chunk if chunk is not None else common_pb2.WeightStreamPart.FromString(raw)


def deserialize_upload_part(raw: bytes) -> UploadPart:
    chunk = decode_chunk_part(raw, _UPLOAD_PART_CHUNK)
    return chunk if chunk is not None else fleet_pb2.UploadPart.FromString(raw)


def encode_upload_chunk(chunk: Chunk) -> bytes:
    """An ``UploadPart(chunk=...)`` as wire bytes, for :func:`serialize_part`."""
    return encode_chunk_part(_UPLOAD_PART_CHUNK, chunk)


def weight_stream_to_wire(
    manifest: Manifest, chunks: Iterator[Chunk]
) -> Iterator[common_pb2.WeightStreamPart | bytes]:
    """A download for :func:`serialize_part`: the manifest, then each encoded chunk."""
    yield common_pb2.WeightStreamPart(manifest=manifest_to_pb(manifest))
    for chunk in chunks:
        yield encode_chunk_part(_WEIGHT_PART_CHUNK, chunk)


def part_kind(part: WeightPart | UploadPart) -> str:
    """Which field of its oneof a received stream part holds (``""`` for none)."""
    if isinstance(part, Chunk):
        return "chunk"
    return part.WhichOneof("part") or ""


def part_chunk(part: WeightPart | UploadPart) -> Chunk:
    """The chunk of a received part whose :func:`part_kind` is ``"chunk"``."""
    return part if isinstance(part, Chunk) else chunk_from_pb(part.chunk)


def metrics_to_pb(values: Mapping[str, float]) -> common_pb2.Metrics:
    return common_pb2.Metrics(values={k: float(v) for k, v in values.items()})


def metrics_from_pb(pb: common_pb2.Metrics) -> dict[str, float]:
    return dict(pb.values)


def weight_stream_to_pb(
    manifest: Manifest, chunks: Iterator[Chunk]
) -> Iterator[common_pb2.WeightStreamPart]:
    """A weight stream on the wire: the manifest, then each chunk."""
    yield common_pb2.WeightStreamPart(manifest=manifest_to_pb(manifest))
    for chunk in chunks:
        part = common_pb2.WeightStreamPart()
        fill_chunk(part.chunk, chunk)
        yield part


def split_weight_stream(
    parts: Iterator[WeightPart] | Iterator[UploadPart], *, stream: str = "a weight stream"
) -> tuple[Manifest, Iterator[Chunk]]:
    """Reads the manifest that must come next in ``parts``; returns it and the chunk iterator.

    ``stream`` names the stream in the errors (a download, or an upload after its header).
    """
    first = next(parts, None)
    if first is None or isinstance(first, Chunk) or first.WhichOneof("part") != "manifest":
        raise ValidationError(f"{stream}: the manifest must come next")
    manifest = manifest_from_pb(first.manifest)

    def chunks() -> Iterator[Chunk]:
        for part in parts:
            if part_kind(part) != "chunk":
                raise ValidationError(f"only chunks may follow the manifest in {stream}")
            yield part_chunk(part)

    return manifest, chunks()


def model_spec_to_pb(spec: ModelSpec) -> common_pb2.ModelSpec:
    return common_pb2.ModelSpec(
        arch=spec.arch,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
    )


def model_spec_from_pb(pb: common_pb2.ModelSpec) -> ModelSpec:
    """The domain model spec; an invalid one is a :class:`ValidationError`."""
    try:
        return ModelSpec(
            arch=pb.arch,
            num_classes=pb.num_classes,
            in_channels=pb.in_channels,
            image_size=pb.image_size,
        )
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "model"
        raise ValidationError(f"invalid model spec: {where}: {first['msg']}") from None


_TASK_KINDS = {
    TaskKind.TRAIN: fleet_pb2.TASK_KIND_TRAIN,
    TaskKind.EVALUATE: fleet_pb2.TASK_KIND_EVALUATE,
}


def task_to_pb(task: TaskSpec) -> fleet_pb2.Task:
    local = task.local
    return fleet_pb2.Task(
        task_id=task.task_id,
        job_id=task.job_id,
        round=task.round,
        kind=_TASK_KINDS[task.kind],
        model=model_spec_to_pb(task.model_spec),
        model_digest=task.model_digest,
        train=fleet_pb2.TrainConfig(
            local_epochs=local.epochs,
            batch_size=local.batch_size,
            learning_rate=local.learning_rate,
            momentum=local.momentum,
            weight_decay=local.weight_decay,
            proximal_mu=local.proximal_mu,
            seed=local.seed,
        ),
        deadline_unix_ms=int(task.deadline_unix * 1000),
    )


def task_from_pb(pb: fleet_pb2.Task) -> TaskSpec:
    kinds = {v: k for k, v in _TASK_KINDS.items()}
    if pb.kind not in kinds:
        raise ValidationError(f"task {pb.task_id} has an unknown kind {pb.kind}")
    try:
        model_spec = model_spec_from_pb(pb.model)
    except ValidationError as exc:
        raise ValidationError(f"task {pb.task_id}: {exc}") from None
    t = pb.train
    return TaskSpec(
        task_id=pb.task_id,
        job_id=pb.job_id,
        round=pb.round,
        kind=kinds[pb.kind],
        model_spec=model_spec,
        model_digest=pb.model_digest,
        local=LocalSettings(
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            proximal_mu=t.proximal_mu,
            seed=t.seed,
        ),
        deadline_unix=pb.deadline_unix_ms / 1000,
    )
