"""Silo-level DP (DP-FedAvg): clipping, equal weights, calibrated noise, accounting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from coordinator.claims import RoundClaims
from coordinator.job_state import Phase
from coordinator.round_plan import RoundSetup
from coordinator.silo_level_dp import ClippedUpdateFold, SiloLevelDp
from coordinator.strategies import FedAdam, FedAvg
from coordinator.tasks import ModelVersion
from gptfl.fleet_messages import UpdateHeader
from gptfl.job_spec import SiloLevelDpSpec
from gptfl.task import TaskKind
from gptfl.weights import WeightMap, specs_of
from tests.unit.coordinator.in_process_job import WAIT_S, InProcessJob, tiny_spec


def _header(n: int = 10) -> UpdateHeader:
    return UpdateHeader("t", 1, n, {"loss": 1.0}, 0.0)


def _fold(global_weights: WeightMap, *, clip: float, std: float, m: int) -> ClippedUpdateFold:
    gen = torch.Generator().manual_seed(1234)
    return ClippedUpdateFold(
        global_weights,
        specs_of(global_weights),
        clip_norm=clip,
        noise_std=std,
        denominator=m,
        generator=gen,
    )


def test_the_aggregate_noise_has_the_configured_standard_deviation() -> None:
    """Zero updates, so the average minus the global model is the noise alone.

    With n = 2**20 coordinates the sample standard deviation's relative error has a
    standard deviation of 1/sqrt(2n) = 0.069%; the bound of 0.5% is more than 7 of those,
    which chance exceeds with a probability below 1e-12. The mean's bound is 6 standard
    errors (below 2e-9).
    """
    n = 1 << 20
    global_weights = {"w": torch.full((n,), 0.5)}
    clip, sigma, m = 2.0, 1.3, 4
    fold = _fold(global_weights, clip=clip, std=sigma * clip / m, m=m)
    for _ in range(m):
        fold.fold({"w": global_weights["w"].clone()}, _header())
    noise = (fold.average()["w"] - 0.5).double()
    expected_std = sigma * clip / m
    assert abs(noise.std().item() / expected_std - 1) < 0.005
    assert abs(noise.mean().item()) < 6 * expected_std / math.sqrt(n)


def test_updates_are_clipped_and_weighted_equally() -> None:
    g = {"a": torch.zeros(3), "b": torch.zeros(4)}
    fold = _fold(g, clip=1.0, std=0.0, m=2)
    big = {"a": torch.full((3,), 10.0), "b": torch.full((4,), 10.0)}  # norm sqrt(700)
    small = {"a": torch.tensor([0.3, 0.0, 0.0]), "b": torch.zeros(4)}  # norm 0.3: kept
    fold.fold(big, _header(n=1_000_000))  # the sample count buys no extra weight
    fold.fold(small, _header(n=1))
    average = fold.average()
    clipped_big = torch.cat([big["a"], big["b"]]) / math.sqrt(700)
    expected = (clipped_big + torch.cat([small["a"], small["b"]])) / 2
    torch.testing.assert_close(torch.cat([average["a"], average["b"]]), expected)
    assert fold.clipped == 1 and fold.count == 2 and fold.total_examples == 1_000_001


def test_a_dropped_silo_does_not_raise_the_others_weight() -> None:
    g = {"w": torch.zeros(2)}
    fold = _fold(g, clip=10.0, std=0.0, m=4)  # four selected, one reported
    fold.fold({"w": torch.tensor([1.0, 2.0])}, _header())
    torch.testing.assert_close(fold.average()["w"], torch.tensor([0.25, 0.5]))


def _setup(weights: WeightMap, silos: int, connected: int) -> RoundSetup:
    names = tuple(f"s{i}" for i in range(silos))
    claims = RoundClaims.of(dict.fromkeys(names, (100, 10)))
    return RoundSetup(1, names, connected, ModelVersion.of(weights), 30.0, claims)


def test_the_inner_strategy_sees_the_clipped_average() -> None:
    g = {"w": torch.zeros(3)}
    dp = SiloLevelDp(
        FedAdam(server_learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3),
        clip_norm=1.0,
        noise_multiplier=1e-12,
        delta=1e-5,
    )
    fold = dp.round_fold(_setup(g, silos=1, connected=1))
    fold.fold({"w": torch.tensor([3.0, 0.0, 4.0])}, _header())
    plain = FedAdam(server_learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    expected = plain.apply(g, {"w": torch.tensor([0.6, 0.0, 0.8])})
    torch.testing.assert_close(dp.apply(g, fold.average())["w"], expected["w"])


def test_epsilon_is_the_rdp_accountant_over_the_released_rounds() -> None:
    g = {"w": torch.zeros(2)}
    dp = SiloLevelDp(FedAvg(), clip_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    assert dp.epsilon() == 0.0
    rates = [(3, 10), (5, 10), (10, 10)]
    for silos, connected in rates:
        fold = dp.round_fold(_setup(g, silos, connected))
        fold.fold({"w": torch.ones(2)}, _header())
        dp.apply(g, fold.average())
    replay = RDPAccountant()
    replay.history = [(1.1, s / c, 1) for s, c in rates]
    assert dp.epsilon() == pytest.approx(replay.get_epsilon(1e-5))
    restored = SiloLevelDp(FedAvg(), clip_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    restored.load_state_dict(dp.state_dict())
    assert restored.epsilon() == dp.epsilon()
    assert dp.privacy_spent()["rounds"] == 3


@pytest.mark.parametrize(("target", "rounds", "rate"), [(8.0, 30, 1.0), (2.0, 10, 0.3)])
def test_a_target_epsilon_holds_at_the_last_round(target: float, rounds: int, rate: float) -> None:
    spec = SiloLevelDpSpec(clip_norm=1.0, target_epsilon=target, delta=1e-5)
    dp = SiloLevelDp.from_spec(FedAvg(), spec, rounds=rounds, planned_rate=rate)
    dp._history = [(dp.noise_multiplier, rate)] * rounds  # what `rounds` releases record
    assert target * 0.95 <= dp.epsilon() <= target * 1.001


def test_a_job_with_silo_level_dp_records_its_spend(job: InProcessJob) -> None:
    spec = tiny_spec(rounds=2, silo_level_dp={"clip_norm": 0.5, "noise_multiplier": 2.0})
    runner = job.start(spec)
    for _ in (1, 2):
        tasks = {silo: job.pull(runner, silo, TaskKind.TRAIN) for silo in ("a", "b", "c")}
        base = job.download(runner, "a", tasks["a"])
        for silo, task in tasks.items():
            job.upload(runner, silo, task, base, 10)
    runner.join(WAIT_S)
    assert runner.state.phase is Phase.FINISHED, runner.state.message
    spent = runner.state.silo_level_privacy
    replay = RDPAccountant()
    replay.history = [(2.0, 1.0, 2)]
    assert spent["rounds"] == 2 and spent["epsilon"] == pytest.approx(replay.get_epsilon(1e-5))
    summary = json.loads((job.tmp / "runs" / runner.job_id / "summary.json").read_text())
    assert summary["silo_level_privacy"]["epsilon"] == pytest.approx(spent["epsilon"])
    assert (
        "Silo-level differential privacy"
        in (job.tmp / "runs" / runner.job_id / "report.md").read_text()
    )
    gauge = job.metrics.registry.get_sample_value("gptfl_job_privacy_epsilon")
    assert gauge == pytest.approx(spent["epsilon"])
