"""The update intake asks the round's fold what an upload must hold and how to fold it."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pytest
import torch

from coordinator.round_fold import RoundFold
from coordinator.round_plan import PlainRound, RoundPlan, RoundSetup
from coordinator.tasks import ModelVersion
from gptfl.errors import ManifestMismatchError
from gptfl.fleet_messages import UpdateHeader
from gptfl.task import TaskKind
from gptfl.weights import TensorSpec, WeightMap
from tests.unit.coordinator.in_process_job import WAIT_S, InProcessJob, tiny_spec

SCALE = 1 << 16  # fixed point: value * SCALE, as a masked secure-aggregation input would be


class FixedPointFold(RoundFold):
    """Takes int64 fixed-point tensors only (a stand-in for masked inputs), folds their sum."""

    def __init__(self, model: ModelVersion) -> None:
        floats = [s for s in model.manifest.specs if s.dtype.startswith("float")]
        self._expected = tuple(TensorSpec(s.name, s.shape, "int64") for s in floats)
        self._sum = {s.name: torch.zeros(s.shape, dtype=torch.int64) for s in floats}
        self._count = self._examples = 0
        self._lock = threading.Lock()

    @property
    def expected(self) -> tuple[TensorSpec, ...]:
        return self._expected

    @property
    def integer_payload(self) -> bool:
        return True

    def fold(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        with self._lock:
            for name, total in self._sum.items():
                total.add_(weights[name])  # already weighted by the silo
            self._count += 1
            self._examples += header.num_examples

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_examples(self) -> int:
        return self._examples

    def average(self) -> WeightMap:
        return {k: v.double().div(SCALE * self._examples).float() for k, v in self._sum.items()}


def _fixed_point(weights: WeightMap, n: int) -> WeightMap:
    return {
        k: torch.round(v.double() * n * SCALE).to(torch.int64)
        for k, v in weights.items()
        if v.is_floating_point()
    }


def test_the_fold_decides_what_an_upload_must_hold(job: InProcessJob) -> None:
    def planner(setup: RoundSetup, _default: RoundFold) -> RoundPlan:
        return PlainRound(setup, FixedPointFold(setup.global_model))

    runner = job.start(tiny_spec(), round_planner=planner)
    tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in ("a", "b", "c")}
    base = job.download(runner, "a", tasks["a"])
    before = runner.global_model
    # the model's own float tensors are not what this round takes
    with pytest.raises(ManifestMismatchError):
        job.upload(runner, "a", tasks["a"], base, 10)
    assert job.rejected("manifest_mismatch") == 1 and runner.global_model is before
    updates = {"a": (0.25, 10), "b": (-0.5, 30), "c": (1.0, 60)}
    for silo, (shift, n) in updates.items():
        shifted = {k: v + shift if v.is_floating_point() else v for k, v in base.items()}
        job.upload(runner, silo, tasks[silo], _fixed_point(shifted, n), n)
    runner.join(WAIT_S)
    assert runner.global_model is not None and runner.global_model is not before
    mean_shift = sum(shift * n for shift, n in updates.values()) / 100
    for name, value in runner.global_model.weights.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, base[name] + mean_shift, atol=1e-4, rtol=0)
    (record,) = runner.state.rounds
    assert (record.updates_accepted, record.updates_rejected, record.examples) == (3, 1, 100)
