"""Prometheus metrics of the coordinator.

Names follow Prometheus conventions (``gptfl_`` prefix, ``_total`` / ``_seconds`` /
``_bytes`` suffixes); labels stay low-cardinality (silo ids are bounded by the PKI, reasons by
:mod:`gptfl.errors`). Each metric is registered on a registry the caller owns, so tests and
several coordinators in one process never collide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coordinator.job_state import Phase
from gptfl.errors import DECLINE_KINDS, all_reasons

ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True)
class CoordinatorMetrics:
    """The coordinator's metric objects, created together on one registry."""

    registry: CollectorRegistry
    rounds_completed: Counter
    round_duration: Histogram
    current_round: Gauge
    total_rounds: Gauge
    silos_connected: Gauge
    updates_accepted: Counter
    updates_rejected: Counter
    updates_clipped: Counter
    rounds_failed: Counter
    tasks_declined: Counter
    bytes_received: Counter
    bytes_sent: Counter
    aggregation_seconds: Histogram
    model_accuracy: Gauge
    model_loss: Gauge
    silo_last_round: Gauge
    silo_privacy_epsilon: Gauge
    job_privacy_epsilon: Gauge
    job_phase: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> CoordinatorMetrics:
        reg = registry if registry is not None else CollectorRegistry()
        metrics = cls._build(reg)
        # Series that exist from the start (at 0) make rates and alerts work before the
        # first rejection, and keep dashboards from showing "no data".
        for reason in all_reasons():
            metrics.updates_rejected.labels(reason=reason)
        for kind in DECLINE_KINDS:
            metrics.tasks_declined.labels(kind=kind)
        for phase in Phase:
            metrics.job_phase.labels(phase=phase.value).set(1 if phase is Phase.NO_JOB else 0)
        return metrics

    def begin_job(
        self,
        *,
        current_round: int,
        silo_last_rounds: Mapping[str, int],
        silo_epsilons: Mapping[str, float] | None = None,
    ) -> None:
        """A job starts or resumes: the per-job gauges show this job, not the one before.

        Per-silo rounds of an earlier job would make a silo that is absent from this one look
        ahead of it (a negative lag that keeps ``GptflSiloAbsent`` quiet); a resumed job
        brings back what its state recorded, which a restart would otherwise lose.
        """
        self.current_round.set(current_round)
        self.silo_last_round.clear()
        self.silo_privacy_epsilon.clear()
        for silo, last_round in silo_last_rounds.items():
            self.silo_last_round.labels(silo=silo).set(last_round)
        for silo, epsilon in (silo_epsilons or {}).items():
            self.silo_privacy_epsilon.labels(silo=silo).set(epsilon)

    @classmethod
    def _build(cls, reg: CollectorRegistry) -> CoordinatorMetrics:
        return cls(
            registry=reg,
            rounds_completed=Counter(
                "gptfl_rounds_completed_total", "FL rounds completed.", registry=reg
            ),
            round_duration=Histogram(
                "gptfl_round_duration_seconds",
                "Wall time of each FL round, task dispatch to checkpoint.",
                buckets=ROUND_BUCKETS,
                registry=reg,
            ),
            current_round=Gauge(
                "gptfl_current_round", "The round in progress (0 before the first).", registry=reg
            ),
            total_rounds=Gauge("gptfl_total_rounds", "Rounds the current job runs.", registry=reg),
            silos_connected=Gauge(
                "gptfl_silos_connected", "Silos seen within the heartbeat timeout.", registry=reg
            ),
            updates_accepted=Counter(
                "gptfl_updates_accepted_total",
                "Silo updates folded into an aggregate.",
                registry=reg,
            ),
            updates_rejected=Counter(
                "gptfl_updates_rejected_total",
                "Silo updates or reports rejected, by reason.",
                ["reason"],
                registry=reg,
            ),
            updates_clipped=Counter(
                "gptfl_updates_clipped_total",
                "Accepted silo updates scaled back onto the job's update norm bound.",
                registry=reg,
            ),
            rounds_failed=Counter(
                "gptfl_rounds_failed_total",
                "Rounds whose new global model was refused (not finite); the model stayed.",
                registry=reg,
            ),
            tasks_declined=Counter(
                "gptfl_tasks_declined_total",
                "Tasks silos declined, by the kind of reason they gave (privacy_budget, ...).",
                ["kind"],
                registry=reg,
            ),
            bytes_received=Counter(
                "gptfl_bytes_received_total",
                "Weight payload bytes received from each silo.",
                ["silo"],
                registry=reg,
            ),
            bytes_sent=Counter(
                "gptfl_bytes_sent_total",
                "Weight payload bytes sent to each silo.",
                ["silo"],
                registry=reg,
            ),
            aggregation_seconds=Histogram(
                "gptfl_aggregation_seconds",
                "Time spent folding updates and applying the strategy.",
                buckets=AGGREGATION_BUCKETS,
                registry=reg,
            ),
            model_accuracy=Gauge(
                "gptfl_global_model_accuracy",
                "Accuracy of the global model after the last round, by evaluation source.",
                ["source"],
                registry=reg,
            ),
            model_loss=Gauge(
                "gptfl_global_model_loss",
                "Loss of the global model after the last round, by evaluation source.",
                ["source"],
                registry=reg,
            ),
            silo_last_round=Gauge(
                "gptfl_silo_last_round",
                "The last round in which each silo's update was accepted.",
                ["silo"],
                registry=reg,
            ),
            silo_privacy_epsilon=Gauge(
                "gptfl_silo_privacy_epsilon",
                "The cumulative sample-level DP epsilon each silo reported with its last "
                "accepted update in this job.",
                ["silo"],
                registry=reg,
            ),
            job_privacy_epsilon=Gauge(
                "gptfl_job_privacy_epsilon",
                "Silo-level DP: the job's epsilon so far (DP-FedAvg on the aggregate).",
                registry=reg,
            ),
            job_phase=Gauge(
                "gptfl_job_phase",
                "1 for the job's current phase, 0 for the others.",
                ["phase"],
                registry=reg,
            ),
        )
