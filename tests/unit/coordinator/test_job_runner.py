"""A real JobRunner driven in-process by fake silos (no gRPC): rounds, rejections, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator import checkpoint as checkpoint_module
from coordinator.checkpoint import LATEST, load_latest
from coordinator.job_runner import JobRunner
from coordinator.job_state import Phase, SiloSummary
from coordinator.metrics import CoordinatorMetrics
from coordinator.silo_registry import SiloRegistry
from coordinator.tasks import TaskBoard, TaskRecord, TaskStatus
from gptfl.errors import (
    ChecksumError,
    ChunkOrderError,
    DuplicateUpdateError,
    ExcessClaimError,
    GptflError,
    ManifestMismatchError,
    NonFiniteError,
    PermissionDeniedError,
    StaleTaskError,
    UnknownTaskError,
    ValidationError,
    WeightRangeError,
)
from gptfl.fleet_messages import Decline, EvaluationReport, UpdateHeader
from gptfl.job_spec import JobSpec
from gptfl.models import build_model
from gptfl.task import TaskKind
from gptfl.weights import Chunk, WeightMap, build_manifest, iter_chunks, receive_all
from tests.waiting import wait_until

MODEL = {"arch": "cnn-small", "num_classes": 10, "in_channels": 1, "image_size": 8}
CHUNK = 16 * 1024  # several chunks per update, so stream faults can sit mid-stream
WAIT = 10.0  # generous waits for things that happen at once; never reached when all is well


def _spec(**overrides: Any) -> JobSpec:
    data: dict[str, Any] = {
        "name": "unit",
        "model": MODEL,
        "rounds": 1,
        "min_silos": 2,
        "round_deadline_s": 30,
        "wait_for_silos_s": 5,
        "evaluation": {"federated": False},
    }
    data.update(overrides)
    return JobSpec.model_validate(data)


def _initial_weights() -> WeightMap:
    model = build_model(JobSpec.model_validate({"name": "x", "model": MODEL, "rounds": 1}).model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


INITIAL = _initial_weights()


def _shifted(base: WeightMap, seed: int, scale: float = 0.1) -> WeightMap:
    """``base`` plus noise that depends on each tensor's name, not on the map's order.

    (A checkpoint reloads tensors sorted by name, so a resumed job lists them differently.)
    """

    def noise(name: str, shape: torch.Size) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=gen)

    return {k: v + scale * noise(k, v.shape) for k, v in base.items()}


@dataclasses.dataclass
class Coordinator:
    """The pieces a JobRunner works with, as the coordinator wires them."""

    tmp: Path
    registry: SiloRegistry
    board: TaskBoard
    metrics: CoordinatorMetrics
    runners: list[JobRunner]

    def runner(
        self,
        spec: JobSpec,
        *,
        job_id: str = "job-1",
        initial: Callable[[JobRunner], tuple[WeightMap, dict[str, Any]]] | None = None,
        **kwargs: Any,
    ) -> JobRunner:
        def initial_model(_: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
            return {k: v.clone() for k, v in INITIAL.items()}, {"kind": "test"}

        runner = JobRunner(
            job_id=job_id,
            spec=spec,
            job_dir=self.tmp / "jobs" / job_id,
            runs_dir=self.tmp / "runs",
            registry=self.registry,
            board=self.board,
            metrics=self.metrics,
            initial_model=initial or initial_model,
            **kwargs,
        )
        self.runners.append(runner)
        runner.start()
        return runner

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "gptfl_updates_rejected_total", {"reason": reason}
        )
        return value or 0.0

    def accepted(self) -> float:
        return self.metrics.registry.get_sample_value("gptfl_updates_accepted_total") or 0.0


@pytest.fixture()
def coord(tmp_path: Path) -> Iterator[Coordinator]:
    registry = SiloRegistry(timeout_s=60)
    for silo in ("a", "b"):
        registry.register(
            silo, agent_version="test", device="cpu", num_train_examples=1000, num_eval_examples=100
        )
    c = Coordinator(tmp_path, registry, TaskBoard(), CoordinatorMetrics.create(), [])
    yield c
    for runner in c.runners:  # never leave a job thread behind, even when a test fails
        runner.request_stop("test over")
        runner.join(WAIT)


# ---- the fake silo ---------------------------------------------------------------------------


def pull(runner: JobRunner, silo: str, kind: TaskKind = TaskKind.TRAIN) -> TaskRecord:
    task = runner.pull_task(silo, WAIT)
    assert task is not None, f"no task for {silo}"
    assert task.kind is kind
    assert task.spec().rounds == runner.spec.rounds  # what a DP silo calibrates its noise for
    return task


def download(runner: JobRunner, silo: str, task: TaskRecord) -> WeightMap:
    manifest, chunks = runner.intake.task_model(silo, task.task_id)
    assert manifest.digest == task.spec().model_digest
    return {k: v.clone() for k, v in receive_all(manifest, chunks).items()}


def upload(
    runner: JobRunner,
    silo: str,
    task: TaskRecord,
    weights: WeightMap,
    n: int,
    *,
    round_: int | None = None,
    loss: float = 1.0,
    edit: Callable[[list[Chunk]], list[Chunk]] | None = None,
) -> None:
    manifest = build_manifest(weights, chunk_size=CHUNK)
    chunks = list(iter_chunks(weights, manifest))
    if edit is not None:
        chunks = edit(chunks)
    header = UpdateHeader(
        task_id=task.task_id,
        round=task.round if round_ is None else round_,
        num_examples=n,
        train_metrics={"loss": loss},
        train_seconds=0.01,
    )
    runner.intake.receive_update(silo, header, manifest, iter(chunks))


def weighted_mean(updates: list[tuple[WeightMap, int]]) -> WeightMap:
    total = sum(n for _, n in updates)
    return {
        k: sum((w[k].double() * n for w, n in updates), torch.zeros(()).double()) / total
        for k in updates[0][0]
    }


def assert_close(got: WeightMap, want: WeightMap) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-5, atol=1e-6)


def assert_equal(got: WeightMap, want: WeightMap) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def finish(runner: JobRunner, phase: Phase) -> None:
    runner.join(WAIT)
    assert not runner.is_running
    assert runner.state.phase is phase, runner.state.message


def global_weights(runner: JobRunner) -> WeightMap:
    assert runner.global_model is not None
    return runner.global_model.weights


# ---- FedAvg over rounds ----------------------------------------------------------------------


def test_fedavg_rounds_produce_the_weighted_mean(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=2))
    expected = INITIAL
    ta = pull(runner, "a")
    for number in (1, 2):
        tb = pull(runner, "b")
        assert ta.round == tb.round == number
        assert ta.local.learning_rate == 0.05 and ta.local.proximal_mu == 0.0
        base = download(runner, "a", ta)
        assert_close(base, expected)  # each round starts from the last aggregate
        wa, wb = _shifted(base, 10 * number), _shifted(base, 10 * number + 1)
        upload(runner, "a", ta, wa, 30, loss=1.0)
        upload(runner, "b", tb, wb, 10, loss=3.0)
        expected = weighted_mean([(wa, 30), (wb, 10)])
        if number == 1:
            ta = pull(runner, "a")  # round 2 is out, so round 1 has been aggregated
            assert_close(global_weights(runner), expected)
    finish(runner, Phase.FINISHED)
    assert_close(global_weights(runner), expected)
    assert global_weights(runner)["classifier.1.weight"].dtype == torch.float32

    records = runner.state.rounds
    assert [r.round for r in records] == [1, 2]
    assert records[0].examples == 40 and records[0].updates_accepted == 2
    assert records[0].train_loss == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert runner.state.silos["a"].rounds_participated == 2
    assert runner.state.silos["b"].examples == 20
    assert coord.accepted() == 4
    assert coord.metrics.registry.get_sample_value("gptfl_rounds_completed_total") == 2
    size = build_manifest(INITIAL).total_bytes
    received = coord.metrics.registry.get_sample_value("gptfl_bytes_received_total", {"silo": "a"})
    assert received == 2 * size

    summary = json.loads((coord.tmp / "runs" / "job-1" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]


def test_a_checkpoint_is_written_per_round(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=2))
    for number in (1, 2):
        ta, tb = pull(runner, "a"), pull(runner, "b")
        assert ta.round == number
        upload(runner, "a", ta, _shifted(download(runner, "a", ta), number), 5)
        upload(runner, "b", tb, _shifted(download(runner, "b", tb), -number), 5)
    finish(runner, Phase.FINISHED)
    folder = coord.tmp / "jobs" / "job-1" / "checkpoints"
    assert sorted(p.name for p in folder.glob("round-*")) == [
        "round-0000",
        "round-0001",
        "round-0002",
    ]
    assert (folder / LATEST).read_text().strip() == "round-0002"
    checkpoint = load_latest(folder)
    assert checkpoint is not None and checkpoint.round == 2
    assert_equal(checkpoint.weights, global_weights(runner))
    assert [r.round for r in checkpoint.state.rounds] == [1, 2]
    assert checkpoint.state.initialisation == {"kind": "test"}


# ---- bad updates -----------------------------------------------------------------------------


def _flip_byte(chunks: list[Chunk]) -> list[Chunk]:
    data = bytearray(chunks[2].data)
    data[10] ^= 0xFF
    return [*chunks[:2], dataclasses.replace(chunks[2], data=bytes(data)), *chunks[3:]]


def _swap(chunks: list[Chunk]) -> list[Chunk]:
    return [chunks[0], chunks[2], chunks[1], *chunks[3:]]


def _nan(weights: WeightMap) -> WeightMap:
    out = dict(weights)
    out["classifier.3.bias"] = weights["classifier.3.bias"].clone()
    out["classifier.3.bias"][3] = float("nan")
    return out


def _huge(weights: WeightMap) -> WeightMap:
    """Finite, but far past what any float32 sum of a few of them could hold."""
    out = dict(weights)
    out["classifier.3.bias"] = torch.full_like(weights["classifier.3.bias"], 1e37)
    return out


def _reshaped(weights: WeightMap) -> WeightMap:
    out = dict(weights)
    out["classifier.3.weight"] = weights["classifier.3.weight"].t().contiguous()
    return out


def _missing(weights: WeightMap) -> WeightMap:
    return {k: v for k, v in weights.items() if k != "classifier.3.bias"}


def _half(weights: WeightMap) -> WeightMap:
    return {k: v.half() if k.startswith("features.0") else v for k, v in weights.items()}


def _renamed(weights: WeightMap) -> WeightMap:
    return {k.replace("classifier.3", "head"): v for k, v in weights.items()}


# (name, who uploads, what is wrong, expected error, metric reason, message fragment)
BAD_UPDATES: list[tuple[str, str, dict[str, Any], type[GptflError], str, str]] = [
    ("stale-round", "a", {"round_": 2}, StaleTaskError, "stale_task", "upload says round 2"),
    ("other-silo", "b", {}, PermissionDeniedError, "permission_denied", "another silo"),
    ("unknown-task", "a", {"task_id": "0" * 32}, UnknownTaskError, "unknown_task", "no task"),
    ("zero-examples", "a", {"n": 0}, ValidationError, "invalid", "num_examples"),
    (
        "wrong-shape",
        "a",
        {"weights": _reshaped},
        ManifestMismatchError,
        "manifest_mismatch",
        r"'classifier.3.weight' has shape \[64, 10\], expected \[10, 64\]",
    ),
    (
        "wrong-dtype",
        "a",
        {"weights": _half},
        ManifestMismatchError,
        "manifest_mismatch",
        "dtype float16",
    ),
    (
        "missing-tensor",
        "a",
        {"weights": _missing},
        ManifestMismatchError,
        "manifest_mismatch",
        "classifier.3.bias",
    ),
    (
        "extra-tensor",
        "a",
        {"weights": _renamed},
        ManifestMismatchError,
        "manifest_mismatch",
        "head.bias",
    ),
    ("non-finite", "a", {"weights": _nan}, NonFiniteError, "non_finite", "classifier.3.bias"),
    ("huge", "a", {"weights": _huge}, WeightRangeError, "weight_range", "classifier.3.bias"),
    ("over-claim", "a", {"n": 1001}, ExcessClaimError, "excess_claim", "1000 training examples"),
    ("bad-crc", "a", {"edit": _flip_byte}, ChecksumError, "checksum", "crc32"),
    ("out-of-order", "a", {"edit": _swap}, ChunkOrderError, "chunk_order", "out of order"),
]


@pytest.mark.parametrize(
    ("uploader", "fault", "error", "reason", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_UPDATES],
)
def test_bad_update_is_rejected_counted_and_leaves_the_model_alone(
    coord: Coordinator,
    uploader: str,
    fault: dict[str, Any],
    error: type[GptflError],
    reason: str,
    message: str,
) -> None:
    runner = coord.runner(_spec(rounds=1))
    ta, tb = pull(runner, "a"), pull(runner, "b")
    wa = _shifted(download(runner, "a", ta), 1)
    wb = _shifted(download(runner, "b", tb), 2)

    bad_task = dataclasses.replace(ta, task_id=fault["task_id"]) if "task_id" in fault else ta
    bad_weights = fault["weights"](wa) if "weights" in fault else _shifted(wa, 99, scale=5.0)
    with pytest.raises(error, match=message) as info:
        upload(
            runner,
            uploader,
            bad_task,
            bad_weights,
            fault.get("n", 1000),
            round_=fault.get("round_"),
            edit=fault.get("edit"),
        )
    assert info.value.reason == reason
    assert coord.rejected(reason) == 1
    assert runner.state.silos[uploader].updates_rejected == 1
    assert_equal(global_weights(runner), INITIAL)
    assert coord.accepted() == 0

    # the silo may still send its real update, and only the good updates make the model
    upload(runner, "a", ta, wa, 30)
    upload(runner, "b", tb, wb, 10)
    finish(runner, Phase.FINISHED)
    assert_close(global_weights(runner), weighted_mean([(wa, 30), (wb, 10)]))
    record = runner.state.rounds[0]
    assert record.updates_accepted == 2 and record.updates_rejected == 1
    assert record.examples == 40


def test_a_second_update_for_a_done_task_is_a_duplicate(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=2, min_silos=1))
    ta, tb = pull(runner, "a"), pull(runner, "b")
    wa, wb = _shifted(INITIAL, 1), _shifted(INITIAL, 2)
    upload(runner, "a", ta, wa, 10)
    with pytest.raises(DuplicateUpdateError):
        upload(runner, "a", ta, _shifted(INITIAL, 3, scale=9.0), 1000)
    upload(runner, "b", tb, wb, 10)
    assert pull(runner, "a").round == 2
    assert_close(global_weights(runner), weighted_mean([(wa, 10), (wb, 10)]))
    with pytest.raises(DuplicateUpdateError):  # also once the task is retired
        upload(runner, "a", ta, wa, 10)
    assert coord.rejected("duplicate") == 2
    assert coord.accepted() == 2


def test_an_update_after_its_round_closed_is_stale(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=2, min_silos=1, round_deadline_s=1.0))
    ta, tb = pull(runner, "a"), pull(runner, "b")
    wa = _shifted(INITIAL, 1)
    upload(runner, "a", ta, wa, 10)
    assert pull(runner, "a").round == 2  # b missed the deadline; round 1 closed without it
    assert tb.status is TaskStatus.EXPIRED
    with pytest.raises(StaleTaskError, match="round 1, which has closed"):
        upload(runner, "b", tb, _shifted(INITIAL, 2), 10)
    assert coord.rejected("stale_task") == 1
    assert_close(global_weights(runner), wa)
    assert runner.state.rounds[0].updates_accepted == 1
    assert runner.state.rounds[0].silos_selected == 2


def test_an_upload_overtaken_by_the_deadline_is_not_reported_accepted(
    coord: Coordinator,
) -> None:
    """The round closes (expires b's RECEIVING task) while b's chunks are still arriving.

    receive_update then adds b's weights to the old round's RunningSum after its mean was
    taken, ignores that board.finish(DONE) returned False, and counts the update as accepted:
    b is told OK, its participation and gptfl_updates_accepted_total go up, yet the update is
    in no model. It should be rejected as stale.
    """
    runner = coord.runner(_spec(rounds=2, min_silos=1, round_deadline_s=1.0))
    ta, tb = pull(runner, "a"), pull(runner, "b")
    upload(runner, "a", ta, _shifted(INITIAL, 1), 10)
    wb = _shifted(INITIAL, 2)
    manifest = build_manifest(wb, chunk_size=CHUNK)
    go_on = threading.Event()

    def stalled() -> Iterator[Chunk]:
        for i, chunk in enumerate(iter_chunks(wb, manifest)):
            if i == 1:
                go_on.wait(WAIT)
            yield chunk

    outcome: dict[str, object] = {}

    def upload_b() -> None:
        header = UpdateHeader(tb.task_id, 1, 10, {"loss": 1.0}, 0.01)
        try:
            runner.intake.receive_update("b", header, manifest, stalled())
            outcome["result"] = "accepted"
        except GptflError as exc:
            outcome["result"] = exc

    thread = threading.Thread(target=upload_b)
    thread.start()
    assert pull(runner, "a").round == 2  # round 1 closed while b was mid-stream
    go_on.set()
    thread.join(WAIT)
    assert isinstance(outcome["result"], StaleTaskError), outcome
    assert coord.accepted() == 1
    assert runner.state.silos.get("b", SiloSummary()).rounds_participated == 0


# ---- quorum, declines ------------------------------------------------------------------------


def test_missed_quorum_fails_the_job_naming_min_silos(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=2, min_silos=2, round_deadline_s=1.0))
    ta, _ = pull(runner, "a"), pull(runner, "b")
    upload(runner, "a", ta, _shifted(INITIAL, 1), 10)
    finish(runner, Phase.FAILED)
    message = runner.state.message
    assert "round 1: 1 of 2 updates arrived" in message
    assert "min_silos is 2" in message
    assert_equal(global_weights(runner), INITIAL)  # a failed round is never applied
    assert runner.state.rounds == []
    summary = json.loads((coord.tmp / "runs" / "job-1" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "min_silos is 2" in summary["message"]


def test_a_decline_is_recorded_and_ends_the_wait(coord: Coordinator) -> None:
    # the deadline is long: the round ends because every task is finished, not by waiting
    runner = coord.runner(_spec(rounds=1, min_silos=2, round_deadline_s=60))
    ta, tb = pull(runner, "a"), pull(runner, "b")
    upload(runner, "a", ta, _shifted(INITIAL, 1), 10)
    runner.intake.decline("b", Decline(tb.task_id, "not enough memory"))
    assert tb.status is TaskStatus.DECLINED
    assert tb.decline_reason == "not enough memory"
    finish(runner, Phase.FAILED)
    assert "declined: b: not enough memory" in runner.state.message
    assert "min_silos is 2" in runner.state.message
    with pytest.raises(StaleTaskError):
        upload(runner, "b", tb, _shifted(INITIAL, 2), 10)
    with pytest.raises(PermissionDeniedError):
        runner.intake.decline("a", Decline(tb.task_id, "not mine"))


def test_a_decline_does_not_stop_a_round_that_has_quorum(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=1, min_silos=1))
    ta, tb = pull(runner, "a"), pull(runner, "b")
    wa = _shifted(INITIAL, 1)
    runner.intake.decline("b", Decline(tb.task_id, "maintenance window"))
    upload(runner, "a", ta, wa, 10)
    finish(runner, Phase.FINISHED)
    assert_close(global_weights(runner), wa)
    record = runner.state.rounds[0]
    assert (record.silos_selected, record.updates_accepted) == (2, 1)


# ---- federated evaluation --------------------------------------------------------------------


def test_federated_evaluation_is_sample_weighted(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=1, evaluation={"federated": True}))
    ta, tb = pull(runner, "a"), pull(runner, "b")
    wa, wb = _shifted(INITIAL, 1), _shifted(INITIAL, 2)
    upload(runner, "a", ta, wa, 10)
    upload(runner, "b", tb, wb, 10)
    ea = pull(runner, "a", TaskKind.EVALUATE)
    eb = pull(runner, "b", TaskKind.EVALUATE)
    assert ea.round == 1
    # silos evaluate the new global model, not the one they trained on
    assert_close(download(runner, "a", ea), weighted_mean([(wa, 10), (wb, 10)]))
    with pytest.raises(NonFiniteError, match="'accuracy' is nan, not a finite number"):
        runner.intake.receive_evaluation(
            "a", EvaluationReport(ea.task_id, 1, 10, {"loss": 1.0, "accuracy": float("nan")})
        )
    with pytest.raises(StaleTaskError, match="is a evaluate task"):
        upload(runner, "a", ea, wa, 10)  # a model upload for an evaluation task
    runner.intake.receive_evaluation(
        "a", EvaluationReport(ea.task_id, 1, 10, {"loss": 2.0, "accuracy": 0.5})
    )
    runner.intake.receive_evaluation(
        "b", EvaluationReport(eb.task_id, 1, 30, {"loss": 1.0, "accuracy": 0.9})
    )
    finish(runner, Phase.FINISHED)
    record = runner.state.rounds[0]
    assert record.federated_examples == 40
    assert record.federated_accuracy == pytest.approx(0.8)
    assert record.federated_loss == pytest.approx(1.25)
    assert coord.rejected("non_finite") == 1
    assert coord.rejected("stale_task") == 1
    accuracy = coord.metrics.registry.get_sample_value(
        "gptfl_global_model_accuracy", {"source": "federated"}
    )
    assert accuracy == pytest.approx(0.8)


# ---- stop, suspend and resume ----------------------------------------------------------------


def _train_round(runner: JobRunner, number: int) -> None:
    """Both silos train deterministically on the model they download."""
    for index, silo in enumerate(("a", "b")):
        task = pull(runner, silo)
        assert task.round == number
        upload(
            runner,
            silo,
            task,
            _shifted(download(runner, silo, task), 100 * number + index),
            10 + 20 * index,
        )


def test_resume_from_a_checkpoint_continues_at_the_next_round(coord: Coordinator) -> None:
    spec = _spec(rounds=3, strategy={"name": "fedadam", "server_learning_rate": 0.05})

    reference = coord.runner(spec, job_id="reference")
    for number in (1, 2, 3):
        _train_round(reference, number)
    finish(reference, Phase.FINISHED)

    first = coord.runner(spec, job_id="resumed")
    _train_round(first, 1)
    pull(first, "a")  # round 2 is out, so round 1's checkpoint is written
    first.suspend()  # the coordinator shuts down mid-round 2
    first.join(WAIT)
    assert not first.is_running
    assert first.state.phase is Phase.FEDERATING  # suspended, not ended
    assert not (coord.tmp / "runs" / "resumed").exists()

    checkpoint = load_latest(coord.tmp / "jobs" / "resumed" / "checkpoints")
    assert checkpoint is not None and checkpoint.round == 1
    assert checkpoint.strategy_state  # FedAdam's m and v travel with the checkpoint

    def must_not_initialise(_: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
        raise AssertionError("a resumed job must not be initialised again")

    coord.board = TaskBoard()  # a restarted coordinator starts with an empty board
    second = coord.runner(
        spec, job_id="resumed", initial=must_not_initialise, resume_from=checkpoint
    )
    assert_equal(global_weights(second), checkpoint.weights)
    _train_round(second, 2)
    _train_round(second, 3)
    finish(second, Phase.FINISHED)
    assert [r.round for r in second.state.rounds] == [1, 2, 3]
    # the same silo behaviour gives the same model as the uninterrupted job
    assert_equal(global_weights(second), global_weights(reference))


def test_a_checkpoint_holds_the_strategy_state_of_its_round(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checkpoints are written from the strategy's own tensors, which FedAdam updates in place:
    # with a slow disk, the next round must wait for the write before it updates them.
    spec = _spec(rounds=3, strategy={"name": "fedadam", "server_learning_rate": 0.05})
    reference = coord.runner(spec, job_id="reference")
    for number in (1, 2, 3):
        _train_round(reference, number)
    finish(reference, Phase.FINISHED)

    write = checkpoint_module.save_checkpoint

    def slow_disk(folder: Path, **kwargs: Any) -> Path:
        time.sleep(0.3)
        return write(folder, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", slow_disk)
    slow = coord.runner(spec, job_id="slow")
    for number in (1, 2, 3):
        _train_round(slow, number)
    finish(slow, Phase.FINISHED)
    folder = coord.tmp / "jobs" / "slow" / "checkpoints"
    (folder / LATEST).write_text("round-0001\n")  # resume from round 1, as after a crash
    checkpoint = load_latest(folder)
    assert checkpoint is not None and checkpoint.round == 1

    coord.board = TaskBoard()
    resumed = coord.runner(spec, job_id="slow", resume_from=checkpoint)
    _train_round(resumed, 2)
    _train_round(resumed, 3)
    finish(resumed, Phase.FINISHED)
    assert_equal(global_weights(resumed), global_weights(reference))


def test_stop_ends_the_job_as_stopped(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=5))
    pull(runner, "a")
    runner.request_stop("admin asked")
    finish(runner, Phase.STOPPED)
    assert "admin asked" in runner.state.message
    assert runner.pull_task("a", 0.05) is None  # long polls are released


def test_failed_initialisation_fails_the_job(coord: Coordinator) -> None:
    def broken(_: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
        raise ValidationError("initial.safetensors: no such weights file")

    runner = coord.runner(_spec(), initial=broken)
    finish(runner, Phase.FAILED)
    assert runner.state.message.startswith("initial model: initial.safetensors")


def test_local_training_seed_is_the_same_in_every_process(coord: Coordinator) -> None:
    # The seed a silo trains with must depend only on (job seed, round, silo): a restarted
    # coordinator has to hand out the same seeds. Python's hash() of a str differs per process.
    spec = _spec(seed=7)
    runner = JobRunner(
        job_id="seed",
        spec=spec,
        job_dir=coord.tmp,
        runs_dir=coord.tmp,
        registry=coord.registry,
        board=TaskBoard(),
        metrics=CoordinatorMetrics.create(),
        initial_model=lambda _: ({}, {}),
    )
    here = [runner._local_settings(r, s).seed for r in (1, 2) for s in ("a", "b")]
    assert len(set(here)) == 4  # rounds and silos get different seeds
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from coordinator.job_runner import JobRunner
        from coordinator.metrics import CoordinatorMetrics
        from coordinator.silo_registry import SiloRegistry
        from coordinator.tasks import TaskBoard
        from gptfl.job_spec import JobSpec
        runner = JobRunner(
            job_id="seed", spec=JobSpec.model_validate_json(sys.argv[1]), job_dir=Path("."),
            runs_dir=Path("."), registry=SiloRegistry(timeout_s=1), board=TaskBoard(),
            metrics=CoordinatorMetrics.create(), initial_model=lambda _: ({}, {}),
        )
        print([runner._local_settings(r, s).seed for r in (1, 2) for s in ("a", "b")])
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    out = subprocess.run(
        [sys.executable, "-c", code, spec.model_dump_json()],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == here


# ---- before round 1: the pretrain phase's hooks, round 0 ---------------------------------------


def test_the_initial_model_is_evaluated_as_round_0(coord: Coordinator) -> None:
    from coordinator.evaluation import ServerEvaluator
    from gptfl.data.sources import SklearnDigitsSource

    server = {"kind": "sklearn-digits", "split": "test"}
    spec = _spec(evaluation={"server": server, "federated": False})
    evaluator = ServerEvaluator(SklearnDigitsSource.model_validate(server), spec.model)
    runner = coord.runner(spec, evaluator=evaluator)
    pull(runner, "a")  # round 1 has started, so round 0 is done
    evaluation = runner.state.initialisation["evaluation"]
    assert evaluation["test_accuracy"] == evaluator.evaluate(INITIAL).accuracy
    assert evaluation["examples"] == 359
    assert runner.state.initialisation["kind"] == "test"


def test_a_stop_during_the_pretrain_phase_ends_the_job_as_stopped(coord: Coordinator) -> None:
    from coordinator.job_runner import JobInterrupted

    reported = threading.Event()

    def pretraining(runner: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
        runner.report_pretrain("generating synthetic images: 10/100")
        reported.set()
        wait_until(lambda: runner.stop_requested, timeout_s=WAIT, what="the stop")
        raise JobInterrupted("stopped while generating")

    runner = coord.runner(_spec(), initial=pretraining)
    assert reported.wait(WAIT)
    assert runner.state.phase is Phase.PRETRAIN
    assert runner.state.message == "generating synthetic images: 10/100"
    runner.request_stop("admin asked")
    finish(runner, Phase.STOPPED)
    assert runner.state.message == "stopped: admin asked"
    assert not (coord.tmp / "jobs" / "job-1" / "checkpoints" / LATEST).exists()


def test_a_failed_phase_keeps_its_own_message(coord: Coordinator) -> None:
    from coordinator.job_runner import JobFailed

    def failing(_: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
        raise JobFailed("pretrain phase failed: Generate at synth:1: NOT_FOUND: no generator")

    runner = coord.runner(_spec(), initial=failing)
    finish(runner, Phase.FAILED)
    assert runner.state.message == (
        "pretrain phase failed: Generate at synth:1: NOT_FOUND: no generator"
    )
    summary = json.loads((coord.tmp / "runs" / "job-1" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["message"] == runner.state.message


def test_a_terminal_status_means_the_report_is_written(coord: Coordinator) -> None:
    runner = coord.runner(_spec(rounds=5))
    pull(runner, "a")
    runner.request_stop("admin asked")
    # what an admin polling the status sees: the files are there as soon as it is terminal
    wait_until(
        lambda: runner.state.phase.terminal, timeout_s=WAIT, interval_s=0.001, what="the end"
    )
    for name in ("summary.json", "report.md", "model.safetensors"):
        assert (coord.tmp / "runs" / "job-1" / name).exists(), name
    runner.join(WAIT)


def test_a_restart_after_round_0_keeps_the_pretrained_model(coord: Coordinator) -> None:
    pretrained = _shifted(INITIAL, seed=3)

    def pretraining(runner: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
        runner.report_pretrain("pretraining")
        return {k: v.clone() for k, v in pretrained.items()}, {"kind": "pretrain"}

    first = coord.runner(_spec(rounds=2), job_id="gptfl", initial=pretraining)
    pull(first, "a")  # round 1 is out: round 0 (the pretrained model) is checkpointed
    first.suspend()
    first.join(WAIT)
    checkpoint = load_latest(coord.tmp / "jobs" / "gptfl" / "checkpoints")
    assert checkpoint is not None and checkpoint.round == 0
    assert checkpoint.state.initialisation == {"kind": "pretrain"}

    def must_not_pretrain(_: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
        raise AssertionError("a restarted job must not run the pretrain phase again")

    coord.board = TaskBoard()
    second = coord.runner(
        _spec(rounds=2), job_id="gptfl", initial=must_not_pretrain, resume_from=checkpoint
    )
    assert_equal(global_weights(second), pretrained)
    assert second.state.initialisation == {"kind": "pretrain"}


# ---- per-job metrics -------------------------------------------------------------------------


def _gauge(coord: Coordinator, name: str, **labels: str) -> float | None:
    return coord.metrics.registry.get_sample_value(name, labels)


def test_per_silo_round_gauges_start_afresh_with_each_job(coord: Coordinator) -> None:
    first = coord.runner(_spec(rounds=2), job_id="first")
    _train_round(first, 1)
    _train_round(first, 2)
    finish(first, Phase.FINISHED)
    assert _gauge(coord, "gptfl_silo_last_round", silo="a") == 2

    second = coord.runner(_spec(rounds=2), job_id="second")
    pull(second, "a")  # round 1 of the new job is open
    assert _gauge(coord, "gptfl_current_round") == 1
    # not 2 from the job before (which would read as "ahead" and hide an absent silo)
    assert _gauge(coord, "gptfl_silo_last_round", silo="a") == 0
    assert _gauge(coord, "gptfl_silo_last_round", silo="b") == 0


def test_a_resumed_job_restores_the_per_silo_rounds(coord: Coordinator) -> None:
    spec = _spec(rounds=3)
    first = coord.runner(spec, job_id="resumed")
    _train_round(first, 1)
    pull(first, "a")  # round 2 is out, so round 1's checkpoint is written
    first.suspend()
    first.join(WAIT)
    checkpoint = load_latest(coord.tmp / "jobs" / "resumed" / "checkpoints")
    assert checkpoint is not None and checkpoint.round == 1

    coord.board = TaskBoard()  # a restarted coordinator: empty board, fresh metrics
    coord.metrics = CoordinatorMetrics.create()
    second = coord.runner(spec, job_id="resumed", resume_from=checkpoint)
    pull(second, "a")  # round 2 is open again
    assert _gauge(coord, "gptfl_current_round") == 2
    assert _gauge(coord, "gptfl_silo_last_round", silo="a") == 1
    assert _gauge(coord, "gptfl_silo_last_round", silo="b") == 1
