"""The Fleet servicer as a thin adapter: identity from the caller, serde at the edge, domain
errors as statuses. Driven in-process with a fake call context (no network)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from coordinator.fleet_servicer import FleetServicer
from coordinator.job_runner import JobRunner
from coordinator.tasks import TaskRecord
from gptfl import serde
from gptfl.errors import JobStateError
from gptfl.fleet_messages import Decline, FleetPhase, UpdateHeader
from gptfl.identity import insecure_metadata
from gptfl.pki import Identity
from gptfl.proto.v1 import fleet_pb2
from gptfl.task import TaskKind
from gptfl.weights import build_manifest, iter_chunks
from tests.unit.coordinator.in_process_job import WAIT_S, InProcessJob, tiny_spec


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """What a servicer method sees of its call: the caller's metadata, abort, cancel."""

    def __init__(self, name: str = "a", role: str = "silo") -> None:
        self._metadata = insecure_metadata(Identity(name, role))
        self.cancelled = False

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> None:
        self.cancelled = True


class FakeJobs:
    """The part of JobManager the servicer calls."""

    def __init__(self, runner: JobRunner | None) -> None:
        self.runner = runner
        self.registered: list[str] = []

    def current(self) -> JobRunner | None:
        return self.runner

    def active(self) -> JobRunner:
        if self.runner is None:
            raise JobStateError("no job is running")
        return self.runner

    def silo_registered(self, silo_id: str) -> None:
        self.registered.append(silo_id)


def _servicer(job: InProcessJob, runner: JobRunner | None) -> tuple[FleetServicer, FakeJobs]:
    jobs = FakeJobs(runner)
    servicer = FleetServicer(
        jobs=jobs,  # type: ignore[arg-type]
        registry=job.registry,
        heartbeat_interval_s=2.5,
        insecure=True,
    )
    return servicer, jobs


def _pulled(servicer: FleetServicer, silo: str = "a") -> TaskRecord:
    reply = servicer.PullTask(
        fleet_pb2.PullTaskRequest(wait_ms=int(WAIT_S * 1000)), FakeContext(silo)
    )
    pulled = serde.pull_reply_from_pb(reply)
    assert pulled.phase is FleetPhase.FEDERATING and pulled.task is not None
    return pulled.task  # type: ignore[return-value]


def test_register_takes_the_identity_from_the_caller_not_the_request(job: InProcessJob) -> None:
    servicer, jobs = _servicer(job, None)
    request = fleet_pb2.RegisterRequest(
        agent_version="9.9", device="cpu", num_train_examples=77, num_eval_examples=7
    )
    ack = serde.register_ack_from_pb(servicer.Register(request, FakeContext("c")))
    assert (ack.silo_id, ack.heartbeat_interval_s) == ("c", 2.5)
    assert jobs.registered == ["c"]
    (silo,) = [s for s in job.registry.snapshot() if s.silo_id == "c"]
    assert silo.num_train_examples == 77 and silo.agent_version == "9.9"
    with pytest.raises(Aborted) as refused:
        servicer.Register(request, FakeContext("root", role="admin"))
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED


def test_pull_without_a_job_says_so(job: InProcessJob) -> None:
    servicer, _ = _servicer(job, None)
    reply = serde.pull_reply_from_pb(servicer.PullTask(fleet_pb2.PullTaskRequest(), FakeContext()))
    assert (reply.phase, reply.task, reply.retry_after_s) == (FleetPhase.NO_JOB, None, 1.0)


def test_a_pulled_task_carries_the_strategy_settings(job: InProcessJob) -> None:
    runner = job.start(tiny_spec(strategy={"name": "fedprox", "proximal_mu": 0.3}))
    servicer, _ = _servicer(job, runner)
    task = _pulled(servicer)
    assert task.kind is TaskKind.TRAIN and task.job_id == runner.job_id
    assert task.local.proximal_mu == 0.3 and task.local.learning_rate == 0.05


def test_a_decline_reaches_the_job_verbatim_and_is_counted_by_kind(job: InProcessJob) -> None:
    runner = job.start(tiny_spec(min_silos=2))
    servicer, _ = _servicer(job, runner)
    task = _pulled(servicer, "b")
    reason = "privacy budget spent: epsilon 8.13 would exceed 8.0"
    request = fleet_pb2.DeclineTaskRequest(task_id=task.task_id, reason=reason, kind="bogus")
    servicer.DeclineTask(request, FakeContext("b"))
    summary = runner.state.silos["b"]
    assert (summary.tasks_declined, summary.last_decline_reason) == (1, reason)
    assert summary.last_decline_kind == "other"  # a kind the coordinator does not know
    assert (
        job.metrics.registry.get_sample_value("gptfl_tasks_declined_total", {"kind": "other"}) == 1
    )
    with pytest.raises(Aborted) as empty:
        servicer.DeclineTask(fleet_pb2.DeclineTaskRequest(task_id=task.task_id), FakeContext("b"))
    assert empty.value.code is grpc.StatusCode.INVALID_ARGUMENT


