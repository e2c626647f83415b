"""Prometheus metrics of the silo agent (see coordinator/metrics.py for the conventions)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

TRAIN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
#: how a task ended: done; declined (the silo would not run it: its trainer refused, or no
#: data for it); failed (a local error); rejected (the coordinator refused the result)
OUTCOMES = ("done", "declined", "failed", "rejected")


@dataclass(frozen=True)
class SiloMetrics:
    registry: CollectorRegistry
    train_seconds: Histogram
    examples: Counter
    bytes_sent: Counter
    bytes_received: Counter
    tasks: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> SiloMetrics:
        reg = registry if registry is not None else CollectorRegistry()
        metrics = cls._build(reg)
        for kind in ("train", "evaluate"):
            for outcome in OUTCOMES:
                metrics.tasks.labels(kind=kind, outcome=outcome)
        return metrics

    @classmethod
    def _build(cls, reg: CollectorRegistry) -> SiloMetrics:
        return cls(
            registry=reg,
            train_seconds=Histogram(
                "gptfl_silo_train_seconds",
                "Wall time of each local training run.",
                buckets=TRAIN_BUCKETS,
                registry=reg,
            ),
            examples=Counter(
                "gptfl_silo_examples_total", "Examples trained on, summed over tasks.", registry=reg
            ),
            bytes_sent=Counter(
                "gptfl_silo_bytes_sent_total", "Weight payload bytes uploaded.", registry=reg
            ),
            bytes_received=Counter(
                "gptfl_silo_bytes_received_total", "Weight payload bytes downloaded.", registry=reg
            ),
            tasks=Counter(
                "gptfl_silo_tasks_total",
                "Tasks handled, by kind and outcome.",
                ["kind", "outcome"],
                registry=reg,
            ),
        )
