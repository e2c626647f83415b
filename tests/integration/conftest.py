"""Fixtures that start real coordinators (in-process, port 0, mutual TLS) with a dev PKI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from coordinator.config import CoordinatorConfig
from coordinator.job_runner import InitialModel
from coordinator.server import Coordinator, start_coordinator
from gptfl.admin_client import AdminClient, StatusView
from gptfl.local_cluster import LocalCluster
from gptfl.pki import init_pki, participant_files
from gptfl.rpc import open_channel
from gptfl.tls_config import TlsConfig
from tests.waiting import wait_until

SILOS = ("silo-a", "silo-b", "silo-c")


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pki")
    init_pki(path, coordinator_hosts=["127.0.0.1", "localhost"], silos=list(SILOS))
    return path


@pytest.fixture(scope="session")
def foreign_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("foreign-pki")
    init_pki(path, coordinator_hosts=["127.0.0.1"], silos=list(SILOS))
    return path


StartCoordinator = Callable[..., Coordinator]


@pytest.fixture
def start(pki_dir: Path, tmp_path: Path) -> Iterator[StartCoordinator]:
    """Starts in-process coordinators; all are stopped at the end of the test."""
    started: list[Coordinator] = []

    def _start(*, initial_model: InitialModel | None = None, **overrides: Any) -> Coordinator:
        files = participant_files(pki_dir, "coordinator")
        config = CoordinatorConfig(
            fleet_address="127.0.0.1:0",
            admin_address="127.0.0.1:0",
            tls=TlsConfig(ca=files.ca, cert=files.cert, key=files.key),
            state_dir=tmp_path / "state",
            heartbeat_interval_s=1.0,
            **overrides,
        )
        coordinator = start_coordinator(config, initial_model=initial_model)
        started.append(coordinator)
        return coordinator

    yield _start
    for coordinator in started:
        coordinator.stop(grace_s=1)


def silo_channel(pki_dir: Path, silo: str, port: int) -> grpc.Channel:
    return open_channel(f"127.0.0.1:{port}", tls=participant_files(pki_dir, "silo", silo))


def wait_for_end(admin: AdminClient, timeout_s: float, *, poll_s: float = 0.5) -> StatusView:
    """Polls the job's status until it ends or ``timeout_s`` passes; returns the last one."""
    deadline = time.monotonic() + timeout_s
    status = admin.status()
    while not status.ended and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = admin.status()
    return status


def start_and_submit(cluster: LocalCluster, spec: dict[str, Any]) -> str:
    """Provisions ``cluster``, starts its coordinator and every silo, submits ``spec`` once
    the coordinator answers; returns the job id."""
    cluster.provision()
    cluster.start_coordinator()
    cluster.start_silos()
    with cluster.admin() as admin:
        admin.status(wait_for_ready=True)
        return admin.submit(yaml.safe_dump(spec))


def wait_for_job_end(
    admin: AdminClient,
    *,
    timeout_s: float,
    interval_s: float = 0.2,
    detail: Callable[[], object] | None = None,
) -> StatusView:
    """Polls the admin status until the job has ended (any outcome); returns that status."""

    def ended() -> StatusView | None:
        status = admin.status()
        return status if status.ended else None

    return wait_until(
        ended, timeout_s=timeout_s, interval_s=interval_s, what="the job to end", detail=detail
    )
