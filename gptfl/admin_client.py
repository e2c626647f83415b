"""A typed client of the coordinator's Admin API (used by ``gptfl admin`` and the demo)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptfl import serde
from gptfl.identity import insecure_metadata
from gptfl.pki import Identity, TlsFiles
from gptfl.proto.v1 import admin_pb2, admin_pb2_grpc
from gptfl.rpc import open_channel
from gptfl.weights import WeightMap, receive_all
from gptfl.weights_io import save_weights

RPC_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RoundView:
    round: int
    silos_selected: int
    updates_accepted: int
    updates_rejected: int
    seconds: float
    server: dict[str, float]
    federated: dict[str, float]


@dataclass(frozen=True)
class DeclineView:
    """A silo's declined tasks in the job: how many, and the latest one's kind and reason."""

    silo_id: str
    count: int
    last_kind: str
    last_reason: str
    last_round: int


@dataclass(frozen=True)
class PrivacyView:
    """A silo's reported DP spend in the job, and why its reports look wrong (if they do)."""

    silo_id: str
    epsilon: float
    delta: float
    accountant: str
    flag: str


@dataclass(frozen=True)
class StatusView:
    job_id: str
    phase: str
    round: int
    total_rounds: int
    message: str
    silos_connected: int
    rounds: list[RoundView]
    summary: dict[str, Any] | None
    declines: list[DeclineView] = field(default_factory=list)
    privacy: list[PrivacyView] = field(default_factory=list)
    #: silo-level DP on the aggregate: (epsilon, delta) so far, or None without it
    silo_level_privacy: tuple[float, float] | None = None
    #: a round of several stages (secure aggregation): its stage, the silos still in it
    #: (the survivors so far) and those that dropped out
    stage: str = ""
    stage_silos: tuple[str, ...] = ()
    stage_dropped: tuple[str, ...] = ()

    @property
    def ended(self) -> bool:
        return self.phase in ("finished", "failed", "stopped")


@dataclass(frozen=True)
class SiloView:
    silo_id: str
    connected: bool
    last_seen_unix: float
    state: str
    rounds_participated: int
    num_train_examples: int
    device: str


class AdminClient:
    """Admin calls over mutual TLS with an admin certificate (or plaintext when insecure)."""

    def __init__(
        self,
        address: str,
        *,
        tls: TlsFiles | None,
        server_name: str | None = None,
        insecure_identity: str = "admin",
    ) -> None:
        self._channel = open_channel(address, tls=tls, server_name=server_name)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)
        self._metadata = (
            insecure_metadata(Identity(insecure_identity, "admin")) if tls is None else ()
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, spec_yaml: str) -> str:
        reply: admin_pb2.SubmitJobReply = self._stub.SubmitJob(
            admin_pb2.SubmitJobRequest(spec_yaml=spec_yaml),
            timeout=RPC_TIMEOUT_S,
            metadata=self._metadata,
        )
        return reply.job_id

    def status(self, *, wait_for_ready: bool = False, timeout: float = RPC_TIMEOUT_S) -> StatusView:
        pb: admin_pb2.JobStatus = self._stub.GetStatus(
            admin_pb2.GetStatusRequest(),
            timeout=timeout,
            metadata=self._metadata,
            wait_for_ready=wait_for_ready,
        )
        return StatusView(
            job_id=pb.job_id,
            phase=pb.phase,
            round=pb.round,
            total_rounds=pb.total_rounds,
            message=pb.message,
            silos_connected=pb.silos_connected,
            rounds=[
                RoundView(
                    r.round,
                    r.silos_selected,
                    r.updates_accepted,
                    r.updates_rejected,
                    r.seconds,
                    serde.metrics_from_pb(r.server_metrics),
                    serde.metrics_from_pb(r.federated_metrics),
                )
                for r in pb.rounds
            ],
            summary=json.loads(pb.summary_json) if pb.summary_json else None,
            declines=[
                DeclineView(d.silo_id, d.count, d.last_kind, d.last_reason, d.last_round)
                for d in pb.declines
            ],
            privacy=[
                PrivacyView(p.silo_id, p.epsilon, p.delta, p.accountant, p.flag) for p in pb.privacy
            ],
            silo_level_privacy=(
                (pb.silo_level_epsilon, pb.silo_level_delta) if pb.silo_level_delta else None
            ),
            stage=pb.stage,
            stage_silos=tuple(pb.stage_silos),
            stage_dropped=tuple(pb.stage_dropped),
        )

    def silos(self) -> list[SiloView]:
        reply: admin_pb2.ListSilosReply = self._stub.ListSilos(
            admin_pb2.ListSilosRequest(), timeout=RPC_TIMEOUT_S, metadata=self._metadata
        )
        return [
            SiloView(
                s.silo_id,
                s.connected,
                s.last_seen_unix,
                s.state,
                s.rounds_participated,
                s.num_train_examples,
                s.device,
            )
            for s in reply.silos
        ]

    def stop(self, reason: str) -> str:
        reply: admin_pb2.StopJobReply = self._stub.StopJob(
            admin_pb2.StopJobRequest(reason=reason), timeout=60, metadata=self._metadata
        )
        return reply.phase

    def download_model(self) -> WeightMap:
        parts = self._stub.DownloadModel(
            admin_pb2.AdminDownloadRequest(), timeout=3600, metadata=self._metadata
        )
        return receive_all(*serde.split_weight_stream(iter(parts)))

    def download_model_to(self, path: Path) -> int:
        weights = self.download_model()
        save_weights(path, weights, metadata={"source": "gptfl admin download-model"})
        return sum(t.numel() for t in weights.values())
