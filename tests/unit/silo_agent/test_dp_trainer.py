"""The DP-SGD trainer: Opacus on the trainer's pieces, a spend Opacus agrees with, a budget
the silo keeps across rounds, jobs and restarts, and refusals that train nothing."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator

from gptfl.data import ArrayDataset, SklearnDigitsSource, load_source
from gptfl.errors import ConfigError, TaskRefused
from gptfl.models import ModelSpec, available_architectures, build_model, registry
from gptfl.task import LocalSettings, TaskKind, TaskSpec
from gptfl.weights import WeightMap
from silo_agent.config import PrivacyConfig
from silo_agent.dp_trainer import DpSgdTrainer
from silo_agent.privacy_ledger import LEDGER_FILE
from silo_agent.trainer import TrainingOutcome, TrainingRun, without_inplace_activations

CPU = torch.device("cpu")
SPEC = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)
LOCAL = LocalSettings(epochs=1, batch_size=20, learning_rate=0.1, seed=5)
N = 200  # examples: 10 steps per epoch at sampling rate 1/10
PRIVACY = PrivacyConfig(target_epsilon=4.0, target_delta=1e-4, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def data() -> ArrayDataset:
    digits = load_source(SklearnDigitsSource(kind="sklearn-digits"), in_channels=1, image_size=8)
    return digits.subset(np.arange(N))


@pytest.fixture(autouse=True)
def _quiet_opacus() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


GLOBAL: WeightMap = {
    k: v.detach().clone() for k, v in build_model(SPEC, seed=0).state_dict().items()
}


def _task(round_: int, *, rounds: int = 3, job: str = "job-1", spec: ModelSpec = SPEC) -> TaskSpec:
    return TaskSpec(
        task_id=f"{job}-{round_}",
        job_id=job,
        round=round_,
        kind=TaskKind.TRAIN,
        model_spec=spec,
        model_digest="sha",
        local=LOCAL,
        deadline_unix=time.time() + 600,
        rounds=rounds,
    )


def _run(trainer: DpSgdTrainer, task: TaskSpec, data: ArrayDataset) -> TrainingOutcome:
    trainer.check(task, num_examples=len(data))
    model = build_model(SPEC)
    model.load_state_dict(GLOBAL)
    return trainer.train(TrainingRun(task, model, GLOBAL, data, CPU))


def _replayed(privacy: PrivacyConfig, *, job_rounds: int, trained_rounds: int) -> float:
    """An Opacus accountant stepped through the rounds trained, at the noise Opacus itself
    computes for the whole job: 10 steps a round at sampling rate 1/10."""
    noise = get_noise_multiplier(
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        sample_rate=0.1,
        steps=job_rounds * 10,
        accountant=privacy.accountant,
    )
    accountant = create_accountant(mechanism=privacy.accountant)
    for _ in range(trained_rounds * 10):
        accountant.step(noise_multiplier=noise, sample_rate=0.1)
    return float(accountant.get_epsilon(delta=privacy.target_delta))


def test_a_round_trains_privately_and_reports_what_opacus_counts(
    tmp_path: Path, data: ArrayDataset
) -> None:
    trainer = DpSgdTrainer.start(PRIVACY, state_dir=tmp_path, num_examples=N)
    outcome = _run(trainer, _task(1), data)
    assert outcome.privacy is not None
    assert outcome.privacy.accountant == "rdp" and outcome.privacy.delta == 1e-4
    assert outcome.privacy.epsilon == _replayed(PRIVACY, job_rounds=3, trained_rounds=1)
    assert 0 < outcome.privacy.epsilon < PRIVACY.target_epsilon
    # the model's own names, trained weights, the FedAvg weight of the whole data
    assert list(outcome.weights) == list(GLOBAL)
    assert not all(torch.equal(outcome.weights[k], GLOBAL[k]) for k in GLOBAL)
    assert outcome.num_examples == N
    assert outcome.metrics == {}  # exact figures of the private batches are not sent
    job = trainer.ledger.job("job-1")
    assert job is not None and job.rounds == (1,) and job.history[0].steps == 10
    assert (tmp_path / LEDGER_FILE).exists()


def test_a_silo_at_its_budget_refuses_the_next_task_and_does_not_train(
    tmp_path: Path, data: ArrayDataset
) -> None:
    trainer = DpSgdTrainer.start(PRIVACY, state_dir=tmp_path, num_examples=N)
    spent = [_run(trainer, _task(r, rounds=2), data).privacy for r in (1, 2)]
    assert spent[1] is not None and spent[1].epsilon <= PRIVACY.target_epsilon
    assert spent[1].epsilon == _replayed(PRIVACY, job_rounds=2, trained_rounds=2)
    ledger_bytes = (tmp_path / LEDGER_FILE).read_bytes()

    extra = _task(3, rounds=2)  # a coordinator that asks for more than it announced
    with pytest.raises(TaskRefused) as refused:
        trainer.check(extra, num_examples=N)
    assert refused.value.kind == "privacy_budget"
    assert str(refused.value).startswith(
        "privacy budget: round 3 would bring this silo's epsilon in job job-1 to "
    )
    assert "above its target_epsilon 4; spent so far" in str(refused.value)
    # train() is held to the same budget: the model is not touched, the ledger not written
    model = build_model(SPEC)
    model.load_state_dict(GLOBAL)
    with pytest.raises(TaskRefused):
        trainer.train(TrainingRun(extra, model, GLOBAL, data, CPU))
    assert all(torch.equal(v, GLOBAL[k]) for k, v in model.state_dict().items())
    assert (tmp_path / LEDGER_FILE).read_bytes() == ledger_bytes


def test_a_restarted_silo_continues_its_ledger(tmp_path: Path, data: ArrayDataset) -> None:
    first = DpSgdTrainer.start(PRIVACY, state_dir=tmp_path, num_examples=N)
    after_one = _run(first, _task(1), data).privacy
    restarted = DpSgdTrainer.start(PRIVACY, state_dir=tmp_path, num_examples=N)
    assert after_one is not None and restarted.job_epsilon("job-1") == after_one.epsilon
    for round_ in (2, 3):
        outcome = _run(restarted, _task(round_), data)
    assert outcome.privacy is not None
    assert outcome.privacy.epsilon == _replayed(PRIVACY, job_rounds=3, trained_rounds=3)
    assert outcome.privacy.epsilon <= PRIVACY.target_epsilon
    job = restarted.ledger.job("job-1")
    assert job is not None and job.rounds == (1, 2, 3) and job.history[0].steps == 30


def test_the_lifetime_budget_holds_across_jobs(tmp_path: Path, data: ArrayDataset) -> None:
    privacy = PRIVACY.model_copy(update={"lifetime_epsilon": 4.5})
    trainer = DpSgdTrainer.start(privacy, state_dir=tmp_path, num_examples=N)
    _run(trainer, _task(1, rounds=1, job="job-1"), data)  # spends about 4 of 4.5
    with pytest.raises(TaskRefused) as refused:
        trainer.check(_task(1, rounds=1, job="job-2"), num_examples=N)
    assert refused.value.kind == "privacy_budget"
    assert "lifetime epsilon over all jobs on its data to " in str(refused.value)
    assert "above its lifetime_epsilon 4.5" in str(refused.value)
    assert trainer.ledger.job("job-2") is None
    # the lifetime budget is the ledger's too: a restart does not forget job-1
    restarted = DpSgdTrainer.start(privacy, state_dir=tmp_path, num_examples=N)
    with pytest.raises(TaskRefused, match="lifetime_epsilon 4.5"):
        restarted.check(_task(1, rounds=1, job="job-2"), num_examples=N)


def test_a_fixed_noise_multiplier_needs_no_rounds_and_is_kept(
    tmp_path: Path, data: ArrayDataset
) -> None:
    trainer = DpSgdTrainer.start(PRIVACY, state_dir=tmp_path, num_examples=N)
    with pytest.raises(TaskRefused, match="does not say how many rounds the job has"):
        trainer.check(_task(1, rounds=0), num_examples=N)  # calibration needs the rounds
    fixed = PRIVACY.model_copy(update={"noise_multiplier": 2.0})
    trainer = DpSgdTrainer.start(fixed, state_dir=tmp_path, num_examples=N)
    outcome = _run(trainer, _task(1, rounds=0), data)
    job = trainer.ledger.job("job-1")
    assert job is not None and job.noise_multiplier == 2.0
    assert outcome.privacy is not None and outcome.privacy.epsilon < PRIVACY.target_epsilon


def test_a_batch_larger_than_the_data_is_refused_before_training(
    tmp_path: Path, data: ArrayDataset
) -> None:
    trainer = DpSgdTrainer.start(PRIVACY, state_dir=tmp_path, num_examples=N)
    big = TaskSpec(**{**_task(1).__dict__, "local": LocalSettings(1, 256, 0.1)})
    with pytest.raises(TaskRefused, match=r"batch_size 256 exceeds this silo's 200 training"):
        trainer.check(big, num_examples=N)
    assert not (tmp_path / LEDGER_FILE).exists()


def _buildable(arch: str) -> torch.nn.Module:
    """``arch`` at the first input size it supports (each architecture has its own)."""
    for size in (8, 28, 32):
        try:
            return build_model(ModelSpec(arch=arch, num_classes=10, in_channels=3, image_size=size))
        except ConfigError:
            continue
    raise AssertionError(f"{arch} builds at none of the sizes tried")


def test_every_zoo_model_can_be_made_private_as_it_is() -> None:
    """GroupNorm, no BatchNorm: the zoo's models pass Opacus's validator unchanged (only the
    in-place activations are turned off, which changes no output)."""
    architectures = available_architectures()
    assert {"cnn-small", "resnet20"} <= set(architectures)
    for arch in architectures:
        model = without_inplace_activations(_buildable(arch))
        assert ModuleValidator.validate(model, strict=False) == [], arch


def test_a_model_opacus_cannot_make_private_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def batch_norm_cnn(spec: ModelSpec) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(spec.in_channels, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.Flatten(),
            torch.nn.LazyLinear(spec.num_classes),
        )

    registered = registry.RegisteredArchitecture(
        "batchnorm-cnn", batch_norm_cnn, registry.ProbeShape(), "tests", "0"
    )
    monkeypatch.setitem(registry._BUILTINS, "batchnorm-cnn", registered)
    trainer = DpSgdTrainer.start(PRIVACY, state_dir=tmp_path, num_examples=N)
    spec = SPEC.model_copy(update={"arch": "batchnorm-cnn"})
    with pytest.raises(TaskRefused) as refused:
        trainer.check(_task(1, spec=spec), num_examples=N)
    assert refused.value.kind == "refused"
    assert str(refused.value).startswith(
        "the job's model batchnorm-cnn cannot be trained with DP-SGD here (Opacus: "
    )
    assert "BatchNorm" in str(refused.value)
