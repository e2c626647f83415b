"""How a round gathers the silos' updates: its fold and the stages that fill it.

The job thread (:mod:`coordinator.job_runner`) asks a planner for each round's
:class:`RoundPlan`, opens the plan's fold to the update intake, and lets the plan run its
stages; once the plan returns, the fold's average goes to the strategy and the round's
evaluation stage follows. A plain round gathers with one training stage
(:class:`PlainRound`); a secure-aggregation round would advertise keys, share keys, collect
masked inputs and unmask, each stage through the same :class:`StageRunner`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from coordinator.claims import RoundClaims
from coordinator.round_fold import RoundFold
from coordinator.round_stages import Stage, StageResult, StageRunner
from coordinator.tasks import ModelVersion, TaskRecord
from coordinator.update_norm import NormBound
from gptfl.fleet_messages import EvaluationReport, SecAggSubmission
from gptfl.task import TaskKind


class StageExchange(Protocol):
    """What takes a round's key-stage answers (a secure-aggregation round's protocol)."""

    def receive(self, task: TaskRecord, submission: SecAggSubmission) -> None:
        """Checks and takes ``task``'s answer; raises a GptflError and changes nothing when it
        is refused. Called under the intake's fold lock."""


@dataclass
class RoundProgress:
    """What the round in progress has received so far (guarded by the intake's locks)."""

    number: int
    fold: RoundFold
    #: what each selected silo may claim (coordinator/claims.py)
    claims: RoundClaims
    #: the bound on update norms (``update_bounds``), None without one
    norm_bound: NormBound | None = None
    #: takes the answers to the round's key stages (None: the round has none)
    exchange: StageExchange | None = None
    loss_sum: float = 0.0
    #: the examples behind ``loss_sum`` (a DP silo reports no training loss)
    loss_examples: int = 0
    slowest_train_s: float = 0.0
    rejected: int = 0
    #: the cumulative DP epsilon each silo reported with its accepted update (DP silos only)
    epsilons: dict[str, float] = field(default_factory=dict)
    #: the accepted updates' distances from the global model, as they arrived
    norms: list[float] = field(default_factory=list)
    #: accepted updates that were clipped onto the norm bound
    clipped: int = 0
    #: evaluation reports by task id, taken by the evaluation stage once it ends
    evaluations: dict[str, EvaluationReport] = field(default_factory=dict)

    @property
    def train_loss(self) -> float:
        """The sample-weighted training loss of the accepted updates that reported one (nan
        when none did)."""
        return self.loss_sum / self.loss_examples if self.loss_examples else math.nan


@dataclass(frozen=True)
class StageStatus:
    """Where a round with several stages is, for ``gptfl admin status``.

    Attributes:
        stage: the stage in progress.
        silos: the silos still in the round (for secure aggregation: the survivors so far).
        dropped: silos that dropped out of it since it began.
    """

    stage: str
    silos: tuple[str, ...]
    dropped: tuple[str, ...] = ()


def _unreported(status: StageStatus) -> None:
    """The report of a setup nobody watches (tests)."""


@dataclass(frozen=True)
class RoundSetup:
    """What a planner is told about the round to plan."""

    number: int
    #: the silos selected for the round
    silos: tuple[str, ...]
    #: how many silos were connected when they were selected (the sampling rate's base)
    connected: int
    global_model: ModelVersion
    deadline_s: float
    #: the selected silos' bounds on what they claim; its ``max_total_weight`` bounds the
    #: round's folded weights
    claims: RoundClaims
    #: where a plan says which stage it is at (shown by ``gptfl admin status``)
    report: Callable[[StageStatus], None] = _unreported


class RoundPlan(ABC):
    """One round's way of gathering updates."""

    def __init__(self, fold: RoundFold, exchange: StageExchange | None = None) -> None:
        self.fold = fold
        self.exchange = exchange

    @abstractmethod
    def gather(self, stages: StageRunner) -> StageResult:
        """Runs the stages that fill :attr:`fold`.

        Returns:
            The result of the stage whose finished silos are the round's participants (they
            are asked to evaluate the new model).
        """


#: makes a round's plan; the job runner's default is :func:`plain_round` over the
#: strategy's fold
RoundPlanner = Callable[[RoundSetup, RoundFold], RoundPlan]


class PlainRound(RoundPlan):
    """Every selected silo trains and uploads its model; uploads fold as they arrive."""

    def __init__(self, setup: RoundSetup, fold: RoundFold) -> None:
        super().__init__(fold)
        self._setup = setup

    def gather(self, stages: StageRunner) -> StageResult:
        setup = self._setup
        return stages.run(Stage("train", TaskKind.TRAIN, setup.silos, setup.deadline_s))


def plain_round(setup: RoundSetup, fold: RoundFold) -> RoundPlan:
    return PlainRound(setup, fold)
