"""Rounds against hostile or broken silos, in process: arrival order, weight caps, norm
bounds, refused tasks and rounds whose new model is not finite."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from coordinator.job_runner import JobRunner
from coordinator.job_state import Phase
from coordinator.tasks import TaskStatus
from gptfl.errors import NonFiniteError, StaleTaskError, UpdateNormError
from gptfl.task import TaskKind
from gptfl.weights import WeightMap
from tests.unit.coordinator.in_process_job import WAIT_S, InProcessJob, tiny_spec


def _shifted(weights: WeightMap, shift: float, *, scale: float = 1.0) -> WeightMap:
    return {
        k: (v * scale + shift) if v.is_floating_point() else v.clone() for k, v in weights.items()
    }


def _norm(a: WeightMap, b: WeightMap) -> float:
    return math.sqrt(
        sum(
            float((a[k].double() - b[k].double()).square().sum())
            for k in a
            if a[k].is_floating_point()
        )
    )


def _sha(runner: JobRunner) -> str:
    assert runner.global_model is not None
    return runner.global_model.manifest.digest


def _finished(runner: JobRunner, phase: Phase = Phase.FINISHED) -> None:
    runner.join(WAIT_S)
    assert not runner.is_running
    assert runner.state.phase is phase, runner.state.message


def test_any_arrival_order_of_the_same_updates_gives_the_same_model(job: InProcessJob) -> None:
    spec = tiny_spec(update_bounds={"max_norm": 20.0, "action": "clip"})
    updates = {"a": (1e-3, 1.0, 7), "b": (0.37, 3.0, 900), "c": (-2.5, 0.5, 41)}
    digests = set()
    clipped = set()
    for order in itertools.permutations(updates):
        runner = job.start(spec)
        tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in order}
        base = job.download(runner, "a", tasks["a"])
        for silo in order:
            shift, scale, n = updates[silo]
            job.upload(runner, silo, tasks[silo], _shifted(base, shift, scale=scale), n)
        _finished(runner)
        digests.add(_sha(runner))
        clipped.add(runner.state.rounds[0].updates_clipped)
    assert len(digests) == 1
    assert clipped == {2}  # b's and c's updates lie beyond the bound: clipped in every order


def test_a_silos_weight_is_capped_at_its_share_of_the_expected_total(job: InProcessJob) -> None:
    for silo, count in (("a", 10**6), ("b", 100), ("c", 100)):
        job.registry.register(
            silo, agent_version="t", device="cpu", num_train_examples=count, num_eval_examples=9
        )
    runner = job.start(tiny_spec(max_weight_fraction=0.5))
    tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in "abc"}
    base = job.download(runner, "a", tasks["a"])
    models = {silo: _shifted(base, shift) for silo, shift in (("a", 1.0), ("b", 0.0), ("c", 0.0))}
    for silo, n in (("a", 10**6), ("b", 100), ("c", 100)):
        job.upload(runner, silo, tasks[silo], models[silo], n)
    _finished(runner)
    # a's weight is 0.5 / (1 - 0.5) * (100 + 100) = 200: half of the round's 400
    assert runner.state.rounds[0].examples == 400
    assert runner.state.silos["a"].examples == 200  # credited with the weight it got
    assert runner.global_model is not None
    for name, value in runner.global_model.weights.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, base[name] + 0.5, rtol=0, atol=1e-6)


def test_a_task_refused_too_often_is_closed_and_the_round_goes_on(job: InProcessJob) -> None:
    runner = job.start(tiny_spec(max_task_rejections=2, round_deadline_s=600))
    tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in "abc"}
    base = job.download(runner, "a", tasks["a"])
    bad = _shifted(base, 0.0)
    next(v for v in bad.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    for _ in range(2):
        with pytest.raises(NonFiniteError):
            job.upload(runner, "a", tasks["a"], bad, 10)
    assert tasks["a"].status is TaskStatus.REJECTED
    with pytest.raises(StaleTaskError, match="rejected"):
        job.upload(runner, "a", tasks["a"], _shifted(base, 1.0), 10)
    job.upload(runner, "b", tasks["b"], _shifted(base, 1.0), 10)
    job.upload(runner, "c", tasks["c"], _shifted(base, 3.0), 10)
    # every task is finished: the round closes now, not at its 600 s deadline
    _finished(runner)
    record = runner.state.rounds[0]
    assert (record.updates_accepted, record.updates_rejected) == (2, 3)
    assert job.rejected("non_finite") == 2


def test_updates_far_beyond_the_median_of_earlier_rounds_are_refused(job: InProcessJob) -> None:
    spec = tiny_spec(rounds=2, update_bounds={"max_norm_vs_median": 3.0, "median_of": 3})
    runner = job.start(spec)
    shifts = {"a": 0.01, "b": 0.02, "c": 0.03}
    tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in "abc"}
    base = job.download(runner, "a", tasks["a"])
    for silo, shift in shifts.items():  # round 1: no history, no bound
        job.upload(runner, silo, tasks[silo], _shifted(base, shift), 10)
    tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in "abc"}
    norms = runner.state.rounds[0].update_norms
    assert len(norms) == 3 and list(norms) == sorted(norms)
    assert norms[1] == pytest.approx(_norm(_shifted(base, 0.02), base), rel=1e-9)
    base = job.download(runner, "a", tasks["a"])
    scaled = _shifted(base, 0.02 * 10)  # ten times the median norm
    with pytest.raises(UpdateNormError, match="3 times the median") as info:
        job.upload(runner, "b", tasks["b"], scaled, 10)
    assert "beyond the round's bound" in str(info.value)
    before = _sha(runner)
    for silo in "abc":
        job.upload(runner, silo, tasks[silo], _shifted(base, shifts[silo]), 10)
    _finished(runner)
    assert _sha(runner) != before
    assert job.rejected("update_norm") == 1


def test_a_non_finite_new_model_is_not_applied_and_fails_the_round(job: InProcessJob) -> None:
    # a server step of 1e38 times the pseudo-gradient overflows float32 to infinity
    spec = tiny_spec(
        rounds=3,
        strategy={"name": "fedavgm", "server_learning_rate": 1e38, "server_momentum": 0.5},
        max_failed_rounds=1,
    )
    runner = job.start(spec)
    for number in (1, 2):
        tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in "abc"}
        assert all(task.round == number for task in tasks.values())
        base = job.download(runner, "a", tasks["a"])
        before = _sha(runner)
        for silo in "abc":
            job.upload(runner, silo, tasks[silo], _shifted(base, 10.0), 10)
    _finished(runner, Phase.FAILED)
    assert _sha(runner) == before  # the model is the initial one: never replaced
    first, second = runner.state.rounds
    assert "non-finite values" in first.failed and second.failed
    assert first.updates_accepted == 3
    assert "2 rounds failed and max_failed_rounds is 1" in runner.state.message
    assert runner._strategy.state_dict() == {}  # the optimizer's step was undone too
    failed = job.metrics.registry.get_sample_value("gptfl_rounds_failed_total")
    assert failed == 2
