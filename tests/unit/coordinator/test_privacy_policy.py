"""The privacy spend silos report: recorded per silo, held to require_dp, reset ledgers
flagged."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coordinator.job_runner import JobRunner
from coordinator.job_state import Phase
from coordinator.tasks import ModelVersion
from gptfl.errors import PrivacyPolicyError
from gptfl.fleet_messages import PrivacySpend
from gptfl.task import TaskKind
from tests.unit.coordinator.in_process_job import WAIT_S, InProcessJob, initial_weights, tiny_spec

REQUIRE = {"max_epsilon": 8.0, "max_delta": 1e-5}


def _round(
    job: InProcessJob, runner: JobRunner, spends: dict[str, PrivacySpend | None]
) -> dict[str, Exception | None]:
    """One round: each silo uploads once with its spend; returns what each upload raised."""
    tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in ("a", "b", "c")}
    base = job.download(runner, "a", tasks["a"])
    outcome: dict[str, Exception | None] = {}
    for silo, task in tasks.items():
        try:
            job.upload(runner, silo, task, base, 10, privacy=spends.get(silo))
            outcome[silo] = None
        except PrivacyPolicyError as exc:
            outcome[silo] = exc
    return outcome


def _spend(epsilon: float, delta: float = 1e-5) -> PrivacySpend:
    return PrivacySpend(epsilon, delta, "rdp")


def test_spend_is_recorded_per_silo_in_state_summary_and_metrics(job: InProcessJob) -> None:
    runner = job.start(tiny_spec())
    assert _round(job, runner, {"a": _spend(1.5), "b": _spend(2.5)}) == dict.fromkeys("abc")
    runner.join(WAIT_S)
    assert runner.state.phase is Phase.FINISHED
    assert (runner.state.silos["a"].privacy_epsilon, runner.state.silos["c"].privacy_epsilon) == (
        1.5,
        None,
    )
    summary = json.loads((job.tmp / "runs" / runner.job_id / "summary.json").read_text())
    assert summary["silos"]["b"]["privacy"] == {"epsilon": 2.5, "delta": 1e-5, "accountant": "rdp"}
    assert summary["silos"]["c"]["privacy"] is None
    gauge = job.metrics.registry.get_sample_value("gptfl_silo_privacy_epsilon", {"silo": "b"})
    assert gauge == 2.5


def test_each_round_keeps_the_epsilon_each_silo_reported_with_it(job: InProcessJob) -> None:
    """A DP silo sends no training loss: the round's loss is the others' alone."""
    runner = job.start(tiny_spec())
    tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in ("a", "b", "c")}
    base = job.download(runner, "a", tasks["a"])
    job.upload(runner, "a", tasks["a"], base, 10, loss=None, privacy=_spend(1.5))
    job.upload(runner, "b", tasks["b"], base, 30, loss=None, privacy=_spend(2.5))
    job.upload(runner, "c", tasks["c"], base, 20, loss=2.0)
    runner.join(WAIT_S)
    (record,) = runner.state.rounds
    assert record.silo_epsilon == {"a": 1.5, "b": 2.5}
    assert record.train_loss == 2.0
    summary = json.loads((job.tmp / "runs" / runner.job_id / "summary.json").read_text())
    assert summary["rounds"][0]["silo_epsilon"] == {"a": 1.5, "b": 2.5}


@pytest.mark.parametrize(
    ("spend", "message"),
    [
        (None, "reports none"),
        (_spend(8.5), "at most epsilon 8"),
        (_spend(1.0, delta=1e-3), "delta 1e-05"),
    ],
)
def test_require_dp_refuses_updates_without_dp_or_over_budget(
    job: InProcessJob, spend: PrivacySpend | None, message: str
) -> None:
    runner = job.start(tiny_spec(require_dp=REQUIRE))
    outcome = _round(job, runner, {"a": _spend(2.0), "b": _spend(3.0), "c": spend})
    assert outcome["a"] is None and outcome["b"] is None
    assert isinstance(outcome["c"], PrivacyPolicyError) and message in str(outcome["c"])
    assert job.rejected("privacy") == 1
    # the refusal touched nothing: the round (still waiting for c) runs on the initial model
    assert runner.global_model is not None
    initial = ModelVersion.of(initial_weights()).manifest.digest
    assert runner.global_model.manifest.digest == initial
    runner.request_stop("test over")


def _two_rounds(job: InProcessJob, **spec: Any) -> tuple[JobRunner, dict[str, Exception | None]]:
    runner = job.start(tiny_spec(rounds=2, round_deadline_s=5, **spec))
    _round(job, runner, {"a": _spend(4.0), "b": _spend(4.0), "c": _spend(4.0)})
    second = _round(job, runner, {"a": _spend(5.0), "b": _spend(5.0), "c": _spend(0.3)})
    runner.join(WAIT_S)
    return runner, second


def test_an_epsilon_that_went_down_is_flagged(job: InProcessJob) -> None:
    runner, second = _two_rounds(job)
    assert second == dict.fromkeys("abc")  # without require_dp the update still counts
    flag = runner.state.silos["c"].privacy_flag
    assert "fell from 4 to 0.3 at round 2" in flag
    assert not runner.state.silos["a"].privacy_flag
    summary = json.loads((job.tmp / "runs" / runner.job_id / "summary.json").read_text())
    assert summary["silos"]["c"]["privacy_flag"] == flag


def test_with_require_dp_a_reset_ledger_is_refused(job: InProcessJob) -> None:
    runner, second = _two_rounds(job, require_dp=REQUIRE)
    assert isinstance(second["c"], PrivacyPolicyError) and "fell from 4" in str(second["c"])
    assert runner.state.silos["c"].privacy_epsilon == 4.0  # the refused report is not kept
