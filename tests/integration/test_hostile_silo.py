"""An enrolled silo turned hostile, over real mutual TLS: each attack of issue 12 is refused
with its status, counted by reason, and leaves the global model as it was.

A real coordinator (port 0) runs a job; silo-a is a hand-driven client with its own
certificate (tests/integration/raw_silo.py) that registered 500 training and 50 evaluation
examples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from coordinator.job_runner import JobRunner
from coordinator.job_state import Phase
from coordinator.server import Coordinator
from gptfl.proto.v1 import fleet_pb2
from gptfl.task import TaskKind, TaskSpec
from gptfl.weights import WeightMap
from tests.integration.conftest import StartCoordinator
from tests.integration.raw_silo import (
    EVAL_EXAMPLES,
    TRAIN_EXAMPLES,
    Silo,
    global_sha,
    metric,
    plain,
    rejected,
    submit,
)

SPEC: dict[str, Any] = {
    "name": "hostile",
    "model": {"arch": "cnn-small", "num_classes": 10, "in_channels": 1, "image_size": 8},
    "rounds": 1,
    "min_silos": 1,
    "round_deadline_s": 60,
    "evaluation": {"federated": False},
}


def _job(
    start: StartCoordinator, pki_dir: Path, **overrides: Any
) -> tuple[Coordinator, Silo, TaskSpec]:
    coordinator = start()
    silo = Silo(pki_dir, "silo-a", coordinator.fleet.port)
    submit(coordinator, pki_dir, {**SPEC, **overrides})
    return coordinator, silo, silo.pull(TaskKind.TRAIN)


def _runner(coordinator: Coordinator) -> JobRunner:
    runner = coordinator.jobs.current()
    assert runner is not None
    return runner


def _ended(coordinator: Coordinator, phase: Phase = Phase.FINISHED) -> JobRunner:
    """The job's runner once its job ended (well within the round deadline) in ``phase``."""
    runner = _runner(coordinator)
    runner.join(30)
    assert runner.state.phase is phase, runner.state.message
    return runner


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _refused(
    coordinator: Coordinator,
    send: Callable[[], object],
    *,
    code: grpc.StatusCode,
    reason: str,
    needle: str,
) -> None:
    """``send`` is refused with ``code`` (details holding ``needle``), counted once under
    ``reason``, and the global model keeps its hash."""
    before_sha, before_count = global_sha(coordinator), rejected(coordinator, reason)
    with pytest.raises(grpc.RpcError) as info:
        send()
    assert info.value.code() == code, info.value.details()
    assert needle in (info.value.details() or ""), info.value.details()
    assert rejected(coordinator, reason) == before_count + 1
    assert global_sha(coordinator) == before_sha


def _shifted(weights: WeightMap, shift: float, scale: float = 1.0) -> WeightMap:
    return {k: v * scale + shift if v.is_floating_point() else v for k, v in weights.items()}


def _distance(a: WeightMap, b: WeightMap) -> float:
    return math.sqrt(
        sum(
            float((a[k].double() - b[k].double()).square().sum())
            for k in a
            if a[k].is_floating_point()
        )
    )


def test_a_count_of_ten_to_the_twelve_from_a_silo_that_registered_500_is_refused(
    start: StartCoordinator, pki_dir: Path
) -> None:
    coordinator, silo, task = _job(start, pki_dir)
    weights = silo.download(task)
    zeros = {k: torch.zeros_like(v) for k, v in weights.items()}
    _refused(
        coordinator,
        lambda: silo.upload(task, *plain(zeros), num_examples=10**12),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="excess_claim",
        needle=f"exceeds the {TRAIN_EXAMPLES} training examples silo silo-a registered",
    )
    # its honest update, at its registered count, is taken: the job credits it with 500
    assert silo.upload(task, *plain(weights), num_examples=TRAIN_EXAMPLES).accepted
    runner = _ended(coordinator)
    assert runner.state.silos["silo-a"].examples == TRAIN_EXAMPLES
    assert runner.state.silos["silo-a"].registered_examples == TRAIN_EXAMPLES


