"""The one exception hierarchy of GPT-FL.

Every error a peer can cause carries the gRPC status code it maps to, so servicers translate
domain errors to statuses in one place (:func:`gptfl.rpc.abort`) and clients show the same
precise message a server produced. CLIs turn :class:`GptflError` into a one-line message
and the exit code in :data:`EXIT_CODES`.
"""

from __future__ import annotations

import grpc


class GptflError(Exception):
    """Base of every GPT-FL error."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: short, stable, low-cardinality label used in metrics (e.g. rejected updates by reason)
    reason: str = "internal"


class ConfigError(GptflError):
    """A config file or job spec is malformed, has an unknown key, or a bad value."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "bad_config"


class ValidationError(GptflError):
    """A message from a peer is malformed (wrong names, shapes, dtypes, values)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid"


class ManifestMismatchError(ValidationError):
    """Tensor names, shapes or dtypes differ from what the receiver expects."""

    reason = "manifest_mismatch"


class NonFiniteError(ValidationError):
    """A tensor holds NaN or infinity."""

    reason = "non_finite"


class ExcessClaimError(ValidationError):
    """An update or an evaluation report claims more examples than its silo registered for the
    job (the count is a FedAvg weight, so it is bounded by what the coordinator was told)."""

    reason = "excess_claim"


class WeightRangeError(ValidationError):
    """An update holds a finite value beyond the range the round's aggregation can add up
    exactly (far beyond any value the global model holds)."""

    reason = "weight_range"


class MetricRangeError(ValidationError):
    """A reported metric lies outside its range (an accuracy outside [0, 1], a negative loss)."""

    reason = "metric_range"


class UpdateNormError(ValidationError):
    """An update lies farther from the global model (L2) than the job's ``update_bounds``."""

    reason = "update_norm"


class ChunkOrderError(ValidationError):
    """A chunk arrived out of order, overlapping, or past the declared size."""

    reason = "chunk_order"


class ChecksumError(GptflError):
    """A chunk's crc32 or the payload's digest (BLAKE3) does not match."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "checksum"


class StaleTaskError(GptflError):
    """The task is not this silo's current one (old round, finished, or unknown)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "stale_task"


class UnknownTaskError(GptflError):
    """No task with this id exists."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "unknown_task"


class NotFoundError(GptflError):
    """The named thing (a dataset, a generator) does not exist on the service asked."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class DuplicateUpdateError(GptflError):
    """This task's result was already accepted; it is never counted twice."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "duplicate"


class PermissionDeniedError(GptflError):
    """The caller's certificate does not allow this call (wrong role, another silo's task)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class UnauthenticatedError(GptflError):
    """The caller presented no usable identity."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class JobStateError(GptflError):
    """The request does not fit the job's state (a job already running, none to stop, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "job_state"


class ModelMismatchError(GptflError):
    """An architecture name means a different model at the caller (another provider, version
    or parameter layout), so their updates could not be averaged with the others."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "model_mismatch"


class ResourceLimitError(GptflError):
    """A payload is larger than the receiver accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "too_large"


class CancelledError(GptflError):
    """The caller went away (cancelled, deadline passed) and the work was abandoned."""

    code = grpc.StatusCode.CANCELLED
    reason = "cancelled"


class StalledUploadError(GptflError):
    """An admitted upload sent nothing for longer than the coordinator's stall timeout, so the
    coordinator ended it to free its upload slot."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "stalled"


class UnavailableError(GptflError):
    """A service is unavailable: one this one depends on (the synth service, the Kubernetes
    API) did not answer or was not SERVING in time, or this one is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"


class PrivacyPolicyError(GptflError):
    """An update does not meet the job's privacy requirement (``require_dp``)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "privacy"


class TaskRefused(GptflError):
    """A silo will not run a task (its privacy budget, data it lacks, ...).

    Raised by a silo's trainer before it trains; the agent declines the task with the
    message verbatim and ``kind`` as a short label the coordinator counts by (see
    :data:`DECLINE_KINDS`).
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "refused"

    def __init__(self, message: str, *, kind: str = "refused") -> None:
        super().__init__(message)
        if kind not in DECLINE_KINDS:
            raise ValueError(f"unknown decline kind {kind!r}; add it to DECLINE_KINDS")
        self.kind = kind


#: the labels a silo declines a task with. The coordinator counts declines by these (a label
#: it does not know counts as ``other``), so the metric's cardinality stays bounded whatever a
#: silo sends; the reason text travels verbatim beside it.
DECLINE_KINDS = (
    "refused",  # the trainer refused the task (the reason says why)
    "privacy_budget",  # the task would exceed the silo's privacy budget
    "no_data",  # the silo holds no data for the task (e.g. no evaluation split)
    "failed",  # the silo tried and failed (details stay in the silo's log)
    "secure_aggregation",  # what the coordinator relayed breaks the protocol (reason says how)
    "other",
)


class SecureAggregationError(ValidationError):
    """A secure-aggregation message breaks the protocol: a replay from another round, a peer
    outside the round, shares a silo cannot hold, both kinds of share of one peer."""

    reason = "secagg_protocol"


class PeerKeyError(GptflError):
    """A silo's advertised secure-aggregation keys are not signed by the key of a certificate
    that chains to the CA and names that silo."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "secagg_auth"


class BelowThresholdError(GptflError):
    """Too few silos (or shares) remain for secure aggregation to go on: the round fails and
    the global model is left as it was."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "secagg_threshold"


class PkiError(GptflError):
    """Certificates or keys are missing, unreadable or inconsistent."""

    reason = "pki"


#: exit codes of the command-line tools (documented in docs/cli.md)
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4
EXIT_JOB_FAILED = 5


def all_reasons() -> list[str]:
    """Every ``reason`` label an error can carry (metrics pre-create these series).

    Reasons are defined here only (subclasses elsewhere reuse them), so the list does not
    depend on which modules a process happens to have imported.
    """
    return sorted(
        {
            cls.reason
            for cls in globals().values()
            if isinstance(cls, type) and issubclass(cls, GptflError)
        }
    )
