"""What DP-SGD spends: the steps of a task, the noise for a whole job, a history's epsilon.

A silo's spend on its training data is a history of :class:`Mechanism` entries, the
Poisson-subsampled Gaussian mechanism at one noise multiplier and sampling rate for some
number of steps: exactly what an Opacus accountant keeps (``accountant.history``). The
ledger (:mod:`silo_agent.privacy_ledger`) keeps such histories; the epsilon of one is
computed here, with Opacus's accountants, whenever it is needed, so the ledger holds facts
(what ran) rather than one accountant's conclusions.

The plan of a task follows what ``PrivacyEngine.make_private`` does with the loader of
:func:`gptfl.training.make_loader`: ``ceil(n / batch_size)`` steps per epoch, each drawing
every example with probability ``1 / ceil(n / batch_size)`` (Opacus's ``DPDataLoader``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from gptfl.errors import TaskRefused
from gptfl.task import LocalSettings


@dataclass(frozen=True)
class Mechanism:
    """Steps of DP-SGD at one noise multiplier and sampling rate (one accountant entry).

    Attributes:
        noise_multiplier: the noise's standard deviation over the clipping bound.
        sample_rate: the probability that a step draws a given example.
        steps: how many steps ran so.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def same_mechanism(self, other: Mechanism) -> bool:
        """Whether ``other`` has this noise and rate (so the two compose into one entry)."""
        return (
            self.noise_multiplier == other.noise_multiplier
            and self.sample_rate == other.sample_rate
        )


def compose(history: Iterable[Mechanism]) -> tuple[Mechanism, ...]:
    """The history with consecutive entries of the same mechanism merged.

    What an Opacus accountant does step by step; the epsilon is the same, and a job that ran
    as planned is one entry, exactly the one its noise was calibrated on.
    """
    merged: list[Mechanism] = []
    for entry in history:
        if entry.steps <= 0:
            continue
        if merged and merged[-1].same_mechanism(entry):
            last = merged.pop()
            entry = Mechanism(last.noise_multiplier, last.sample_rate, last.steps + entry.steps)
        merged.append(entry)
    return tuple(merged)


def epsilon(history: Iterable[Mechanism], *, delta: float, accountant: str) -> float:
    """The epsilon at ``delta`` of ``history`` by Opacus's ``accountant`` (``rdp``, ``prv``);
    0 for an empty history."""
    return _epsilon(compose(history), delta, accountant)


@functools.lru_cache(maxsize=256)
def _epsilon(entries: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """Cached: a round asks for the same history's epsilon several times, and Opacus's RDP
    takes a quarter of a second for each (its fractional orders are computed in Python)."""
    if not entries:
        return 0.0
    engine = create_accountant(mechanism=accountant)
    engine.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    with warnings.catch_warnings():
        # RDP's "optimal order is the largest alpha": the bound could be tighter, never
        # looser than the truth (a warning per round in the silo's log otherwise)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(engine.get_epsilon(delta=delta))


@dataclass(frozen=True)
class StepPlan:
    """The DP-SGD steps one training task takes on this silo's data.

    Attributes:
        sample_rate: each step's probability of drawing an example.
        steps_per_epoch: steps of one local epoch.
        epochs: local epochs.
    """

    sample_rate: float
    steps_per_epoch: int
    epochs: int

    @property
    def steps(self) -> int:
        """Steps of the whole task."""
        return self.steps_per_epoch * self.epochs

    def at(self, noise_multiplier: float) -> Mechanism:
        """The task's steps at ``noise_multiplier``."""
        return Mechanism(noise_multiplier, self.sample_rate, self.steps)


def step_plan(num_examples: int, local: LocalSettings) -> StepPlan:
    """The steps a task with ``local`` settings takes on ``num_examples`` examples.

    Raises:
        TaskRefused: the batch size exceeds the examples, so the sampling rate
            ``batch_size / n`` would exceed 1 (no subsampling: DP-SGD's accounting and the
            task's batch size cannot both hold).
    """
    if num_examples < 1:
        raise TaskRefused("this silo holds no training data for the task", kind="no_data")
    if local.batch_size > num_examples:
        raise TaskRefused(
            f"the task's batch_size {local.batch_size} exceeds this silo's {num_examples} "
            f"training examples: the DP-SGD sampling rate would be "
            f"{local.batch_size / num_examples:.3g} > 1",
            kind="refused",
        )
    steps_per_epoch = math.ceil(num_examples / local.batch_size)
    return StepPlan(
        sample_rate=1 / steps_per_epoch, steps_per_epoch=steps_per_epoch, epochs=local.epochs
    )


def calibrate(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier that keeps ``steps`` steps at ``sample_rate`` within
    ``(target_epsilon, delta)``: Opacus's ``get_noise_multiplier``, checked.

    Raises:
        TaskRefused: no noise multiplier within Opacus's range meets the budget (kind
            ``privacy_budget``).
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as exc:
        raise TaskRefused(
            f"privacy budget: no noise multiplier keeps the job's {steps} DP-SGD steps at "
            f"sampling rate {sample_rate:.3g} within target_epsilon {target_epsilon:g} ({exc})",
            kind="privacy_budget",
        ) from None
    spent = epsilon([Mechanism(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    if spent > target_epsilon:  # get_noise_multiplier promises this; a guarantee is checked
        raise TaskRefused(
            f"privacy budget: the calibrated noise multiplier {sigma:.4g} would spend epsilon "
            f"{spent:.4g} over the job's {steps} steps, above target_epsilon {target_epsilon:g}",
            kind="privacy_budget",
        )
    return sigma
