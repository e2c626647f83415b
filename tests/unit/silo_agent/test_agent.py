"""A real SiloAgent driven in-process by a fake coordinator (no gRPC): tasks, declines, stop.

The fake is handed to the agent through its ``connect`` seam; it answers PullTask from a
script, records every call, and says the job finished once the script runs out, so an agent
with ``exit_after_job`` returns. Every agent runs on a thread the fixture stops and joins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch

from gptfl.errors import TaskRefused, ValidationError
from gptfl.fleet_messages import (
    Decline,
    EvaluationReport,
    FleetPhase,
    PrivacySpend,
    PullReply,
    RegisterAck,
    Registration,
    UpdateHeader,
    UploadResult,
)
from gptfl.models import ModelSpec, build_model
from gptfl.models.fingerprint import ModelFingerprint
from gptfl.task import LocalSettings, TaskKind, TaskSpec
from gptfl.training import train_local
from gptfl.weights import WeightMap, build_manifest
from silo_agent.agent import SiloAgent
from silo_agent.config import SiloConfig
from silo_agent.fleet_client import FleetApi
from silo_agent.metrics import SiloMetrics
from silo_agent.trainer import SgdTrainer, TrainingOutcome, TrainingRun
from tests.rpc_fakes import FakeRpcError

SPEC = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)
LOCAL = LocalSettings(epochs=1, batch_size=64, learning_rate=0.05, momentum=0.9, seed=3)
JOB = "job-1"
WAIT = 30.0  # bounds waits for things that happen at once; never reached when all is well
CPU = torch.device("cpu")


def _global_weights() -> WeightMap:
    return {k: v.detach().clone() for k, v in build_model(SPEC, seed=0).state_dict().items()}


GLOBAL = _global_weights()
GLOBAL_SHA = build_manifest(GLOBAL).digest


def _task(task_id: str, kind: TaskKind = TaskKind.TRAIN, round_: int = 1) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        job_id=JOB,
        round=round_,
        kind=kind,
        model_spec=SPEC,
        model_digest=GLOBAL_SHA,
        local=LOCAL,
        deadline_unix=time.time() + 3600,
    )


def _offer(task: TaskSpec) -> PullReply:
    return PullReply(phase=FleetPhase.FEDERATING, job_id=JOB, task=task, retry_after_s=0.0)


@dataclass
class Upload:
    header: UpdateHeader
    weights: WeightMap


@dataclass
class FakeFleet:
    """The coordinator's side of :class:`FleetApi`, in process, for one agent.

    ``pulls`` are answered (or raised) in order; after them the job has finished (and the
    agent, with ``exit_after_job``, exits), unless ``then`` says otherwise.
    ``upload_failures`` are raised by the first uploads, one each.
    """

    pulls: deque[PullReply | Exception] = field(default_factory=deque)
    then: PullReply = field(
        default_factory=lambda: PullReply(FleetPhase.FINISHED, JOB, None, retry_after_s=0.05)
    )
    upload_failures: list[grpc.StatusCode] = field(default_factory=list)
    registrations: list[Registration] = field(default_factory=list)
    heartbeats: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    reports: list[EvaluationReport] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    connections_open: int = 0
    registered: threading.Event = field(default_factory=threading.Event)
    beaten: threading.Event = field(default_factory=threading.Event)

    @contextlib.contextmanager
    def connect(self) -> Iterator[FleetApi]:
        self.connections_open += 1
        try:
            yield self
        finally:
            self.connections_open -= 1

    def register(
        self,
        *,
        agent_version: str,
        device: str,
        num_train: int,
        num_eval: int,
        models: Iterable[ModelFingerprint] = (),
    ) -> RegisterAck:
        self.registrations.append(
            Registration(agent_version, device, num_train, num_eval, tuple(models))
        )
        self.registered.set()
        return RegisterAck(silo_id="silo-a", heartbeat_interval_s=0.5, coordinator_version="t")

    def heartbeat(self, state: str) -> None:
        self.heartbeats.append(state)
        self.beaten.set()

    def pull_task(self, wait_s: float) -> PullReply:
        reply = self.pulls.popleft() if self.pulls else self.then
        if isinstance(reply, Exception):
            raise reply
        return reply

    def download_model(self, task: TaskSpec, *, expected: Mapping[str, torch.Tensor]) -> WeightMap:
        assert task.model_digest == GLOBAL_SHA
        assert {k: v.shape for k, v in expected.items()} == {k: v.shape for k, v in GLOBAL.items()}
        self.downloads.append(task.task_id)
        return {k: v.clone() for k, v in GLOBAL.items()}

    def upload_update(
        self,
        task: TaskSpec,
        weights: Mapping[str, torch.Tensor],
        *,
        num_examples: int,
        metrics: Mapping[str, float],
        train_seconds: float,
        privacy: PrivacySpend | None = None,
    ) -> tuple[UploadResult, int]:
        if self.upload_failures:
            raise FakeRpcError(self.upload_failures.pop(0))
        header = UpdateHeader(
            task.task_id, task.round, num_examples, dict(metrics), train_seconds, privacy
        )
        header.check()  # what the coordinator checks before it takes the weights
        self.uploads.append(Upload(header, {k: v.clone() for k, v in weights.items()}))
        return UploadResult(accepted=True, message="ok"), build_manifest(weights).total_bytes

    def report_evaluation(self, report: EvaluationReport) -> None:
        self.reports.append(report)

    def decline(self, decline: Decline) -> None:
        self.declines.append(decline)


def _config(*, eval_fraction: float = 0.1, **extra: Any) -> SiloConfig:
    return SiloConfig.model_validate(
        {
            "coordinator": "127.0.0.1:1",  # never dialled: the fake is the connection
            "insecure": True,
            "silo_id": "silo-a",
            "device": "cpu",
            "exit_after_job": True,
            "data": {"train": {"kind": "sklearn-digits"}, "eval_fraction": eval_fraction},
            **extra,
        }
    )


class Agents:
    """Starts agents on threads; the fixture stops and joins every one of them."""

    def __init__(self) -> None:
        self.running: list[tuple[threading.Thread, threading.Event]] = []

    def start(self, agent: SiloAgent) -> tuple[threading.Thread, threading.Event, list[int]]:
        stop = threading.Event()
        code: list[int] = []
        thread = threading.Thread(target=lambda: code.append(agent.run(stop)), daemon=True)
        self.running.append((thread, stop))
        thread.start()
        return thread, stop, code

    def run(self, agent: SiloAgent) -> int:
        """Runs ``agent`` until it exits by itself (the job is over); its exit code."""
        thread, _, code = self.start(agent)
        thread.join(WAIT)
        assert not thread.is_alive(), "the agent did not exit once the job was over"
        return code[0]


@pytest.fixture()
def agents() -> Iterator[Agents]:
    a = Agents()
    yield a
    for thread, stop in a.running:  # never leave an agent behind, even when a test fails
        stop.set()
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread, _ in a.running)


def _agent(fleet: FakeFleet, **kwargs: Any) -> SiloAgent:
    config = kwargs.pop("config", None) or _config()
    return SiloAgent(config, connect=fleet.connect, metrics=SiloMetrics.create(), **kwargs)


def _tasks(agent: SiloAgent, kind: str, outcome: str) -> float:
    value = agent.metrics.registry.get_sample_value(
        "gptfl_silo_tasks_total", {"kind": kind, "outcome": outcome}
    )
    return value or 0.0


# ---- tests ---------------------------------------------------------------------------------


def test_a_train_task_is_trained_with_its_settings_and_uploaded(agents: Agents) -> None:
    fleet = FakeFleet(pulls=deque([_offer(_task("t1")), _offer(_task("e1", TaskKind.EVALUATE))]))
    agent = _agent(fleet)
    assert agents.run(agent) == 0
    num_train, num_eval = agent.data.counts()
    assert num_train > 1000 and num_eval > 100
    # once, at connect, with the counts the task then trained on (counted at start)
    assert [(r.num_train_examples, r.num_eval_examples) for r in fleet.registrations] == [
        (num_train, num_eval),
    ]
    assert fleet.registrations[0].device == "cpu"
    assert fleet.downloads == ["t1"]  # the evaluation reuses the cached global model
    assert fleet.connections_open == 0

    (upload,) = fleet.uploads
    assert upload.header.task_id == "t1" and upload.header.round == 1
    assert upload.header.num_examples == num_train
    assert set(upload.header.train_metrics) == {"loss", "accuracy"}
    assert 0.0 < upload.header.train_metrics["loss"] < 3.0
    assert 0.0 < upload.header.train_metrics["accuracy"] <= 1.0
    assert math.isfinite(upload.header.train_seconds)  # reported, whatever it took
    assert upload.header.privacy is None  # plain SGD: no DP
    # exactly what local SGD with the task's settings makes of the global model
    reference = build_model(SPEC)
    reference.load_state_dict(GLOBAL)
    result = train_local(reference, agent.data.for_model(SPEC).train, LOCAL, device=CPU)
    assert upload.header.train_metrics == {"loss": result.loss, "accuracy": result.accuracy}
    assert list(upload.weights) == list(GLOBAL)
    assert all(torch.equal(upload.weights[k], v) for k, v in reference.state_dict().items())
    assert not all(torch.equal(upload.weights[k], GLOBAL[k]) for k in GLOBAL)

    (report,) = fleet.reports
    assert (report.task_id, report.round, report.num_examples) == ("e1", 1, num_eval)
    assert set(report.metrics) == {"loss", "accuracy"}
    assert fleet.declines == []
    assert _tasks(agent, "train", "done") == 1 and _tasks(agent, "evaluate", "done") == 1
    assert agent.tasks_completed == 2


class _Refusing(SgdTrainer):
    """Refuses at ``check`` (before the download) or at ``train``; counts what it was given."""

    def __init__(self, error: Exception, *, at: str) -> None:
        self.error, self.at = error, at
        self.trained = 0

    def check(self, task: TaskSpec, *, num_examples: int) -> None:
        if self.at == "check":
            raise self.error

    def train(self, run: TrainingRun) -> TrainingOutcome:
        self.trained += 1
        if self.at == "train":
            raise self.error
        return super().train(run)


@pytest.mark.parametrize("at", ["check", "train"])
def test_a_refusal_reaches_the_coordinator_verbatim_with_its_kind(agents: Agents, at: str) -> None:
    fleet = FakeFleet(pulls=deque([_offer(_task("t1"))]))
    trainer = _Refusing(TaskRefused("budget spent: eps 8.1 > 8", kind="privacy_budget"), at=at)
    agent = _agent(fleet, trainer=trainer)
    assert agents.run(agent) == 0
    assert fleet.declines == [
        Decline(task_id="t1", reason="budget spent: eps 8.1 > 8", kind="privacy_budget")
    ]
    assert fleet.uploads == []
    # a refusal at check comes before the model is downloaded (or the trainer called)
    assert fleet.downloads == ([] if at == "check" else ["t1"])
    assert trainer.trained == (0 if at == "check" else 1)
    assert _tasks(agent, "train", "declined") == 1
    assert _tasks(agent, "train", "done") == 0 and agent.tasks_completed == 0


def test_a_local_error_is_declined_as_failed_without_its_details(agents: Agents) -> None:
    fleet = FakeFleet(pulls=deque([_offer(_task("t1")), _offer(_task("t2", round_=2))]))
    trainer = _Refusing(RuntimeError("cannot read /secret/silo/path.npz"), at="train")
    agent = _agent(fleet, trainer=trainer)
    assert agents.run(agent) == 0
    reason = "the silo could not run this task (RuntimeError); details are in the silo's log"
    assert fleet.declines == [
        Decline(task_id="t1", reason=reason, kind="failed"),
        Decline(task_id="t2", reason=reason, kind="failed"),
    ]
    assert _tasks(agent, "train", "failed") == 2


def test_an_evaluation_without_evaluation_data_is_declined_as_no_data(agents: Agents) -> None:
    fleet = FakeFleet(pulls=deque([_offer(_task("e1", TaskKind.EVALUATE))]))
    agent = _agent(fleet, config=_config(eval_fraction=0.0))
    assert agents.run(agent) == 0
    assert fleet.declines == [
        Decline(
            task_id="e1",
            reason="this silo holds no evaluation data (eval_fraction is 0)",
            kind="no_data",
        )
    ]
    assert fleet.reports == [] and fleet.downloads == []
    assert _tasks(agent, "evaluate", "declined") == 1 and agent.tasks_completed == 0


class _Recording(SgdTrainer):
    """Plain SGD that keeps every run it was given, and the weights each model started from."""

    def __init__(self) -> None:
        self.runs: list[TrainingRun] = []
        self.started_from: list[WeightMap] = []

    def train(self, run: TrainingRun) -> TrainingOutcome:
        self.runs.append(run)
        self.started_from.append({k: v.clone() for k, v in run.model.state_dict().items()})
        return super().train(run)


def test_every_task_gets_a_fresh_model_holding_the_global_weights(agents: Agents) -> None:
    fleet = FakeFleet(
        pulls=deque([_offer(_task(f"t{n}", round_=n)) for n in (1, 2, 3)]),
    )
    trainer = _Recording()
    agent = _agent(fleet, trainer=trainer)
    assert agents.run(agent) == 0
    models = [run.model for run in trainer.runs]
    assert len(models) == 3 and len({id(m) for m in models}) == 3  # all alive: ids are unique
    assert fleet.downloads == ["t1"]  # the global weights are cached by digest; models are not
    for start in trainer.started_from:  # training one model never touched the next one's start
        assert all(torch.equal(start[k], GLOBAL[k]) for k in GLOBAL)
    assert all(run.global_weights is trainer.runs[0].global_weights for run in trainer.runs)
    assert [u.header.task_id for u in fleet.uploads] == ["t1", "t2", "t3"]


class _Spending(SgdTrainer):
    """Plain SGD that reports a privacy spend, as a DP trainer does."""

    def train(self, run: TrainingRun) -> TrainingOutcome:
        outcome = super().train(run)
        return dataclasses.replace(outcome, privacy=PrivacySpend(1.5, 1e-5, "rdp"))


def test_a_trainers_privacy_spend_travels_in_the_update_header(agents: Agents) -> None:
    fleet = FakeFleet(pulls=deque([_offer(_task("t1"))]))
    assert agents.run(_agent(fleet, trainer=_Spending())) == 0
    (upload,) = fleet.uploads
    assert upload.header.privacy == PrivacySpend(epsilon=1.5, delta=1e-5, accountant="rdp")


@pytest.mark.parametrize(
    ("failures", "uploads", "outcome"),
    [
        ([grpc.StatusCode.DATA_LOSS], 1, "done"),  # damaged on the way: sent again
        ([grpc.StatusCode.FAILED_PRECONDITION], 0, "rejected"),  # refused: not sent again
    ],
)
def test_an_upload_is_sent_again_only_when_the_failure_allows(
    agents: Agents, failures: list[grpc.StatusCode], uploads: int, outcome: str
) -> None:
    fleet = FakeFleet(pulls=deque([_offer(_task("t1"))]), upload_failures=list(failures))
    agent = _agent(fleet)
    assert agents.run(agent) == 0
    assert len(fleet.uploads) == uploads and fleet.upload_failures == []
    assert _tasks(agent, "train", outcome) == 1
    assert fleet.declines == []


def test_stop_ends_run_and_its_heartbeat_thread(agents: Agents) -> None:
    # no job: the coordinator asks the silo to come back in an hour
    fleet = FakeFleet(then=PullReply(FleetPhase.NO_JOB, "", None, retry_after_s=3600.0))
    agent = _agent(fleet)
    before = set(threading.enumerate())
    thread, stop, code = agents.start(agent)
    assert fleet.registered.wait(WAIT)
    assert fleet.beaten.wait(WAIT)  # the heartbeat thread is running
    assert fleet.heartbeats[0] == "idle"
    stop.set()
    thread.join(WAIT)
    assert not thread.is_alive() and code == [0]
    assert set(threading.enumerate()) - before == set()  # the heartbeat thread was joined
    assert fleet.connections_open == 0


def test_a_reply_the_silo_cannot_read_is_survived(agents: Agents) -> None:
    """What FleetClient raises for a task or phase it cannot read (a newer coordinator):
    the agent connects again and takes the next task."""
    unreadable = ValidationError("the coordinator reported an unknown job phase 9")
    fleet = FakeFleet(pulls=deque([unreadable, _offer(_task("t1"))]))
    config = _config(reconnect={"initial_backoff_s": 0.01, "max_backoff_s": 0.02})
    assert agents.run(_agent(fleet, config=config)) == 0
    assert len(fleet.registrations) >= 2  # a new session after the unreadable reply
    assert [u.header.task_id for u in fleet.uploads] == ["t1"]


def test_unreachable_coordinator_is_retried_until_stopped(agents: Agents) -> None:
    """A connection whose Register fails UNAVAILABLE is closed and tried again; a stop
    during the backoff ends the agent (with 0, not as a refusal)."""
    attempts = threading.Event()
    opened: list[int] = []

    @contextlib.contextmanager
    def unreachable() -> Iterator[FleetApi]:
        opened.append(1)
        if len(opened) >= 2:
            attempts.set()
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
        yield  # pragma: no cover

    config = _config(reconnect={"initial_backoff_s": 0.01, "max_backoff_s": 0.02})
    agent = SiloAgent(config, connect=unreachable)
    thread, stop, code = agents.start(agent)
    assert attempts.wait(WAIT)
    stop.set()
    thread.join(WAIT)
    assert not thread.is_alive() and code == [0]