def _upload_parts(header: UpdateHeader, weights: Any) -> Iterator[serde.UploadPart]:
    manifest = build_manifest(weights)
    yield fleet_pb2.UploadPart(header=serde.update_header_to_pb(header))
    yield fleet_pb2.UploadPart(manifest=serde.manifest_to_pb(manifest))
    yield from iter_chunks(weights, manifest)


@pytest.mark.parametrize(
    ("metrics", "seconds"), [({"loss": math.inf}, 0.1), ({"loss": math.nan}, 0.1), ({}, -1.0)]
)
def test_non_finite_training_figures_are_refused_before_the_weights(
    job: InProcessJob, metrics: dict[str, float], seconds: float
) -> None:
    runner = job.start(tiny_spec())
    servicer, _ = _servicer(job, runner)
    task = _pulled(servicer)
    before = runner.global_model
    weights = job.download(runner, "a", task)  # type: ignore[arg-type]
    header = UpdateHeader(task.task_id, task.round, 10, metrics, seconds)
    with pytest.raises(Aborted) as refused:
        list(servicer.UploadUpdate(_upload_parts(header, weights), FakeContext()))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert job.rejected("non_finite") == 1
    assert runner.global_model is before
    # the task is still open: a correct upload of the same update is taken
    good = UpdateHeader(task.task_id, task.round, 10, {"loss": 0.5}, 0.1)
    replies = list(servicer.UploadUpdate(_upload_parts(good, weights), FakeContext()))
    assert [r.ready for r in replies] == [True, False]
    assert serde.upload_result_from_pb(replies[-1]).accepted


def test_an_upload_must_start_with_its_header(job: InProcessJob) -> None:
    runner = job.start(tiny_spec())
    servicer, _ = _servicer(job, runner)
    _pulled(servicer)
    parts = iter([fleet_pb2.UploadPart(manifest=serde.manifest_to_pb(build_manifest({})))])
    with pytest.raises(Aborted) as refused:
        list(servicer.UploadUpdate(parts, FakeContext()))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in refused.value.details


def test_evaluation_reports_are_checked(job: InProcessJob) -> None:
    runner = job.start(tiny_spec(evaluation={"federated": True}))
    servicer, _ = _servicer(job, runner)
    task = _pulled(servicer)
    weights = job.download(runner, "a", task)  # type: ignore[arg-type]
    job.upload(runner, "a", task, weights, 10)  # type: ignore[arg-type]
    for other in ("b", "c"):
        declined = job.pull(runner, other, TaskKind.TRAIN)
        runner.intake.decline(other, Decline(declined.task_id, "busy"))
    evaluate = job.pull(runner, "a", TaskKind.EVALUATE)
    for metrics in ({"loss": 1.0}, {"loss": 1.0, "accuracy": math.nan}):
        report = fleet_pb2.EvaluationReport(
            task_id=evaluate.task_id,
            round=1,
            num_examples=5,
            metrics=serde.metrics_to_pb(metrics),
        )
        with pytest.raises(Aborted) as refused:
            servicer.ReportEvaluation(report, FakeContext())
        assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    runner.request_stop("test over")


def test_a_retried_decline_or_report_is_answered_as_done(job: InProcessJob) -> None:
    """gRPC retries DeclineTask and ReportEvaluation; when the first attempt arrived and
    only its reply was lost, the retry must not be refused or counted twice."""
    runner = job.start(tiny_spec(evaluation={"federated": True}))
    servicer, _ = _servicer(job, runner)
    task = _pulled(servicer)
    weights = job.download(runner, "a", task)  # type: ignore[arg-type]
    job.upload(runner, "a", task, weights, 10)  # type: ignore[arg-type]
    for other in ("b", "c"):
        declined = job.pull(runner, other, TaskKind.TRAIN)
        request = fleet_pb2.DeclineTaskRequest(task_id=declined.task_id, reason="busy")
        servicer.DeclineTask(request, FakeContext(other))
        servicer.DeclineTask(request, FakeContext(other))  # the retry
    assert runner.state.silos["b"].tasks_declined == 1
    evaluate = job.pull(runner, "a", TaskKind.EVALUATE)
    report = fleet_pb2.EvaluationReport(
        task_id=evaluate.task_id,
        round=1,
        num_examples=5,
        metrics=serde.metrics_to_pb({"loss": 0.5, "accuracy": 0.8}),
    )
    servicer.ReportEvaluation(report, FakeContext())
    servicer.ReportEvaluation(report, FakeContext())  # the retry
    runner.join(WAIT_S)
    (record,) = runner.state.rounds
    assert record.federated_examples == 5 and record.updates_rejected == 0
    assert sum(job.rejected(r) for r in ("duplicate", "stale_task")) == 0
    # a decline of the *training* task the silo completed is still refused
    with pytest.raises(Aborted) as refused:
        servicer.DeclineTask(
            fleet_pb2.DeclineTaskRequest(task_id=task.task_id, reason="late"), FakeContext()
        )
    assert refused.value.code is grpc.StatusCode.ALREADY_EXISTS
