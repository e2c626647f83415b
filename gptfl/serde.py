"""Conversions between wire messages (protobuf) and domain objects.

The only module besides servicers and clients that touches generated protobuf classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence

import pydantic

from gptfl.chunk_wire import decode_chunk_part, encode_chunk_part
from gptfl.errors import DECLINE_KINDS, ConfigError, ValidationError
from gptfl.fleet_messages import (
    Decline,
    EvaluationReport,
    FleetPhase,
    PrivacySpend,
    PullReply,
    RegisterAck,
    Registration,
    SecAggPayload,
    SecAggSubmission,
    UpdateHeader,
    UploadResult,
)
from gptfl.models.fingerprint import ModelFingerprint
from gptfl.models.spec import ModelSpec
from gptfl.proto.v1 import common_pb2, fleet_pb2
from gptfl.secagg.messages import (
    KeyAdvertisement,
    SecAggSettings,
    SecAggTask,
    ShareEnvelope,
    UnmaskReply,
    UnmaskRequest,
)
from gptfl.secagg.shamir import Share
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


#: bounds on the fingerprints a silo may send at registration (a peer's list is not trusted)
MAX_FINGERPRINTS = 1024
MAX_FINGERPRINT_FIELD = 256


def fingerprints_to_pb(found: Iterable[ModelFingerprint]) -> list[fleet_pb2.ModelFingerprint]:
    return [
        fleet_pb2.ModelFingerprint(
            arch=f.arch,
            provider=f.provider,
            provider_version=f.provider_version,
            layout_sha256=f.layout_sha256,
        )
        for f in found
    ]


def fingerprints_from_pb(pbs: Sequence[fleet_pb2.ModelFingerprint]) -> list[ModelFingerprint]:
    """The domain fingerprints; too many, or an oversized field, is a ValidationError."""
    if len(pbs) > MAX_FINGERPRINTS:
        raise ValidationError(f"models: {len(pbs)} fingerprints, at most {MAX_FINGERPRINTS}")
    found = []
    for pb in pbs:
        fields = (pb.arch, pb.provider, pb.provider_version, pb.layout_sha256)
        if not pb.arch or any(len(value) > MAX_FINGERPRINT_FIELD for value in fields):
            raise ValidationError(
                f"models: a fingerprint needs an arch and fields of at most "
                f"{MAX_FINGERPRINT_FIELD} characters (arch {pb.arch[:40]!r})"
            )
        found.append(ModelFingerprint(*fields))
    return found


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
    TaskKind.SECAGG_ADVERTISE: fleet_pb2.TASK_KIND_SECAGG_ADVERTISE,
    TaskKind.SECAGG_SHARE: fleet_pb2.TASK_KIND_SECAGG_SHARE,
    TaskKind.SECAGG_UNMASK: fleet_pb2.TASK_KIND_SECAGG_UNMASK,
}
_TASK_KINDS_FROM_PB = {v: k for k, v in _TASK_KINDS.items()}

#: LocalSettings and TrainConfig share their field names; a test checks that they match
_LOCAL_FIELDS = tuple(f.name for f in dataclasses.fields(LocalSettings))


def local_settings_to_pb(local: LocalSettings) -> fleet_pb2.TrainConfig:
    return fleet_pb2.TrainConfig(**{name: getattr(local, name) for name in _LOCAL_FIELDS})


def local_settings_from_pb(pb: fleet_pb2.TrainConfig) -> LocalSettings:
    """The domain settings; out-of-range values are a :class:`ValidationError`."""
    try:
        return LocalSettings(**{name: getattr(pb, name) for name in _LOCAL_FIELDS})
    except ConfigError as exc:
        raise ValidationError(f"invalid training settings: {exc}") from None


def task_to_pb(task: TaskSpec) -> fleet_pb2.Task:
    pb = fleet_pb2.Task(
        task_id=task.task_id,
        job_id=task.job_id,
        round=task.round,
        kind=_TASK_KINDS[task.kind],
        model=model_spec_to_pb(task.model_spec),
        model_digest=task.model_digest,
        train=local_settings_to_pb(task.local),
        deadline_unix_ms=round(task.deadline_unix * 1000),
        rounds=task.rounds,
    )
    if task.secagg is not None:
        pb.secagg.CopyFrom(secagg_task_to_pb(task.secagg))
    return pb


def task_from_pb(pb: fleet_pb2.Task) -> TaskSpec:
    kind = _TASK_KINDS_FROM_PB.get(pb.kind)
    if kind is None:
        raise ValidationError(f"task {pb.task_id} has an unknown kind {pb.kind}")
    try:
        model_spec = model_spec_from_pb(pb.model)
        local = local_settings_from_pb(pb.train)
        secagg = secagg_task_from_pb(pb.secagg) if pb.HasField("secagg") else None
    except ValidationError as exc:
        raise ValidationError(f"task {pb.task_id}: {exc}") from None
    return TaskSpec(
        task_id=pb.task_id,
        job_id=pb.job_id,
        round=pb.round,
        kind=kind,
        model_spec=model_spec,
        model_digest=pb.model_digest,
        local=local,
        deadline_unix=pb.deadline_unix_ms / 1000,
        rounds=pb.rounds,
        secagg=secagg,
    )


# ---- the other fleet messages ----------------------------------------------------------

_PHASES = {
    FleetPhase.NO_JOB: fleet_pb2.JOB_PHASE_NO_JOB,
    FleetPhase.PRETRAIN: fleet_pb2.JOB_PHASE_PRETRAIN,
    FleetPhase.FEDERATING: fleet_pb2.JOB_PHASE_FEDERATING,
    FleetPhase.FINISHED: fleet_pb2.JOB_PHASE_FINISHED,
    FleetPhase.FAILED: fleet_pb2.JOB_PHASE_FAILED,
    FleetPhase.STOPPED: fleet_pb2.JOB_PHASE_STOPPED,
}
_PHASES_FROM_PB = {v: k for k, v in _PHASES.items()}


def registration_to_pb(registration: Registration) -> fleet_pb2.RegisterRequest:
    return fleet_pb2.RegisterRequest(
        agent_version=registration.agent_version,
        device=registration.device,
        num_train_examples=registration.num_train_examples,
        num_eval_examples=registration.num_eval_examples,
        models=fingerprints_to_pb(registration.models),
    )


def registration_from_pb(pb: fleet_pb2.RegisterRequest) -> Registration:
    """The domain registration; too many or oversized fingerprints are a ValidationError."""
    return Registration(
        agent_version=pb.agent_version,
        device=pb.device,
        num_train_examples=pb.num_train_examples,
        num_eval_examples=pb.num_eval_examples,
        models=tuple(fingerprints_from_pb(pb.models)),
    )


def register_ack_to_pb(ack: RegisterAck) -> fleet_pb2.RegisterReply:
    return fleet_pb2.RegisterReply(
        silo_id=ack.silo_id,
        heartbeat_interval_ms=round(ack.heartbeat_interval_s * 1000),
        coordinator_version=ack.coordinator_version,
    )


def register_ack_from_pb(pb: fleet_pb2.RegisterReply) -> RegisterAck:
    return RegisterAck(
        silo_id=pb.silo_id,
        heartbeat_interval_s=pb.heartbeat_interval_ms / 1000,
        coordinator_version=pb.coordinator_version,
    )


def pull_reply_to_pb(reply: PullReply) -> fleet_pb2.PullTaskReply:
    pb = fleet_pb2.PullTaskReply(
        phase=_PHASES[reply.phase],
        job_id=reply.job_id,
        retry_after_ms=round(reply.retry_after_s * 1000),
    )
    if reply.task is not None:
        pb.task.CopyFrom(task_to_pb(reply.task))
    return pb


def pull_reply_from_pb(pb: fleet_pb2.PullTaskReply) -> PullReply:
    phase = _PHASES_FROM_PB.get(pb.phase)
    if phase is None:
        raise ValidationError(f"the coordinator reported an unknown job phase {pb.phase}")
    return PullReply(
        phase=phase,
        job_id=pb.job_id,
        task=task_from_pb(pb.task) if pb.HasField("task") else None,
        retry_after_s=pb.retry_after_ms / 1000,
    )


def update_header_to_pb(header: UpdateHeader) -> fleet_pb2.UpdateHeader:
    pb = fleet_pb2.UpdateHeader(
        task_id=header.task_id,
        round=header.round,
        num_examples=header.num_examples,
        train_metrics=metrics_to_pb(header.train_metrics),
        train_seconds=header.train_seconds,
    )
    if header.privacy is not None:
        spend = header.privacy
        pb.privacy.CopyFrom(
            fleet_pb2.PrivacySpend(
                epsilon=spend.epsilon, delta=spend.delta, accountant=spend.accountant
            )
        )
    return pb


def update_header_from_pb(pb: fleet_pb2.UpdateHeader) -> UpdateHeader:
    privacy = (
        PrivacySpend(pb.privacy.epsilon, pb.privacy.delta, pb.privacy.accountant)
        if pb.HasField("privacy")
        else None
    )
    return UpdateHeader(
        task_id=pb.task_id,
        round=pb.round,
        num_examples=pb.num_examples,
        train_metrics=metrics_from_pb(pb.train_metrics),
        train_seconds=pb.train_seconds,
        privacy=privacy,
    )


def upload_result_to_pb(result: UploadResult) -> fleet_pb2.UploadReply:
    return fleet_pb2.UploadReply(accepted=result.accepted, message=result.message)


def upload_result_from_pb(pb: fleet_pb2.UploadReply) -> UploadResult:
    return UploadResult(accepted=pb.accepted, message=pb.message)


def evaluation_report_to_pb(report: EvaluationReport) -> fleet_pb2.EvaluationReport:
    return fleet_pb2.EvaluationReport(
        task_id=report.task_id,
        round=report.round,
        num_examples=report.num_examples,
        metrics=metrics_to_pb(report.metrics),
    )


def evaluation_report_from_pb(pb: fleet_pb2.EvaluationReport) -> EvaluationReport:
    return EvaluationReport(
        task_id=pb.task_id,
        round=pb.round,
        num_examples=pb.num_examples,
        metrics=metrics_from_pb(pb.metrics),
    )


def decline_to_pb(decline: Decline) -> fleet_pb2.DeclineTaskRequest:
    return fleet_pb2.DeclineTaskRequest(
        task_id=decline.task_id, reason=decline.reason, kind=decline.kind
    )


def decline_from_pb(pb: fleet_pb2.DeclineTaskRequest) -> Decline:
    """The decline as sent; a kind the coordinator does not know is ``other``."""
    if not pb.reason:
        raise ValidationError("a declined task needs a reason")
    kind = pb.kind if pb.kind in DECLINE_KINDS else "other"
    return Decline(task_id=pb.task_id, reason=pb.reason, kind=kind)


# ---- secure aggregation ----------------------------------------------------------------


def secagg_settings_to_pb(settings: SecAggSettings) -> fleet_pb2.SecAggSettings:
    return fleet_pb2.SecAggSettings(
        threshold=settings.threshold,
        bits=settings.bits,
        clip_range=settings.clip_range,
        max_silos=settings.max_silos,
        neighbours=settings.neighbours or 0,
    )


def secagg_settings_from_pb(pb: fleet_pb2.SecAggSettings) -> SecAggSettings:
    """The settings; ones that do not fit together are a :class:`ValidationError`."""
    try:
        return SecAggSettings(
            threshold=pb.threshold,
            bits=pb.bits,
            clip_range=pb.clip_range,
            max_silos=pb.max_silos,
            neighbours=pb.neighbours or None,
        )
    except ConfigError as exc:
        raise ValidationError(f"invalid secure aggregation settings: {exc}") from None


def key_advertisement_to_pb(advertisement: KeyAdvertisement) -> fleet_pb2.SecAggKeys:
    return fleet_pb2.SecAggKeys(
        round=advertisement.round,
        silo_id=advertisement.silo_id,
        cipher_public=advertisement.cipher_public,
        mask_public=advertisement.mask_public,
        num_examples=advertisement.num_examples,
        certificate_pem=advertisement.certificate_pem,
        signature=advertisement.signature,
    )


def key_advertisement_from_pb(pb: fleet_pb2.SecAggKeys) -> KeyAdvertisement:
    return KeyAdvertisement(
        round=pb.round,
        silo_id=pb.silo_id,
        cipher_public=pb.cipher_public,
        mask_public=pb.mask_public,
        num_examples=pb.num_examples,
        certificate_pem=pb.certificate_pem,
        signature=pb.signature,
    )


def share_envelope_to_pb(envelope: ShareEnvelope) -> fleet_pb2.SecAggEnvelope:
    return fleet_pb2.SecAggEnvelope(
        round=envelope.round,
        sender=envelope.sender,
        receiver=envelope.receiver,
        sealed=envelope.sealed,
    )


def share_envelope_from_pb(pb: fleet_pb2.SecAggEnvelope) -> ShareEnvelope:
    return ShareEnvelope(round=pb.round, sender=pb.sender, receiver=pb.receiver, sealed=pb.sealed)


def _shares_to_pb(shares: Mapping[str, Share]) -> list[fleet_pb2.SecAggShare]:
    return [
        fleet_pb2.SecAggShare(silo_id=silo, x=share.x, y=share.value_bytes())
        for silo, share in shares.items()
    ]


def _shares_from_pb(pbs: Iterable[fleet_pb2.SecAggShare], what: str) -> dict[str, Share]:
    """Shares by silo; a silo named twice or a malformed share is a ValidationError."""
    shares: dict[str, Share] = {}
    for pb in pbs:
        if pb.silo_id in shares:
            raise ValidationError(f"{what} names {pb.silo_id} twice")
        shares[pb.silo_id] = Share.from_value_bytes(pb.x, pb.y)
    return shares


def unmask_request_to_pb(request: UnmaskRequest) -> fleet_pb2.SecAggUnmaskRequest:
    return fleet_pb2.SecAggUnmaskRequest(
        round=request.round, survivors=list(request.survivors), dropped=list(request.dropped)
    )


def unmask_request_from_pb(pb: fleet_pb2.SecAggUnmaskRequest) -> UnmaskRequest:
    return UnmaskRequest(round=pb.round, survivors=tuple(pb.survivors), dropped=tuple(pb.dropped))


def unmask_reply_to_pb(reply: UnmaskReply) -> fleet_pb2.SecAggUnmaskReply:
    return fleet_pb2.SecAggUnmaskReply(
        round=reply.round,
        silo_id=reply.silo_id,
        mask_key_shares=_shares_to_pb(reply.mask_key_shares),
        self_mask_shares=_shares_to_pb(reply.self_mask_shares),
    )


def unmask_reply_from_pb(pb: fleet_pb2.SecAggUnmaskReply) -> UnmaskReply:
    return UnmaskReply(
        round=pb.round,
        silo_id=pb.silo_id,
        mask_key_shares=_shares_from_pb(pb.mask_key_shares, "the mask-key shares"),
        self_mask_shares=_shares_from_pb(pb.self_mask_shares, "the self-mask shares"),
    )


def secagg_task_to_pb(task: SecAggTask) -> fleet_pb2.SecAggTask:
    pb = fleet_pb2.SecAggTask(
        settings=secagg_settings_to_pb(task.settings),
        keys=[key_advertisement_to_pb(a) for a in task.advertisements],
        envelopes=[share_envelope_to_pb(e) for e in task.envelopes],
    )
    if task.unmask is not None:
        pb.unmask.CopyFrom(unmask_request_to_pb(task.unmask))
    return pb


def secagg_task_from_pb(pb: fleet_pb2.SecAggTask) -> SecAggTask:
    return SecAggTask(
        settings=secagg_settings_from_pb(pb.settings),
        advertisements=tuple(key_advertisement_from_pb(k) for k in pb.keys),
        envelopes=tuple(share_envelope_from_pb(e) for e in pb.envelopes),
        unmask=unmask_request_from_pb(pb.unmask) if pb.HasField("unmask") else None,
    )


def secagg_submission_to_pb(submission: SecAggSubmission) -> fleet_pb2.SecAggSubmission:
    pb = fleet_pb2.SecAggSubmission(task_id=submission.task_id)
    payload = submission.payload
    if isinstance(payload, KeyAdvertisement):
        pb.keys.CopyFrom(key_advertisement_to_pb(payload))
    elif isinstance(payload, UnmaskReply):
        pb.unmask.CopyFrom(unmask_reply_to_pb(payload))
    else:
        pb.shares.CopyFrom(
            fleet_pb2.SecAggEnvelopes(envelopes=[share_envelope_to_pb(e) for e in payload])
        )
    return pb


def secagg_submission_from_pb(pb: fleet_pb2.SecAggSubmission) -> SecAggSubmission:
    """The submission; one without a part is a :class:`ValidationError`."""
    part = pb.WhichOneof("part")
    payload: SecAggPayload
    if part == "keys":
        payload = key_advertisement_from_pb(pb.keys)
    elif part == "shares":
        payload = tuple(share_envelope_from_pb(e) for e in pb.shares.envelopes)
    elif part == "unmask":
        payload = unmask_reply_from_pb(pb.unmask)
    else:
        raise ValidationError(f"the secure-aggregation submission for task {pb.task_id} is empty")
    return SecAggSubmission(task_id=pb.task_id, payload=payload)