def test_finite_weights_that_would_overflow_a_float32_sum_are_refused(
    start: StartCoordinator, pki_dir: Path
) -> None:
    coordinator, silo, task = _job(start, pki_dir)
    weights = silo.download(task)
    huge = {k: torch.full_like(v, 1e37) if v.is_floating_point() else v for k, v in weights.items()}
    _refused(
        coordinator,
        lambda: silo.upload(task, *plain(huge), num_examples=TRAIN_EXAMPLES),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="weight_range",
        needle="beyond the round's aggregation range",
    )
    assert silo.upload(task, *plain(weights), num_examples=TRAIN_EXAMPLES).accepted
    runner = _ended(coordinator)
    assert runner.global_model is not None
    assert all(torch.isfinite(t).all() for t in runner.global_model.weights.values())


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_an_update_scaled_by_a_million_is_refused_or_clipped(
    start: StartCoordinator, pki_dir: Path, action: str
) -> None:
    bound = 5.0
    coordinator, silo, task = _job(
        start, pki_dir, update_bounds={"max_norm": bound, "action": action}
    )
    weights = silo.download(task)
    scaled = _shifted(weights, 0.0, scale=1e6)

    def send() -> fleet_pb2.UploadReply:
        return silo.upload(task, *plain(scaled), num_examples=TRAIN_EXAMPLES)

    if action == "reject":
        _refused(
            coordinator,
            send,
            code=grpc.StatusCode.INVALID_ARGUMENT,
            reason="update_norm",
            needle=f"beyond the round's bound {bound:g} (update_bounds.max_norm",
        )
        return
    before = _runner(coordinator).global_model
    assert before is not None
    assert send().accepted
    runner = _ended(coordinator)
    assert metric(coordinator, "gptfl_updates_clipped_total") == 1
    assert rejected(coordinator, "update_norm") == 0
    assert runner.global_model is not None and runner.global_model is not before
    # the model moved by exactly the bound (the clipped update is the round's only one)
    assert _distance(runner.global_model.weights, before.weights) == pytest.approx(bound, rel=1e-4)
    (record,) = runner.state.rounds
    assert record.updates_clipped == 1
    assert record.update_norms[0] == pytest.approx(_distance(scaled, before.weights), rel=1e-6)


def test_evaluation_reports_beyond_belief_are_refused(
    start: StartCoordinator, pki_dir: Path
) -> None:
    coordinator, silo, task = _job(start, pki_dir, evaluation={"federated": True})
    assert silo.upload(task, *plain(silo.download(task)), num_examples=TRAIN_EXAMPLES).accepted
    evaluation = silo.pull(TaskKind.EVALUATE)

    def report(n: int, loss: float, accuracy: float) -> Callable[[], None]:
        return lambda: silo.evaluate(evaluation, num_examples=n, loss=loss, accuracy=accuracy)

    _refused(
        coordinator,
        report(10**12, 0.1, 1.0),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="excess_claim",
        needle=f"exceeds the {EVAL_EXAMPLES} evaluation examples",
    )
    _refused(
        coordinator,
        report(EVAL_EXAMPLES, 0.5, 1e9),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="metric_range",
        needle="accuracy 1e+09 is not in [0, 1]",
    )
    _refused(
        coordinator,
        report(EVAL_EXAMPLES, -1e9, 0.5),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="metric_range",
        needle="loss -1e+09 is negative",
    )
    report(EVAL_EXAMPLES, 0.75, 0.6)()
    runner = _ended(coordinator)
    (record,) = runner.state.rounds
    assert (record.federated_accuracy, record.federated_loss) == (0.6, 0.75)
    assert record.federated_examples == EVAL_EXAMPLES
    assert record.updates_rejected == 3


def test_a_task_refused_three_times_for_one_reason_is_not_reopened(
    start: StartCoordinator, pki_dir: Path
) -> None:
    coordinator, silo, task = _job(start, pki_dir)
    weights = silo.download(task)
    nan = {k: v.clone() for k, v in weights.items()}
    next(v for v in nan.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    before = global_sha(coordinator)
    for _ in range(3):
        _refused(
            coordinator,
            lambda: silo.upload(task, *plain(nan), num_examples=TRAIN_EXAMPLES),
            code=grpc.StatusCode.INVALID_ARGUMENT,
            reason="non_finite",
            needle="NaN",
        )
    # closed for good: even a good update is now refused, and nothing waits for the deadline
    _refused(
        coordinator,
        lambda: silo.upload(task, *plain(weights), num_examples=TRAIN_EXAMPLES),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        reason="stale_task",
        needle="is rejected",
    )
    runner = _ended(coordinator, Phase.FAILED)  # far below the 60 s round deadline
    assert "refused 3 times (non_finite)" in runner.state.message
    assert global_sha(coordinator) == before


@pytest.mark.parametrize("tolerated", [0, 1])
def test_a_non_finite_new_model_is_never_applied(
    start: StartCoordinator, pki_dir: Path, tolerated: int
) -> None:
    # a server step of 1e38 times the (finite, in-range) pseudo-gradient is infinite
    coordinator, silo, task = _job(
        start,
        pki_dir,
        rounds=2,
        strategy={"name": "fedavgm", "server_learning_rate": 1e38},
        max_failed_rounds=tolerated,
    )
    before = global_sha(coordinator)
    weights = silo.download(task)
    assert silo.upload(task, *plain(_shifted(weights, 10.0)), num_examples=100).accepted
    runner = _runner(coordinator)
    _wait(lambda: bool(runner.state.rounds), "round 1 did not close")
    assert "non-finite values" in runner.state.rounds[0].failed
    if tolerated:  # the job goes on from the unchanged model
        second = silo.pull(TaskKind.TRAIN)
        assert second.round == 2 and second.model_digest == before
        assert silo.upload(second, *plain(_shifted(weights, 10.0)), num_examples=100).accepted
    _ended(coordinator, Phase.FAILED)
    assert f"max_failed_rounds is {tolerated}" in runner.state.message
    assert global_sha(coordinator) == before
    assert metric(coordinator, "gptfl_rounds_failed_total") == tolerated + 1
