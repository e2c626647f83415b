"""The job spec: everything an admin decides about one federated job.

It travels as the YAML the admin wrote (``gptfl admin submit job.yaml``) and is validated by
this one model on both sides, so the CLI and the coordinator can never disagree on it. Every
key is documented in docs/job-spec.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pydantic

from gptfl.config_loading import StrictModel, parse_config, parse_yaml_text
from gptfl.data.sources import DataSource
from gptfl.errors import ConfigError
from gptfl.models.spec import ModelSpec

StrategyName = Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


class LocalTrainingSpec(StrictModel):
    """What each silo does with the global model in one round."""

    epochs: int = pydantic.Field(1, ge=1, le=1000)
    batch_size: int = pydantic.Field(32, ge=1, le=65536)
    learning_rate: float = pydantic.Field(0.05, gt=0, le=10)
    momentum: float = pydantic.Field(0.0, ge=0, lt=1)
    weight_decay: float = pydantic.Field(0.0, ge=0, le=1)


class StrategySpec(StrictModel):
    """How the coordinator turns the silos' models into the next global model.

    ``fedavg`` averages the silo models weighted by their sample counts; ``fedprox`` is
    FedAvg plus the proximal term ``mu/2 ||w - w_global||^2`` at the silos; ``fedavgm``,
    ``fedadam``, ``fedyogi`` and ``fedadagrad`` treat ``global - average`` as a
    pseudo-gradient for a server optimizer (Reddi et al., "Adaptive Federated Optimization").
    """

    name: StrategyName = "fedavg"
    proximal_mu: float = pydantic.Field(0.01, ge=0)
    server_learning_rate: float = pydantic.Field(1.0, gt=0)
    server_momentum: float = pydantic.Field(0.9, ge=0, lt=1)
    beta1: float = pydantic.Field(0.9, ge=0, lt=1)
    beta2: float = pydantic.Field(0.99, ge=0, lt=1)
    tau: float = pydantic.Field(1e-3, gt=0)


class EvaluationSpec(StrictModel):
    """Evaluation after each round."""

    #: a validation/test set the coordinator holds itself (server-side evaluation)
    server: DataSource | None = None
    #: ask the round's silos to evaluate the new global model on their held-out data
    federated: bool = True


class JobSpec(StrictModel):
    """One federated job."""

    name: str = pydantic.Field(description="short slug: lowercase letters, digits, dashes")
    model: ModelSpec
    rounds: int = pydantic.Field(ge=1, le=100_000)
    seed: int = 0
    silos_per_round: float | Literal["all"] = "all"
    min_silos: int = pydantic.Field(1, ge=1)
    round_deadline_s: float = pydantic.Field(600.0, gt=0)
    wait_for_silos_s: float = pydantic.Field(600.0, gt=0)
    local: LocalTrainingSpec = LocalTrainingSpec()
    strategy: StrategySpec = StrategySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    #: start from these weights (a safetensors file on the coordinator) instead of random init
    initial_model: Path | None = None

    @pydantic.field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-40 lowercase letters, digits or dashes")
        return value

    @pydantic.field_validator("silos_per_round")
    @classmethod
    def _check_fraction(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError("must be 'all' or a fraction in (0, 1]")
        return value

    def silo_fraction(self) -> float:
        return 1.0 if self.silos_per_round == "all" else float(self.silos_per_round)


def parse_job_spec(text: str, *, source: str = "job spec") -> JobSpec:
    """Parses and validates a job spec document (YAML or JSON)."""
    return parse_config(JobSpec, parse_yaml_text(text, source=source), source=source)


def load_job_spec(path: Path) -> JobSpec:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job spec: {exc.strerror or exc}") from None
    return parse_job_spec(text, source=path.name)
