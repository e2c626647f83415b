"""Assembles the synth service: engine, servicer, gRPC servers, metrics; starts and stops it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from gptfl import atomic_io
from gptfl.proto.v1 import synth_pb2_grpc
from gptfl.rpc import Server, start_health_server, start_server
from gptfl.service_process import ENDPOINTS_FILE, start_metrics_http
from synth_service.config import SynthConfig
from synth_service.engine import SynthEngine
from synth_service.metrics import SynthMetrics
from synth_service.servicer import SynthServicer

log = logging.getLogger(__name__)


@dataclass
class SynthService:
    """A running synth service (see :func:`start_synth_service`)."""

    config: SynthConfig
    engine: SynthEngine
    api: Server
    health: Server | None
    metrics_port: int | None
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return self.api.address

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING and no new work; running work may finish within the grace period,
        then it is aborted and the servers stop (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        log.info("synth service shutting down (grace %.1fs)", grace)
        for server in (self.health, self.api):
            if server is not None:
                server.set_serving(False)
        self.engine.refuse_new_work()
        if not self.engine.wait_idle(grace):
            log.warning("work still running after %.1fs; aborting it", grace)
        self.engine.abort_work()
        for server in (self.api, self.health):
            if server is not None:
                server.stop(min(grace, 5.0))
        log.info("synth service stopped")


def start_synth_service(config: SynthConfig) -> SynthService:
    """Starts the servers of a synth service; ``endpoints.json`` in data_dir is written last."""
    tls = config.tls.files() if config.tls is not None else None
    metrics = SynthMetrics.create()
    engine = SynthEngine(config, metrics=metrics)
    servicer = SynthServicer(engine, insecure=config.insecure)
    api = start_server(
        config.address,
        tls=tls,
        register=lambda s: synth_pb2_grpc.add_SynthServicer_to_server(servicer, s),
        max_workers=config.max_workers,
        name="synth",
    )
    health = start_health_server(config.health_address) if config.health_address else None
    metrics_port = start_metrics_http(config.metrics_address, metrics.registry)
    log.info(
        "synth service up: %s%s%s (%s) on %s; generators: %s",
        api.address,
        f", health {health.address}" if health else "",
        f", metrics :{metrics_port}" if metrics_port else "",
        "mTLS" if tls else "PLAINTEXT",
        engine.device_name,
        ", ".join(engine.generators()),
    )
    atomic_io.write_json(
        config.data_dir / ENDPOINTS_FILE,
        {
            "pid": os.getpid(),
            "port": api.port,
            "health_port": health.port if health else None,
            "metrics_port": metrics_port,
            "device": engine.device_name,
        },
    )
    return SynthService(config, engine, api, health, metrics_port)
