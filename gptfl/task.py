"""A task as both sides of the fleet API see it: one silo's part in one round."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from gptfl.errors import ConfigError
from gptfl.models.spec import ModelSpec
from gptfl.secagg.messages import SecAggTask


class TaskKind(enum.Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    #: the key stages of a secure-aggregation round (its masked inputs are TRAIN tasks)
    SECAGG_ADVERTISE = "secagg_advertise"
    SECAGG_SHARE = "secagg_share"
    SECAGG_UNMASK = "secagg_unmask"


@dataclass(frozen=True)
class LocalSettings:
    """The settings of one local training run: the one type from the job spec to the silo.

    The coordinator builds it from the job spec's ``local`` section and the task's seed;
    the strategy (and any wrapper around it) adjusts it through
    :meth:`coordinator.strategies.Strategy.configure_local`; :mod:`gptfl.serde` carries it
    to the silo field by field (the proto's ``TrainConfig`` has the same field names); the
    silo's trainer reads it. The synth service's pretraining uses it too.

    Attributes:
        epochs: passes over the local data.
        batch_size: examples per SGD step; the last batch of an epoch may be smaller.
        learning_rate: SGD step size.
        momentum: SGD momentum (the momentum buffer starts at zero on every run).
        weight_decay: L2 penalty applied by SGD.
        proximal_mu: FedProx coefficient of ``mu/2 ||w - w_global||^2``; 0 is plain local
            SGD (FedAvg).
        seed: seed of the shuffling (and sampling) order.

    Raises:
        ConfigError: a value is out of range (the same rules whichever side builds it).
    """

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0 or not math.isfinite(self.weight_decay):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.proximal_mu >= 0 or not math.isfinite(self.proximal_mu):
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class TaskSpec:
    """One silo's part in one round, as the silo is told it.

    Attributes:
        task_id: the task's id (unique in the coordinator).
        job_id: the job it belongs to.
        round: the round (1-based).
        kind: train or evaluate.
        model_spec: the architecture of the round's global model.
        model_digest: the payload digest of the model to download (the silo's cache key).
        local: the local training settings.
        deadline_unix: when the coordinator stops waiting for the reply (Unix seconds).
        rounds: the job's planned number of rounds (its last round's number), so that a
            silo with DP-SGD can calibrate its noise for the whole job; 0 when the
            coordinator did not say (one older than this field).
    """

    task_id: str
    job_id: str
    round: int
    kind: TaskKind
    model_spec: ModelSpec
    model_digest: str  # the manifest digest (BLAKE3) of the model the task runs on
    local: LocalSettings
    deadline_unix: float
    rounds: int = 0
    #: the task's part in a secure-aggregation round (None in a plain round)
    secagg: SecAggTask | None = None
