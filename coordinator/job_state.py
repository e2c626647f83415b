"""What the coordinator knows about a job, as plain data that round-trips through JSON.

This is what a checkpoint's ``state.json`` holds and what status, summary and report are
built from. Room for later: per-silo privacy spend goes into :class:`SiloSummary`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any


class Phase(enum.Enum):
    NO_JOB = "no_job"
    PENDING = "pending"
    PRETRAIN = "pretrain"
    FEDERATING = "federating"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        return self in (Phase.FINISHED, Phase.FAILED, Phase.STOPPED)


def finite_or_none(value: float | None) -> float | None:
    """``value`` when it is a finite number, else None (JSON has no NaN or infinity)."""
    return float(value) if value is not None and math.isfinite(value) else None


def percent(value: float | None) -> str:
    """``0.953`` -> ``"95.3%"``; ``"-"`` for a missing or non-finite value."""
    finite = finite_or_none(value)
    return "-" if finite is None else f"{100 * finite:.1f}%"


def _clean(value: float | None) -> float | None:
    """JSON has no NaN: missing or undefined metrics are written as null."""
    if value is None or math.isnan(value):
        return None
    return float(value)


@dataclass(frozen=True)
class RoundRecord:
    round: int
    silos_selected: int
    updates_accepted: int
    updates_rejected: int
    examples: int
    seconds: float
    #: the slowest accepted silo's local training time (the rest of ``seconds`` is overhead)
    slowest_train_seconds: float
    train_loss: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    federated_examples: int = 0
    #: the cumulative sample-level DP epsilon each silo reported with its accepted update
    silo_epsilon: dict[str, float] = field(default_factory=dict)
    #: the accepted updates' L2 distances from the global model as they arrived, ascending
    update_norms: tuple[float, ...] = ()
    #: accepted updates scaled back onto the round's norm bound (``update_bounds.action: clip``)
    updates_clipped: int = 0
    #: why the round's new global model was refused ("" for a round that was applied)
    failed: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["update_norms"] = list(self.update_norms)
        return {k: _clean(v) if isinstance(v, float) else v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        return cls(**{**data, "update_norms": tuple(data.get("update_norms", ()))})


@dataclass
class SiloSummary:
    rounds_participated: int = 0
    examples: int = 0
    updates_rejected: int = 0
    #: the last round whose update from this silo was accepted (0: none yet)
    last_round: int = 0
    #: tasks this silo declined, and the latest decline: its kind, reason and round
    tasks_declined: int = 0
    last_decline_kind: str = ""
    last_decline_reason: str = ""
    last_decline_round: int = 0
    #: the silo's cumulative sample-level privacy spend it last reported (None: no DP)
    privacy_epsilon: float | None = None
    privacy_delta: float | None = None
    privacy_accountant: str = ""
    #: why the silo's privacy reports look wrong (e.g. an epsilon that went down), if they do
    privacy_flag: str = ""
    #: the training and evaluation examples the silo registered when it was first selected
    #: in the job: its claims are bounded by these (coordinator/claims.py)
    registered_examples: int | None = None
    registered_eval_examples: int | None = None


#: the job's final state, written in its folder before the report: a coordinator that
#: crashes while exporting finds the job ended, and re-exports it instead of resuming it
ENDED_FILE = "ended.json"


@dataclass
class JobState:
    job_id: str
    spec: dict[str, Any]
    phase: Phase = Phase.PENDING
    message: str = ""
    round: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    silos: dict[str, SiloSummary] = field(default_factory=dict)
    #: where the initial model came from: random init, a file, or the GPT-FL pretrain phase
    initialisation: dict[str, Any] = field(default_factory=dict)
    #: silo-level DP on the aggregate: settings and the (epsilon, delta) spent so far
    silo_level_privacy: dict[str, Any] = field(default_factory=dict)
    #: a round of several stages (secure aggregation): the stage it is at, the silos still
    #: in it and those that dropped out ("" and empty for a plain round)
    stage: str = ""
    stage_silos: list[str] = field(default_factory=list)
    stage_dropped: list[str] = field(default_factory=list)
    created_unix: float = 0.0
    finished_unix: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "spec": self.spec,
            "phase": self.phase.value,
            "message": self.message,
            "round": self.round,
            "rounds": [r.to_json() for r in self.rounds],
            "silos": {k: asdict(v) for k, v in sorted(self.silos.items())},
            "initialisation": self.initialisation,
            "silo_level_privacy": self.silo_level_privacy,
            "stage": self.stage,
            "stage_silos": list(self.stage_silos),
            "stage_dropped": list(self.stage_dropped),
            "created_unix": self.created_unix,
            "finished_unix": self.finished_unix,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobState:
        return cls(
            job_id=data["job_id"],
            spec=data["spec"],
            phase=Phase(data["phase"]),
            message=data.get("message", ""),
            round=data["round"],
            rounds=[RoundRecord.from_json(r) for r in data["rounds"]],
            silos={k: SiloSummary(**v) for k, v in data.get("silos", {}).items()},
            initialisation=data.get("initialisation", {}),
            silo_level_privacy=data.get("silo_level_privacy", {}),
            stage=data.get("stage", ""),
            stage_silos=list(data.get("stage_silos", [])),
            stage_dropped=list(data.get("stage_dropped", [])),
            created_unix=data.get("created_unix", 0.0),
            finished_unix=data.get("finished_unix"),
        )
