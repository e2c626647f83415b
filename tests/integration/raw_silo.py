"""A hand-driven silo for integration tests: raw Fleet stubs over mutual TLS with an enrolled
silo's identity, so a test controls every message a (hostile) silo sends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from coordinator.server import Coordinator
from gptfl import serde
from gptfl.admin_client import AdminClient
from gptfl.pki import participant_files
from gptfl.proto.v1 import fleet_pb2, fleet_pb2_grpc
from gptfl.task import TaskKind, TaskSpec
from gptfl.weights import Chunk, Manifest, WeightMap, build_manifest, iter_chunks, receive_all
from tests.integration.conftest import silo_channel
from tests.waiting import wait_until

#: the training and evaluation examples a raw silo registers unless told otherwise
TRAIN_EXAMPLES = 500
EVAL_EXAMPLES = 50


def submit(coordinator: Coordinator, pki_dir: Path, spec: dict[str, Any]) -> None:
    with AdminClient(
        f"127.0.0.1:{coordinator.admin.port}", tls=participant_files(pki_dir, "admin")
    ) as admin:
        admin.submit(yaml.safe_dump(spec))


def plain(weights: WeightMap, chunk_size: int = 4096) -> tuple[Manifest, Iterator[Chunk]]:
    """``weights`` as an upload's manifest and chunks."""
    manifest = build_manifest(weights, chunk_size=chunk_size)
    return manifest, iter_chunks(weights, manifest)


def rejected(coordinator: Coordinator, reason: str) -> float:
    """``gptfl_updates_rejected_total{reason}`` now."""
    value = coordinator.metrics.registry.get_sample_value(
        "gptfl_updates_rejected_total", {"reason": reason}
    )
    return value or 0.0


def metric(coordinator: Coordinator, name: str) -> float:
    return coordinator.metrics.registry.get_sample_value(name) or 0.0


def global_sha(coordinator: Coordinator) -> str:
    runner = coordinator.jobs.current()
    assert runner is not None and runner.global_model is not None
    return runner.global_model.manifest.digest


class Silo:
    """A silo that registers, pulls and answers tasks with hand-made messages."""

    def __init__(
        self,
        pki_dir: Path,
        name: str,
        port: int,
        *,
        num_train: int = TRAIN_EXAMPLES,
        num_eval: int = EVAL_EXAMPLES,
    ) -> None:
        self.channel = silo_channel(pki_dir, name, port)
        self.stub = fleet_pb2_grpc.FleetStub(self.channel)
        self.stub.Register(
            fleet_pb2.RegisterRequest(
                agent_version="test", num_train_examples=num_train, num_eval_examples=num_eval
            ),
            timeout=10,
        )

    def pull(self, kind: TaskKind | None = None) -> TaskSpec:
        def task() -> TaskSpec | None:
            reply = self.stub.PullTask(fleet_pb2.PullTaskRequest(wait_ms=1000), timeout=10)
            return serde.task_from_pb(reply.task) if reply.HasField("task") else None

        pulled = wait_until(task, timeout_s=30, interval_s=0, what="a task")
        assert kind is None or pulled.kind is kind, pulled
        return pulled

    def download(self, task: TaskSpec) -> dict[str, torch.Tensor]:
        parts = self.stub.DownloadModel(
            fleet_pb2.DownloadModelRequest(task_id=task.task_id), timeout=30
        )
        manifest, chunks = serde.split_weight_stream(iter(parts))
        return {k: v.clone() for k, v in receive_all(manifest, chunks).items()}

    def upload(
        self,
        task: TaskSpec,
        manifest: Manifest,
        chunks: Iterator[Chunk],
        *,
        round_: int | None = None,
        task_id: str | None = None,
        num_examples: int = 10,
    ) -> fleet_pb2.UploadReply:
        def parts() -> Iterator[fleet_pb2.UploadPart]:
            yield fleet_pb2.UploadPart(
                header=fleet_pb2.UpdateHeader(
                    task_id=task_id or task.task_id,
                    round=task.round if round_ is None else round_,
                    num_examples=num_examples,
                    train_metrics=serde.metrics_to_pb({"loss": 1.0}),
                )
            )
            yield fleet_pb2.UploadPart(manifest=serde.manifest_to_pb(manifest))
            for chunk in chunks:
                part = fleet_pb2.UploadPart()
                serde.fill_chunk(part.chunk, chunk)
                yield part

        # A client that does not wait for the coordinator's `ready`: the coordinator must
        # cope with parts that arrive early, and reject bad ones all the same.
        replies = list(self.stub.UploadUpdate(parts(), timeout=30))
        assert replies[0].ready, replies
        reply: fleet_pb2.UploadReply = replies[-1]
        return reply

    def evaluate(self, task: TaskSpec, *, num_examples: int, loss: float, accuracy: float) -> None:
        self.stub.ReportEvaluation(
            fleet_pb2.EvaluationReport(
                task_id=task.task_id,
                round=task.round,
                num_examples=num_examples,
                metrics=serde.metrics_to_pb({"loss": loss, "accuracy": accuracy}),
            ),
            timeout=10,
        )
