"""The silo's side of the Fleet API: typed calls with deadlines over one mTLS channel."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc
import torch

from gptfl import serde
from gptfl.errors import ChecksumError, UnavailableError
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


@dataclass(frozen=True)
class PullResult:
    phase: int
    job_id: str
    task: TaskSpec | None
    retry_after_s: float


def transfer_timeout(nbytes: int) -> float:
    return TRANSFER_BASE_S + nbytes / TRANSFER_BYTES_PER_S


class FleetClient:
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
        self, *, agent_version: str, device: str, num_train: int, num_eval: int
    ) -> fleet_pb2.RegisterReply:
        reply: fleet_pb2.RegisterReply = self._stub.Register(
            fleet_pb2.RegisterRequest(
                agent_version=agent_version,
                device=device,
                num_train_examples=num_train,
                num_eval_examples=num_eval,
            ),
            timeout=REGISTER_TIMEOUT_S,
            metadata=self._metadata,
            wait_for_ready=False,
        )
        return reply

    def heartbeat(self, state: str) -> None:
        self._stub.Heartbeat(
            fleet_pb2.HeartbeatRequest(state=state), timeout=RPC_TIMEOUT_S, metadata=self._metadata
        )

    def pull_task(self, wait_s: float) -> PullResult:
        reply: fleet_pb2.PullTaskReply = self._stub.PullTask(
            fleet_pb2.PullTaskRequest(wait_ms=int(wait_s * 1000)),
            timeout=wait_s + RPC_TIMEOUT_S,
            metadata=self._metadata,
        )
        task = serde.task_from_pb(reply.task) if reply.HasField("task") else None
        return PullResult(reply.phase, reply.job_id, task, reply.retry_after_ms / 1000)

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
    ) -> tuple[fleet_pb2.UploadReply, int]:
        """Streams the trained weights; returns the reply and the payload bytes sent.

        The header goes first; the weights follow once the coordinator answers ``ready``
        (it has a free upload slot), so waiting costs the coordinator no buffer space. The
        call may wait for a slot until the task's deadline.
        """
        manifest = build_manifest(weights)
        go = threading.Event()
        admitted = False

        def parts() -> Iterator[fleet_pb2.UploadPart | bytes]:
            yield fleet_pb2.UploadPart(
                header=fleet_pb2.UpdateHeader(
                    task_id=task.task_id,
                    round=task.round,
                    num_examples=num_examples,
                    train_metrics=serde.metrics_to_pb(metrics),
                    train_seconds=train_seconds,
                )
            )
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
        return final, manifest.total_bytes

    def report_evaluation(
        self, task: TaskSpec, *, num_examples: int, metrics: Mapping[str, float]
    ) -> None:
        self._stub.ReportEvaluation(
            fleet_pb2.EvaluationReport(
                task_id=task.task_id,
                round=task.round,
                num_examples=num_examples,
                metrics=serde.metrics_to_pb(metrics),
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=self._metadata,
        )

    def decline(self, task: TaskSpec, reason: str) -> None:
        self._stub.DeclineTask(
            fleet_pb2.DeclineTaskRequest(task_id=task.task_id, reason=reason),
            timeout=RPC_TIMEOUT_S,
            metadata=self._metadata,
        )
