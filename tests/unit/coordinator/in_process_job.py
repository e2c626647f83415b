"""An in-process job for the round-machinery tests: a real JobRunner, fake silos, no gRPC.

The ``job`` fixture (tests/unit/coordinator/conftest.py) gives a fresh one per test.

The fake silos are the test thread itself: it pulls a silo's task, then answers it through
the runner's update intake (upload, evaluation report, decline) or leaves it to expire.
Teardown stops every runner the test started, so no job thread outlives its test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from coordinator.job_runner import JobRunner
from coordinator.metrics import CoordinatorMetrics
from coordinator.silo_registry import SiloRegistry
from coordinator.tasks import TaskBoard, TaskRecord
from gptfl.fleet_messages import PrivacySpend, UpdateHeader
from gptfl.job_spec import JobSpec
from gptfl.models import build_model
from gptfl.task import TaskKind
from gptfl.weights import WeightMap, build_manifest, iter_chunks, receive_all

TINY_MODEL = {"arch": "cnn-small", "num_classes": 10, "in_channels": 1, "image_size": 8}
#: generous bound for things that happen at once; never reached when all is well
WAIT_S = 10.0
SILOS = ("a", "b", "c")


def tiny_spec(**overrides: Any) -> JobSpec:
    data: dict[str, Any] = {
        "name": "unit",
        "model": TINY_MODEL,
        "rounds": 1,
        "min_silos": 1,
        "round_deadline_s": 30,
        "wait_for_silos_s": 5,
        "evaluation": {"federated": False},
    }
    data.update(overrides)
    return JobSpec.model_validate(data)


def initial_weights() -> WeightMap:
    torch.manual_seed(0)
    model = build_model(tiny_spec().model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass
class InProcessJob:
    """The pieces a JobRunner works with, and the fake silos' side of the fleet API."""

    tmp: Path
    registry: SiloRegistry
    board: TaskBoard
    metrics: CoordinatorMetrics
    runners: list[JobRunner]

    def start(self, spec: JobSpec, **kwargs: Any) -> JobRunner:
        start = {k: v.clone() for k, v in initial_weights().items()}
        runner = JobRunner(
            job_id=f"job-{len(self.runners) + 1}",
            spec=spec,
            job_dir=self.tmp / "jobs" / f"job-{len(self.runners) + 1}",
            runs_dir=self.tmp / "runs",
            registry=self.registry,
            board=self.board,
            metrics=self.metrics,
            initial_model=lambda _runner: (start, {"kind": "test"}),
            **kwargs,
        )
        self.runners.append(runner)
        runner.start()
        return runner

    @staticmethod
    def pull(runner: JobRunner, silo: str, kind: TaskKind) -> TaskRecord:
        task = runner.pull_task(silo, WAIT_S)
        assert task is not None, f"no task for {silo}"
        assert task.kind is kind, (silo, task.kind)
        return task

    @staticmethod
    def download(runner: JobRunner, silo: str, task: TaskRecord) -> WeightMap:
        manifest, chunks = runner.intake.task_model(silo, task.task_id)
        return {k: v.clone() for k, v in receive_all(manifest, chunks).items()}

    @staticmethod
    def upload(
        runner: JobRunner,
        silo: str,
        task: TaskRecord,
        weights: WeightMap,
        n: int,
        *,
        loss: float | None = 1.0,
        privacy: PrivacySpend | None = None,
    ) -> None:
        """Uploads ``weights`` for ``task``; ``loss`` None sends no training figures (as a
        silo with DP-SGD does)."""
        manifest = build_manifest(weights)
        figures = {"loss": loss} if loss is not None else {}
        header = UpdateHeader(task.task_id, task.round, n, figures, 0.01, privacy)
        runner.intake.receive_update(silo, header, manifest, iter_chunks(weights, manifest))

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "gptfl_updates_rejected_total", {"reason": reason}
        )
        return value or 0.0
