"""The fleet API's messages as domain types: what a silo and the coordinator tell each other.

:mod:`gptfl.serde` converts each of these to and from its protobuf message; servicers and
the silo's fleet client stop protobuf at their edge and hand these on. Tasks themselves are
in :mod:`gptfl.task`; weights travel as manifests and chunks (:mod:`gptfl.weights`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from gptfl.errors import NonFiniteError, ValidationError
from gptfl.models.fingerprint import ModelFingerprint
from gptfl.secagg.messages import KeyAdvertisement, ShareEnvelope, UnmaskReply
from gptfl.task import TaskKind, TaskSpec


class FleetPhase(enum.Enum):
    """The job phase as the fleet API reports it to silos."""

    NO_JOB = "no_job"
    PRETRAIN = "pretrain"
    FEDERATING = "federating"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        return self in (FleetPhase.FINISHED, FleetPhase.FAILED, FleetPhase.STOPPED)


@dataclass(frozen=True)
class Registration:
    """A silo's Register: who it is comes from its certificate, the rest from here.

    ``models`` are the fingerprints of the architectures the silo resolves (name, provider
    and version, parameter layout), checked against the coordinator's own.
    """

    agent_version: str
    device: str
    num_train_examples: int
    num_eval_examples: int
    models: tuple[ModelFingerprint, ...] = ()


@dataclass(frozen=True)
class RegisterAck:
    """The coordinator's answer to a Register."""

    silo_id: str
    heartbeat_interval_s: float
    coordinator_version: str


@dataclass(frozen=True)
class PullReply:
    """The answer to a PullTask long poll: a task, or the phase and when to ask again."""

    phase: FleetPhase
    job_id: str
    task: TaskSpec | None
    retry_after_s: float


def check_metrics(values: Mapping[str, float], *, what: str) -> None:
    """Refuses metrics a peer sent that are not finite numbers.

    Raises:
        NonFiniteError: a value is NaN or infinite (named in the message).
    """
    for key, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"{what} {key!r} is {value}, not a finite number")


#: the privacy accountants a silo may report its spend with (Opacus's names)
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class PrivacySpend:
    """A silo's cumulative (epsilon, delta) on its training data in a job, and by which
    accountant; what it has spent including the update it is reported with."""

    epsilon: float
    delta: float
    accountant: str

    def check(self) -> None:
        """Raises ValidationError unless epsilon >= 0, delta in [0, 1), both finite, and the
        accountant is one of :data:`ACCOUNTANTS`."""
        if not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise ValidationError(f"privacy epsilon must be finite and >= 0, got {self.epsilon}")
        if not math.isfinite(self.delta) or not 0 <= self.delta < 1:
            raise ValidationError(f"privacy delta must be in [0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValidationError(
                f"privacy accountant must be one of {', '.join(ACCOUNTANTS)}, "
                f"got {self.accountant!r}"
            )


@dataclass(frozen=True)
class UpdateHeader:
    """Everything about a training update except its weights (the first upload message).

    Attributes:
        task_id: the task the update answers.
        round: the task's round (checked against the task's own).
        num_examples: the silo's training examples, the update's FedAvg weight.
        train_metrics: the silo's training figures (``loss``, ``accuracy``); finite.
        train_seconds: the silo's local training time.
        privacy: the silo's cumulative privacy spend in the job; None without DP.
    """

    task_id: str
    round: int
    num_examples: int
    train_metrics: Mapping[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    privacy: PrivacySpend | None = None

    def check(self) -> None:
        """Checks what can be checked without the task: a positive count, finite figures.

        Raises:
            ValidationError: ``num_examples`` is not positive.
            NonFiniteError: a training metric or the training time is not finite.
        """
        if self.num_examples <= 0:
            raise ValidationError(f"num_examples must be positive, got {self.num_examples}")
        check_metrics(self.train_metrics, what="training metric")
        if not math.isfinite(self.train_seconds) or self.train_seconds < 0:
            raise NonFiniteError(
                f"train_seconds is {self.train_seconds}, not a finite non-negative number"
            )
        if self.privacy is not None:
            self.privacy.check()


@dataclass(frozen=True)
class UploadResult:
    """The last reply of an upload: whether the update was accepted."""

    accepted: bool
    message: str


@dataclass(frozen=True)
class EvaluationReport:
    """A silo's federated evaluation of a round's global model."""

    task_id: str
    round: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Decline:
    """A silo declines (or failed) a task.

    Attributes:
        task_id: the task.
        reason: why, in words; shown to the admin verbatim.
        kind: a label from :data:`gptfl.errors.DECLINE_KINDS`; declines are counted by it.
    """

    task_id: str
    reason: str
    kind: str = "refused"


#: what a silo answers a secure-aggregation key stage with: its signed keys (advertise), its
#: sealed shares, one per neighbour (share), or its unmasking shares (unmask)
SecAggPayload = KeyAdvertisement | tuple[ShareEnvelope, ...] | UnmaskReply


@dataclass(frozen=True)
class SecAggSubmission:
    """A silo's answer to one task of a secure-aggregation key stage.

    Attributes:
        task_id: the task.
        payload: the answer; which stage it answers follows from its type (:attr:`kind`).
    """

    task_id: str
    payload: SecAggPayload

    @property
    def kind(self) -> TaskKind:
        """The kind of task this answers."""
        if isinstance(self.payload, KeyAdvertisement):
            return TaskKind.SECAGG_ADVERTISE
        if isinstance(self.payload, UnmaskReply):
            return TaskKind.SECAGG_UNMASK
        return TaskKind.SECAGG_SHARE
