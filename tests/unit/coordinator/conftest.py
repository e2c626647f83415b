"""Fixtures of the coordinator's unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.metrics import CoordinatorMetrics
from coordinator.silo_registry import SiloRegistry
from coordinator.tasks import TaskBoard
from tests.unit.coordinator.in_process_job import SILOS, WAIT_S, InProcessJob


@pytest.fixture()
def job(tmp_path: Path) -> Iterator[InProcessJob]:
    registry = SiloRegistry(timeout_s=60)
    for silo in SILOS:
        registry.register(
            silo, agent_version="test", device="cpu", num_train_examples=1000, num_eval_examples=100
        )
    harness = InProcessJob(tmp_path, registry, TaskBoard(), CoordinatorMetrics.create(), [])
    yield harness
    for runner in harness.runners:  # never leave a job thread behind, even when a test fails
        runner.request_stop("test over")
        runner.join(WAIT_S)
        assert not runner.is_running, "a job thread outlived its test"
