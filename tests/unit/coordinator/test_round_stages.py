"""Rounds as plans of stages: every stage through one StageRunner, with its own deadline."""

from __future__ import annotations

from coordinator.job_runner import JobRunner
from coordinator.job_state import Phase
from coordinator.round_fold import RoundFold
from coordinator.round_plan import RoundPlan, RoundSetup
from coordinator.round_stages import Stage, StageResult, StageRunner
from coordinator.tasks import TaskStatus
from gptfl.fleet_messages import Decline, EvaluationReport
from gptfl.task import TaskKind
from gptfl.weights import WeightMap
from tests.unit.coordinator.in_process_job import WAIT_S, InProcessJob, tiny_spec

REPORT = {"loss": 0.5, "accuracy": 0.5}
CONFIRM_DEADLINE_S = 0.5


class AnnounceTrainConfirm(RoundPlan):
    """A made-up three-stage round, shaped like secure aggregation's: silos announce
    themselves, those that did train, those that trained confirm (briefly)."""

    def __init__(self, setup: RoundSetup, fold: RoundFold) -> None:
        super().__init__(fold)
        self.setup = setup
        self.results: list[StageResult] = []

    def gather(self, stages: StageRunner) -> StageResult:
        announce = stages.run(Stage("announce", TaskKind.EVALUATE, self.setup.silos, WAIT_S))
        train = stages.run(
            Stage("train", TaskKind.TRAIN, tuple(announce.done), self.setup.deadline_s)
        )
        confirm = stages.run(
            Stage("confirm", TaskKind.EVALUATE, tuple(train.done), CONFIRM_DEADLINE_S)
        )
        self.results = [announce, train, confirm]
        return train


def _report(job: InProcessJob, runner: JobRunner, silo: str) -> None:
    task = job.pull(runner, silo, TaskKind.EVALUATE)
    runner.intake.receive_evaluation(
        silo, EvaluationReport(task.task_id, task.round, 10, dict(REPORT))
    )


def _shifted(weights: WeightMap, by: float) -> WeightMap:
    return {k: v + by if v.is_floating_point() else v for k, v in weights.items()}


def test_a_three_stage_round_runs_through_the_stage_machinery(job: InProcessJob) -> None:
    plans: list[AnnounceTrainConfirm] = []

    def planner(setup: RoundSetup, fold: RoundFold) -> RoundPlan:
        plans.append(AnnounceTrainConfirm(setup, fold))
        return plans[-1]

    runner = job.start(tiny_spec(), round_planner=planner)
    # stage 1: a and c announce, b declines and so takes no further part
    _report(job, runner, "a")
    declined = job.pull(runner, "b", TaskKind.EVALUATE)
    runner.intake.decline("b", Decline(declined.task_id, "not today", kind="refused"))
    _report(job, runner, "c")
    # stage 2: only a and c are asked to train; their uploads fold into the plan's fold
    ta = job.pull(runner, "a", TaskKind.TRAIN)
    tc = job.pull(runner, "c", TaskKind.TRAIN)
    assert runner.pull_task("b", 0.2) is None
    base = job.download(runner, "a", ta)
    job.upload(runner, "a", ta, _shifted(base, 1.0), 30)
    job.upload(runner, "c", tc, _shifted(base, 3.0), 10)
    # stage 3: a confirms, c pulls its task and never answers: it expires at the stage's
    # own short deadline, not the round's
    _report(job, runner, "a")
    job.pull(runner, "c", TaskKind.EVALUATE)
    runner.join(WAIT_S)
    assert runner.state.phase is Phase.FINISHED, runner.state.message

    (plan,) = plans
    announce, train, confirm = plan.results
    assert [s.stage.name for s in plan.results] == ["announce", "train", "confirm"]
    assert {t.silo_id: t.status for t in announce.tasks} == {
        "a": TaskStatus.DONE,
        "b": TaskStatus.DECLINED,
        "c": TaskStatus.DONE,
    }
    assert [t.silo_id for t in train.tasks] == ["a", "c"] and train.done == ["a", "c"]
    assert {t.silo_id: t.status for t in confirm.tasks} == {
        "a": TaskStatus.DONE,
        "c": TaskStatus.EXPIRED,
    }
    assert all(t.round == 1 for s in plan.results for t in s.tasks)
    assert announce.declines == ["b: not today"]
    # the round's model is the fold's weighted mean of the two uploads: base + 1.5
    assert runner.global_model is not None
    for name, value in runner.global_model.weights.items():
        if value.is_floating_point():
            expected = base[name] + (30 * 1.0 + 10 * 3.0) / 40
            assert (value - expected).abs().max().item() < 1e-5, name
    (record,) = runner.state.rounds
    assert (record.silos_selected, record.updates_accepted, record.examples) == (2, 2, 40)


def test_the_plain_round_is_train_then_evaluate(job: InProcessJob) -> None:
    runner = job.start(tiny_spec(evaluation={"federated": True}, min_silos=3))
    tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in ("a", "b", "c")}
    base = job.download(runner, "a", tasks["a"])
    for silo, task in tasks.items():
        job.upload(runner, silo, task, base, 10)
    for silo in ("a", "b", "c"):
        _report(job, runner, silo)
    runner.join(WAIT_S)
    assert runner.state.phase is Phase.FINISHED, runner.state.message
    (record,) = runner.state.rounds
    assert record.federated_examples == 30
    assert record.federated_accuracy == REPORT["accuracy"]
