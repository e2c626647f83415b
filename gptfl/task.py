"""A task as both sides of the fleet API see it: one silo's part in one round."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gptfl.models.spec import ModelSpec


class TaskKind(enum.Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"


@dataclass(frozen=True)
class LocalSettings:
    """Local training settings for one task (the job's, plus the strategy's overrides)."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    weight_decay: float
    proximal_mu: float
    seed: int


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    job_id: str
    round: int
    kind: TaskKind
    model_spec: ModelSpec
    model_digest: str  # the manifest digest (BLAKE3) of the model the task runs on
    local: LocalSettings
    deadline_unix: float
