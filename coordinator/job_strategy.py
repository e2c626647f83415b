"""The strategy a job runs: the one its spec names, inside the wrappers its options ask for."""

from __future__ import annotations

from coordinator.silo_level_dp import SiloLevelDp
from coordinator.strategies import Strategy, build_strategy
from gptfl.job_spec import JobSpec


def strategy_for_job(spec: JobSpec) -> Strategy:
    """``spec.strategy``, wrapped in silo-level DP when ``spec.silo_level_dp`` is set."""
    strategy = build_strategy(spec.strategy)
    if spec.silo_level_dp is not None:
        strategy = SiloLevelDp.from_spec(
            strategy, spec.silo_level_dp, rounds=spec.rounds, planned_rate=spec.silo_fraction()
        )
    return strategy
