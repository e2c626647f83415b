"""The silo's side of the Fleet API: typed calls with deadlines over one mTLS channel.

:class:`FleetClient` speaks in the domain types of :mod:`gptfl.fleet_messages` (converted by
:mod:`gptfl.serde`); :class:`FleetApi` is what the agent needs of it, so a test can hand the
agent an in-process fake instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import grpc
import torch

from gptfl import serde
from gptfl.errors import ChecksumError, UnavailableError
from gptfl.fleet_messages import (
    Decline,
    EvaluationReport,
    PrivacySpend,
    PullReply,
    RegisterAck,
    Registration,
    SecAggSubmission,
    UpdateHeader,
    UploadResult,
)
from gptfl.models.fingerprint import ModelFingerprint
from gptfl.proto.v1 import fleet_pb2, fleet_pb2_grpc
from gptfl.task import TaskSpec
from gptfl.weights import WeightMap, build_manifest, iter_chunks, receive_all, specs_of

RPC_TIMEOUT_S = 30.0
#: Register opens every connection: against a firewall that drops packets silently, this
#: bounds how long the agent waits before it says so (and how long a stop waits for it)
REGISTER_TIMEOUT_S = 10.0
#: transfers get a deadline that grows with the payload (at least 10 MB/s assumed)
TRANSFER_BASE_S = 60.0
TRANSFER_BYTES_PER_S = 10e6


def transfer_timeout(nbytes: int) -> float:
    return TRANSFER_BASE_S + nbytes / TRANSFER_BYTES_PER_S


class FleetApi(Protocol):
    """The calls a silo agent makes on the coordinator (:class:`FleetClient` has them all)."""

    def register(
        self,
        *,
        agent_version: str,
        device: str,
        num_train: int,
        num_eval: int,
        models: Iterable[ModelFingerprint] = (),
    ) -> RegisterAck: ...

    def heartbeat(self, state: str) -> None: ...

    def pull_task(self, wait_s: float) -> PullReply: ...

    def download_model(
        self, task: TaskSpec, *, expected: Mapping[str, torch.Tensor]
    ) -> WeightMap: ...

    def upload_update(
        self,
        task: TaskSpec,
        weights: Mapping[str, torch.Tensor],
        *,
        num_examples: int,
        metrics: Mapping[str, float],
        train_seconds: float,
        privacy: PrivacySpend | None = None,
    ) -> tuple[UploadResult, int]: ...

    def report_evaluation(self, report: EvaluationReport) -> None: ...

    def decline(self, decline: Decline) -> None: ...

    def submit_secagg(self, submission: SecAggSubmission) -> None: ...


class FleetClient:
    """:class:`FleetApi` over a gRPC channel (which the caller opens and closes)."""

    def __init__(
        self, channel: grpc.Channel, *, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._stub = fleet_pb2_grpc.FleetStub(channel)
        self._metadata = metadata
        # The weight streams use the copy-free chunk codec (gptfl.chunk_wire) on this end too.
        self._download = channel.unary_stream(
            "/gptfl.v1.Fleet/DownloadModel",
            request_serializer=fleet_pb2.DownloadModelRequest.SerializeToString,
            response_deserializer=serde.deserialize_weight_part,
        )
        self._upload = channel.stream_stream(
            "/gptfl.v1.Fleet/UploadUpdate",
            request_serializer=serde.serialize_part,
            response_deserializer=fleet_pb2.UploadReply.FromString,
        )

    def register(
        self,
        *,
        agent_version: str,
        device: str,
        num_train: int,
        num_eval: int,
        models: Iterable[ModelFingerprint] = (),
    ) -> RegisterAck:
        """Tells the coordinator who this silo is (its certificate), what data it holds and
        which model architectures it resolves."""
        registration = Registration(
            agent_version=agent_version,
            device=device,
            num_train_examples=num_train,
            num_eval_examples=num_eval,
            models=tuple(models),
        )
        reply: fleet_pb2.RegisterReply = self._stub.Register(
            serde.registration_to_pb(registration),
            timeout=REGISTER_TIMEOUT_S,
            metadata=self._metadata,
            wait_for_ready=False,
        )
        return serde.register_ack_from_pb(reply)

    def heartbeat(self, state: str) -> None:
        self._stub.Heartbeat(
            fleet_pb2.HeartbeatRequest(state=state), timeout=RPC_TIMEOUT_S, metadata=self._metadata
        )

    def pull_task(self, wait_s: float) -> PullReply:
        """Long-polls for a task for up to ``wait_s`` seconds.

        Raises:
            ValidationError: the reply holds a task (or a phase) this silo cannot read.
        """
        reply: fleet_pb2.PullTaskReply = self._stub.PullTask(
            fleet_pb2.PullTaskRequest(wait_ms=int(wait_s * 1000)),
            timeout=wait_s + RPC_TIMEOUT_S,
            metadata=self._metadata,
        )
        return serde.pull_reply_from_pb(reply)

    def download_model(self, task: TaskSpec, *, expected: Mapping[str, torch.Tensor]) -> WeightMap:
        """Downloads and verifies the task's model; it must fit ``expected``'s tensors."""
        parts = self._download(
            fleet_pb2.DownloadModelRequest(task_id=task.task_id),
            timeout=TRANSFER_BASE_S + 3600,
            metadata=self._metadata,
        )
        manifest, chunks = serde.split_weight_stream(iter(parts))
        if manifest.digest != task.model_digest:
            raise ChecksumError("the downloaded model is not the one the task names")
        return receive_all(manifest, chunks, expected=specs_of(expected))

    def upload_update(
        self,
        task: TaskSpec,
        weights: Mapping[str, torch.Tensor],
        *,
        num_examples: int,
        metrics: Mapping[str, float],
        train_seconds: float,
        privacy: PrivacySpend | None = None,
    ) -> tuple[UploadResult, int]:
        """Streams the trained weights; returns the result and the payload bytes sent.

        The header goes first; the weights follow once the coordinator answers ``ready``
        (it has a free upload slot), so waiting costs the coordinator no buffer space. The
        call may wait for a slot until the task's deadline.
        """
        header = UpdateHeader(
            task_id=task.task_id,
            round=task.round,
            num_examples=num_examples,
            train_metrics=dict(metrics),
            train_seconds=train_seconds,
            privacy=privacy,
        )
        manifest = build_manifest(weights)
        go = threading.Event()
        admitted = False

        def parts() -> Iterator[fleet_pb2.UploadPart | bytes]:
            yield fleet_pb2.UploadPart(header=serde.update_header_to_pb(header))
            go.wait()
            if not admitted:
                return  # the call ended (an error, a deadline) before the coordinator was ready
            yield fleet_pb2.UploadPart(manifest=serde.manifest_to_pb(manifest))
            for chunk in iter_chunks(weights, manifest):
                yield serde.encode_upload_chunk(chunk)

        wait_s = max(0.0, task.deadline_unix - time.time())
        replies = self._upload(
            parts(),
            timeout=wait_s + transfer_timeout(manifest.total_bytes),
            metadata=self._metadata,
        )
        final: fleet_pb2.UploadReply | None = None
        try:
            for reply in replies:
                if reply.ready:
                    admitted = True
                    go.set()
                else:
                    final = reply
        finally:
            go.set()
        if final is None:
            raise UnavailableError("the coordinator ended the upload without a result")
        return serde.upload_result_from_pb(final), manifest.total_bytes

    def report_evaluation(self, report: EvaluationReport) -> None:
        self._stub.ReportEvaluation(
            serde.evaluation_report_to_pb(report), timeout=RPC_TIMEOUT_S, metadata=self._metadata
        )

    def decline(self, decline: Decline) -> None:
        self._stub.DeclineTask(
            serde.decline_to_pb(decline), timeout=RPC_TIMEOUT_S, metadata=self._metadata
        )

    def submit_secagg(self, submission: SecAggSubmission) -> None:
        """Answers a secure-aggregation key stage (retried by gRPC on UNAVAILABLE)."""
        self._stub.SubmitSecAgg(
            serde.secagg_submission_to_pb(submission),
            timeout=RPC_TIMEOUT_S,
            metadata=self._metadata,
        )
