"""What a silo may claim in a round, bounded by what the coordinator was told.

A silo's training-example count is its FedAvg weight, so the coordinator never takes it on
trust: an update may claim at most the training examples its silo registered for the job,
an evaluation report at most the evaluation examples.

**Which registration counts.** A silo's counts are *pinned* when it is first selected in a
job (kept in the job's state, so a restarted coordinator keeps them): later it may register
lower counts (its bound goes down with them) but never raise its bound above the pin. Were
the bound the count registered when each task is made, a hostile silo could register
10^12 examples between two rounds and weigh 10^12 from the next one; pinned, it can only
claim the size it showed when it joined, which an admin can see (``gptfl admin silos``)
before the job starts. An honest silo whose data grows mid-job counts with its first size
until the next job.

**max_weight_fraction.** Updates are folded as they arrive, before the round knows who else
will report, so the cap is set against what the round expects: silo ``i``'s weight is at
most ``f / (1 - f)`` times the summed bounds of the *other* selected silos, which caps its
share at ``f`` of the round's expected total (its own capped weight plus the others' full
bounds). The cap is fixed when the round opens and does not depend on arrival order. When
other silos drop out or claim less, a silo's share of what did arrive can exceed ``f``; a
re-weighting at the close would need every update kept, which only the robust strategies do.
Against the cap a silo gains nothing by inflating its registered count: its weight is set by
the others' counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coordinator.job_state import SiloSummary
from coordinator.silo_registry import SiloRecord
from gptfl.errors import ExcessClaimError, MetricRangeError, ValidationError
from gptfl.fleet_messages import EvaluationReport, check_metrics


@dataclass(frozen=True)
class SiloBounds:
    """One selected silo's bounds for the round."""

    #: the most training examples an update may claim
    train_examples: int
    #: the most examples an evaluation report may claim
    eval_examples: int
    #: the most FedAvg weight an update gets (``train_examples`` without a weight cap)
    max_weight: int


@dataclass(frozen=True)
class RoundClaims:
    """The bounds of every silo selected for a round, fixed when the round opens."""

    silos: Mapping[str, SiloBounds]
    max_weight_fraction: float | None = None

    @classmethod
    def of(
        cls,
        counts: Mapping[str, tuple[int, int]],
        *,
        max_weight_fraction: float | None = None,
    ) -> RoundClaims:
        """The bounds for silos with the given (training, evaluation) example bounds."""
        total = sum(train for train, _ in counts.values())
        silos: dict[str, SiloBounds] = {}
        for silo, (train, evaluation) in counts.items():
            weight = train
            if max_weight_fraction is not None and max_weight_fraction < 1:
                others = total - train
                # at least 1: a silo alone in its round weighs everything whatever its weight
                cap = max(1, math.floor(max_weight_fraction * others / (1 - max_weight_fraction)))
                weight = min(train, cap)
            silos[silo] = SiloBounds(train, evaluation, weight)
        return cls(silos, max_weight_fraction)

    @property
    def max_total_weight(self) -> int:
        """The most the round's folded weights can add up to (at least 1)."""
        return max(1, sum(bounds.max_weight for bounds in self.silos.values()))

    def _bounds(self, silo_id: str) -> SiloBounds:
        bounds = self.silos.get(silo_id)
        if bounds is None:  # the task board lets only selected silos reach here
            raise ExcessClaimError(f"silo {silo_id} was not selected for this round")
        return bounds

    def update_weight(self, silo_id: str, num_examples: int) -> int:
        """The FedAvg weight of an update claiming ``num_examples``.

        Raises:
            ExcessClaimError: the claim exceeds the silo's registered training examples.
        """
        bounds = self._bounds(silo_id)
        if num_examples > bounds.train_examples:
            raise ExcessClaimError(
                f"num_examples {num_examples} exceeds the {bounds.train_examples} training "
                f"examples silo {silo_id} registered for this job"
            )
        return min(num_examples, bounds.max_weight)

    def check_evaluation(self, silo_id: str, report: EvaluationReport) -> None:
        """Refuses an evaluation report that claims more than the silo could have measured.

        Raises:
            ValidationError: no examples, or no finite ``loss`` or ``accuracy``.
            ExcessClaimError: more examples than the silo registered for evaluation.
            MetricRangeError: an accuracy outside [0, 1] or a negative loss.
        """
        if report.num_examples <= 0:
            raise ValidationError("evaluation report has no examples")
        bounds = self._bounds(silo_id)
        if report.num_examples > bounds.eval_examples:
            raise ExcessClaimError(
                f"evaluation num_examples {report.num_examples} exceeds the "
                f"{bounds.eval_examples} evaluation examples silo {silo_id} registered for "
                f"this job"
            )
        check_evaluation_metrics(report.metrics)


def check_evaluation_metrics(metrics: Mapping[str, float]) -> None:
    """Every metric finite, ``loss`` >= 0 and ``accuracy`` in [0, 1] (both required).

    Raises:
        ValidationError: ``loss`` or ``accuracy`` is missing.
        NonFiniteError: a metric is not finite.
        MetricRangeError: ``loss`` or ``accuracy`` is outside its range.
    """
    for key in ("loss", "accuracy"):
        if key not in metrics:
            raise ValidationError(f"evaluation report lacks a finite {key!r}")
    check_metrics(metrics, what="evaluation metric")
    if metrics["loss"] < 0:
        raise MetricRangeError(f"evaluation loss {metrics['loss']:.6g} is negative")
    if not 0 <= metrics["accuracy"] <= 1:
        raise MetricRangeError(f"evaluation accuracy {metrics['accuracy']:.6g} is not in [0, 1]")


def pin_counts(
    summaries: dict[str, SiloSummary], records: Iterable[SiloRecord]
) -> dict[str, tuple[int, int]]:
    """The (training, evaluation) example bounds of the given silos for this round.

    A silo seen for the first time in the job has its registered counts pinned in its
    summary (``summaries`` is the job state's, guarded by the caller); afterwards its bound
    is the lower of the pin and what it registers now.
    """
    counts: dict[str, tuple[int, int]] = {}
    for record in records:
        summary = summaries.setdefault(record.silo_id, SiloSummary())
        if summary.registered_examples is None:
            summary.registered_examples = record.num_train_examples
        if summary.registered_eval_examples is None:
            summary.registered_eval_examples = record.num_eval_examples
        counts[record.silo_id] = (
            min(summary.registered_examples, record.num_train_examples),
            min(summary.registered_eval_examples, record.num_eval_examples),
        )
    return counts
