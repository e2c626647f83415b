"""Assembles a coordinator: state, servicers, gRPC servers, metrics; starts and stops it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from coordinator.admin_servicer import AdminServicer
from coordinator.config import CoordinatorConfig
from coordinator.fleet_servicer import FleetServicer, add_fleet_servicer
from coordinator.job_manager import JobManager
from coordinator.job_runner import InitialModel
from coordinator.metrics import CoordinatorMetrics
from coordinator.pretrain_phase import SynthAccess
from coordinator.silo_registry import SiloRegistry
from coordinator.tasks import TaskBoard
from gptfl import atomic_io
from gptfl.memory import tune_allocator
from gptfl.proto.v1 import admin_pb2_grpc
from gptfl.rpc import Server, start_health_server, start_server
from gptfl.service_process import ENDPOINTS_FILE, start_metrics_http

log = logging.getLogger(__name__)


@dataclass
class Coordinator:
    config: CoordinatorConfig
    jobs: JobManager
    registry: SiloRegistry
    metrics: CoordinatorMetrics
    fleet: Server
    admin: Server
    health: Server | None
    metrics_port: int | None
    _stopped: bool = False

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking work, let in-flight calls drain, then suspend the job (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        log.info("coordinator shutting down (grace %.1fs)", grace)
        for server in (self.health, self.fleet, self.admin):
            if server is not None:
                server.set_serving(False)
        self.jobs.shutdown(grace)
        for server in (self.fleet, self.admin, self.health):
            if server is not None:
                server.stop(grace)
        log.info("coordinator stopped")


def start_coordinator(
    config: CoordinatorConfig, *, initial_model: InitialModel | None = None
) -> Coordinator:
    """Starts every server of a coordinator and resumes an unfinished job if there is one."""
    tune_allocator()
    tls = config.tls.files() if config.tls is not None else None
    metrics = CoordinatorMetrics.create()
    registry = SiloRegistry(
        timeout_s=config.heartbeat_interval_s * config.heartbeat_misses,
        allowed=config.allowed_silos,
    )
    board = TaskBoard()
    metrics.silos_connected.set_function(lambda: len(registry.connected()))
    extra = {"initial_model": initial_model} if initial_model is not None else {}
    jobs = JobManager(
        state_dir=config.state_dir,
        runs_dir=config.effective_runs_dir,
        registry=registry,
        board=board,
        metrics=metrics,
        max_concurrent_uploads=config.max_concurrent_uploads,
        upload_stall_timeout_s=config.upload_stall_timeout_s,
        checkpoints_to_keep=config.checkpoints_to_keep,
        synth=SynthAccess.from_config(config),
        silo_ca=tls.ca if tls is not None else None,
        **extra,
    )
    fleet_servicer = FleetServicer(
        jobs=jobs,
        registry=registry,
        heartbeat_interval_s=config.heartbeat_interval_s,
        insecure=config.insecure,
    )
    admin_servicer = AdminServicer(
        jobs=jobs,
        registry=registry,
        admin_identities=config.admin_identities,
        insecure=config.insecure,
    )
    fleet = start_server(
        config.fleet_address,
        tls=tls,
        register=lambda s: add_fleet_servicer(fleet_servicer, s),
        max_workers=config.max_workers,
        name="fleet",
    )
    admin = start_server(
        config.admin_address,
        tls=tls,
        register=lambda s: admin_pb2_grpc.add_AdminServicer_to_server(admin_servicer, s),
        max_workers=8,
        name="admin",
    )
    health = start_health_server(config.health_address) if config.health_address else None
    metrics_port = start_metrics_http(config.metrics_address, metrics.registry)
    log.info(
        "coordinator up: fleet %s, admin %s%s%s (%s)",
        fleet.address,
        admin.address,
        f", health {health.address}" if health else "",
        f", metrics :{metrics_port}" if metrics_port else "",
        "mTLS" if tls else "PLAINTEXT",
    )
    resumed = jobs.resume_if_any()
    if resumed:
        log.info("resuming job %s", resumed)
    # Last: whoever waits for this file (LocalCluster, tests) finds a resumed job in place.
    _write_endpoints(config, fleet, admin, health, metrics_port)
    return Coordinator(config, jobs, registry, metrics, fleet, admin, health, metrics_port)


def _write_endpoints(
    config: CoordinatorConfig,
    fleet: Server,
    admin: Server,
    health: Server | None,
    metrics_port: int | None,
) -> None:
    """Records the bound ports (port 0 in a config means "any free port")."""
    atomic_io.write_json(
        config.state_dir / ENDPOINTS_FILE,
        {
            "pid": os.getpid(),
            "fleet_port": fleet.port,
            "admin_port": admin.port,
            "health_port": health.port if health else None,
            "metrics_port": metrics_port,
        },
    )
