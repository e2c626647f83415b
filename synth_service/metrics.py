"""Prometheus metrics of the synth service (see coordinator/metrics.py for the conventions).

The service is scaled to zero between generate/pretrain phases, so its series exist only
while it runs; dashboards read them as gauges of the current phase rather than long totals.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class SynthMetrics:
    """The synth service's metric objects, created together on one registry."""

    registry: CollectorRegistry
    images_generated: Counter
    images_per_second: Gauge
    pretrain_epoch_accuracy: Gauge
    pretrain_epoch: Gauge
    gpu_memory_bytes: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> SynthMetrics:
        reg = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=reg,
            images_generated=Counter(
                "gptfl_synth_images_generated_total",
                "Synthetic images generated (after resizing to the task's input shape).",
                registry=reg,
            ),
            images_per_second=Gauge(
                "gptfl_synth_images_per_second",
                "Generation throughput over the last generated batch.",
                registry=reg,
            ),
            pretrain_epoch_accuracy=Gauge(
                "gptfl_synth_pretrain_epoch_accuracy",
                "Accuracy the downstream model reached in the last pretraining epoch.",
                registry=reg,
            ),
            pretrain_epoch=Gauge(
                "gptfl_synth_pretrain_epoch",
                "The last pretraining epoch completed (0 before the first).",
                registry=reg,
            ),
            gpu_memory_bytes=Gauge(
                "gptfl_synth_gpu_memory_bytes",
                "GPU memory allocated by the service (torch.cuda.memory_allocated); only "
                "updated on a GPU.",
                registry=reg,
            ),
        )
