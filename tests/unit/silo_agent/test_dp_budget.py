"""The accounting of the DP silo: the plan of a task, the noise for a job, a history's epsilon.

The calibration property is checked against Opacus itself: the noise calibrated for a job,
replayed step by step through a fresh Opacus accountant for every round of the job, ends
within the target epsilon (and not far below it: the noise is not wastefully large).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus import PrivacyEngine
from opacus.accountants import create_accountant

from gptfl.data import ArrayDataset
from gptfl.errors import TaskRefused
from gptfl.models import ModelSpec, build_model
from gptfl.task import LocalSettings
from gptfl.training import make_loader, make_optimizer
from silo_agent.dp_budget import Mechanism, calibrate, compose, epsilon, step_plan

#: get_noise_multiplier's bisection stops within 0.01 of the target; this is the slack
CALIBRATION_SLACK = 0.02


@pytest.fixture(autouse=True)
def _quiet_opacus() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@st.composite
def jobs(draw: st.DrawFn, *, max_examples: int, max_rounds: int, max_epochs: int) -> dict:
    """A silo's data size, a job's rounds and local settings, and a budget for it."""
    n = draw(st.integers(min_value=10, max_value=max_examples))
    batch = draw(st.integers(min_value=1, max_value=n))
    return {
        "n": n,
        "rounds": draw(st.integers(min_value=1, max_value=max_rounds)),
        "local": LocalSettings(
            epochs=draw(st.integers(min_value=1, max_value=max_epochs)),
            batch_size=batch,
            learning_rate=0.1,
        ),
        "target": draw(st.floats(min_value=0.5, max_value=20)),
        "delta": draw(st.floats(min_value=1e-7, max_value=min(1e-3, 0.5 / n))),
    }


def _replayed_job_epsilon(job: dict, accountant: str) -> tuple[float, float]:
    """The calibrated noise, and a fresh Opacus accountant's epsilon after every step of
    every round of the job at that noise, stepped one by one as DPOptimizer does."""
    plan = step_plan(job["n"], job["local"])
    steps = job["rounds"] * plan.steps
    noise = calibrate(
        target_epsilon=job["target"],
        delta=job["delta"],
        sample_rate=plan.sample_rate,
        steps=steps,
        accountant=accountant,
    )
    replay = create_accountant(mechanism=accountant)
    for _ in range(steps):
        replay.step(noise_multiplier=noise, sample_rate=plan.sample_rate)
    return noise, float(replay.get_epsilon(delta=job["delta"]))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs(max_examples=400, max_rounds=30, max_epochs=3))
def test_rdp_calibration_holds_at_the_end_of_the_job(job: dict) -> None:
    noise, spent = _replayed_job_epsilon(job, "rdp")
    assert job["target"] - CALIBRATION_SLACK <= spent <= job["target"], (noise, spent)


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs(max_examples=80, max_rounds=5, max_epochs=2))
def test_prv_calibration_holds_at_the_end_of_the_job(job: dict) -> None:
    """PRV's calibration takes seconds per bisection step, hence few and small jobs."""
    noise, spent = _replayed_job_epsilon(job, "prv")
    assert job["target"] - CALIBRATION_SLACK <= spent <= job["target"], (noise, spent)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_job_round_by_round_spends_what_one_replay_does(accountant: str) -> None:
    """The ledger keeps round after round; composed, it is exactly the planned job."""
    sigma, rate = 1.1, 0.05
    rounds = [Mechanism(sigma, rate, 20)] * 5
    replay = create_accountant(mechanism=accountant)
    for _ in range(100):
        replay.step(noise_multiplier=sigma, sample_rate=rate)
    assert compose(rounds) == (Mechanism(sigma, rate, 100),)
    assert epsilon(rounds, delta=1e-5, accountant=accountant) == replay.get_epsilon(delta=1e-5)
    assert epsilon(rounds[:2], delta=1e-5, accountant=accountant) < epsilon(
        rounds, delta=1e-5, accountant=accountant
    )
    assert epsilon([], delta=1e-5, accountant=accountant) == 0.0


def test_compose_keeps_different_mechanisms_apart() -> None:
    a, b = Mechanism(1.0, 0.1, 3), Mechanism(2.0, 0.1, 4)
    assert compose([a, a, b, Mechanism(2.0, 0.1, 0), b, a]) == (
        Mechanism(1.0, 0.1, 6),
        Mechanism(2.0, 0.1, 8),
        a,
    )


@pytest.mark.parametrize(("n", "batch"), [(10, 1), (10, 3), (100, 32), (64, 64), (65, 64)])
def test_the_plan_is_what_opacus_samples(n: int, batch: int) -> None:
    """The plan's rate and steps are those of make_private's Poisson loader."""
    data = ArrayDataset(x=np.zeros((n, 1, 8, 8), np.float32), y=np.zeros(n, np.int64))
    local = LocalSettings(epochs=2, batch_size=batch, learning_rate=0.1)
    model = build_model(ModelSpec(arch="cnn-small", num_classes=2, in_channels=1, image_size=8))
    _, _, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=make_optimizer(model, local),
        data_loader=make_loader(data, batch_size=batch, seed=0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    plan = step_plan(n, local)
    assert plan.sample_rate == loader.sample_rate
    assert plan.steps_per_epoch == len(loader)
    assert plan.steps == 2 * len(loader)


def test_a_batch_larger_than_the_data_is_refused() -> None:
    local = LocalSettings(epochs=1, batch_size=65, learning_rate=0.1)
    with pytest.raises(TaskRefused) as refused:
        step_plan(64, local)
    assert refused.value.kind == "refused"
    assert str(refused.value) == (
        "the task's batch_size 65 exceeds this silo's 64 training examples: the DP-SGD "
        "sampling rate would be 1.02 > 1"
    )


def test_a_budget_no_noise_can_meet_is_refused() -> None:
    with pytest.raises(TaskRefused) as refused:
        calibrate(target_epsilon=1e-6, delta=1e-9, sample_rate=1.0, steps=10**6, accountant="rdp")
    assert refused.value.kind == "privacy_budget"
    assert "no noise multiplier keeps the job's 1000000 DP-SGD steps" in str(refused.value)
