"""The GPT-FL pretrain phase: the job's first global model, trained on synthetic data.

Before round 1 of a job with a ``pretrain`` section the coordinator, with its own mutual-TLS
identity, asks the synth service to

1. **Generate** a synthetic dataset from the job's label names (the service stores it as an
   artifact with a manifest), then
2. **Pretrain** the job's model on it; the weights come back in verified chunks and are
   checked against the architecture's tensors (names, shapes, dtypes) before use.

The whole phase runs inside :func:`coordinator.synth_scaler.synth_scaled_up`, so in a
Kubernetes cluster the GPU Deployment is up only for the phase and always scaled back down.
Progress goes to the job's status (``gptfl admin status``); provenance (generator id and
hash, dataset id, manifest hash, per-epoch metrics) is returned for the job state, the final
model's metadata, ``summary.json`` and ``report.md``.

A failure (service unreachable, a request it refuses, weights that do not verify) fails the
job with one line naming the step and the service's status, or, with
``on_failure: random``, falls back to a seeded random initialisation and says so.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from coordinator.config import CoordinatorConfig
from coordinator.initial_model import random_initial_model
from coordinator.job_runner import JobFailed, JobInterrupted
from coordinator.job_state import finite_or_none, percent
from coordinator.synth_scaler import (
    NoopSynthScaler,
    SynthScaler,
    scaler_from_config,
    synth_scaled_up,
)
from gptfl.errors import ConfigError, GptflError
from gptfl.job_spec import JobSpec, PretrainSpec
from gptfl.models import ModelSpec, build_model
from gptfl.pki import TlsFiles
from gptfl.synth_client import DatasetInfo, EpochInfo, PretrainOutcome, SynthClient, SynthProgress
from gptfl.synth_spec import GeneratorSettings, PretrainSettings, SynthesisRequest
from gptfl.weights import TensorSpec, WeightMap, build_manifest, check_manifest, specs_of

log = logging.getLogger(__name__)

#: at most one status update per this many seconds while images are generated
PROGRESS_INTERVAL_S = 1.0


class PhaseHost(Protocol):
    """What the phase needs of the job it runs for (the :class:`JobRunner`)."""

    @property
    def job_id(self) -> str: ...

    @property
    def spec(self) -> JobSpec: ...

    @property
    def stop_requested(self) -> bool: ...

    def report_pretrain(self, message: str) -> None:
        """Sets the job's phase to ``pretrain`` with ``message`` as its status line."""
        ...


class SynthCalls(Protocol):
    """The calls the phase makes (:class:`gptfl.synth_client.SynthClient`; fakes in tests)."""

    def wait_ready(self, timeout_s: float) -> None: ...

    def generate(
        self,
        *,
        backend: str,
        generator: str,
        request: SynthesisRequest,
        generator_settings: GeneratorSettings | None = None,
        on_progress: Callable[[SynthProgress], None] | None = None,
        timeout_s: float = ...,
    ) -> DatasetInfo: ...

    def pretrain(
        self,
        *,
        dataset_id: str,
        model: ModelSpec,
        settings: PretrainSettings,
        expected: Sequence[TensorSpec] | None = None,
        on_epoch: Callable[[EpochInfo], None] | None = None,
        timeout_s: float = ...,
    ) -> PretrainOutcome: ...

    def close(self) -> None: ...


#: opens a client: (address, TLS files, TLS server name) -> calls
ClientFactory = Callable[[str, TlsFiles | None, str | None], SynthCalls]


def open_synth_client(address: str, tls: TlsFiles | None, server_name: str | None) -> SynthCalls:
    return SynthClient(address, tls=tls, server_name=server_name)


@dataclass(frozen=True)
class SynthAccess:
    """How this coordinator reaches (and, in Kubernetes, scales) the synth service.

    Attributes:
        address: the coordinator config's ``synth.address`` (None: not configured; a job
            must then name ``pretrain.synth``).
        server_name: TLS name to expect when it differs from the address's host.
        tls: the coordinator's own identity (None: plaintext, development only).
        scaler: builds the scaler for one phase (a no-op outside Kubernetes).
        scale_timeout_s: how long a scale-up may take until the pod is ready.
        client_factory: opens the client (replaced in tests).
    """

    address: str | None
    server_name: str | None
    tls: TlsFiles | None
    scaler: Callable[[], SynthScaler]
    scale_timeout_s: float
    client_factory: ClientFactory = open_synth_client

    @classmethod
    def from_config(cls, config: CoordinatorConfig) -> SynthAccess:
        kube = config.kubernetes
        return cls(
            address=config.synth.address if config.synth is not None else None,
            server_name=config.synth.server_name if config.synth is not None else None,
            tls=config.tls.files() if config.tls is not None else None,
            scaler=lambda: scaler_from_config(
                scale_synth=kube.scale_synth,
                namespace=kube.namespace,
                deployment=kube.deployment,
            ),
            scale_timeout_s=kube.ready_timeout_s,
        )

    def target(self, pretrain: PretrainSpec) -> tuple[str, str | None]:
        """The address and TLS server name a job's phase calls.

        Raises:
            ConfigError: neither the job nor the coordinator config names the service.
        """
        if pretrain.synth is not None:
            # The configured server name belongs to the configured address only.
            same = pretrain.synth == self.address
            return pretrain.synth, self.server_name if same else None
        if self.address is None:
            raise ConfigError(
                "the job has a pretrain section but names no pretrain.synth address, and this "
                "coordinator's config has no synth: section"
            )
        return self.address, self.server_name


def run_pretrain_phase(host: PhaseHost, access: SynthAccess) -> tuple[WeightMap, dict[str, Any]]:
    """Runs Generate and Pretrain for ``host``'s job; returns the weights and provenance.

    Raises:
        JobFailed: the phase failed and ``on_failure`` is ``fail`` (the message names the
            step and the cause).
        JobInterrupted: the job was stopped (or the coordinator is shutting down) meanwhile.
    """
    spec = host.spec
    pretrain = spec.pretrain
    if pretrain is None:
        raise ValueError("the job has no pretrain section")
    try:
        return _run(host, spec, pretrain, access)
    except _PhaseError as exc:  # JobInterrupted is none of these: it passes through
        reason = str(exc)
    if pretrain.on_failure == "fail":
        raise JobFailed(f"pretrain phase failed: {reason}")
    log.warning(
        "job %s: pretrain phase failed (%s); starting from a random initialisation "
        "(pretrain.on_failure: random)",
        host.job_id,
        reason,
    )
    weights, provenance = random_initial_model(spec)
    provenance["fallback"] = {"from": "pretrain", "reason": reason}
    host.report_pretrain(
        f"pretrain phase failed ({reason}); starting from a random initialisation "
        "(on_failure: random)"
    )
    return weights, provenance


class _PhaseError(Exception):
    """One step of the phase failed; the message says which and why."""


def _run(
    host: PhaseHost, spec: JobSpec, pretrain: PretrainSpec, access: SynthAccess
) -> tuple[WeightMap, dict[str, Any]]:
    try:
        address, server_name = access.target(pretrain)
        scaler = access.scaler()
    except ConfigError as exc:
        raise _PhaseError(str(exc)) from exc
    expected = specs_of(build_model(spec.model).state_dict())
    request = pretrain.synthesis_request(spec.model)
    settings = pretrain.training
    started = time.monotonic()
    step = "scaling up the synth service"
    if not isinstance(scaler, NoopSynthScaler):
        host.report_pretrain(f"scaling up the synth service for {address}")
    try:
        with synth_scaled_up(scaler, access.scale_timeout_s):
            client = access.client_factory(address, access.tls, server_name)
            try:
                step = "waiting for the synth service"
                host.report_pretrain(f"waiting for the synth service at {address}")
                client.wait_ready(pretrain.ready_timeout_s)
                step = "Generate"
                dataset = client.generate(
                    backend=pretrain.backend,
                    generator=pretrain.generator,
                    request=request,
                    generator_settings=pretrain.generator_settings,
                    on_progress=_GenerateProgress(host),
                    timeout_s=pretrain.generate_timeout_s,
                )
                log.info(
                    "job %s: synthetic dataset %s: %d images from %s (%s) in %.1fs on %s",
                    host.job_id,
                    dataset.dataset_id[:12],
                    dataset.images,
                    dataset.generator_id,
                    dataset.generator_hash[:12],
                    dataset.seconds,
                    dataset.device,
                )
                step = "Pretrain"
                host.report_pretrain(
                    f"pretraining {spec.model.arch} on {dataset.images} synthetic images"
                )
                outcome = client.pretrain(
                    dataset_id=dataset.dataset_id,
                    model=spec.model,
                    settings=settings,
                    expected=expected,
                    on_epoch=_EpochProgress(host, spec.model.arch, dataset.images),
                    timeout_s=pretrain.pretrain_timeout_s,
                )
            finally:
                client.close()
    except grpc.RpcError as exc:
        raise _PhaseError(f"{step} at {address}: {_describe_rpc_error(exc)}") from exc
    except GptflError as exc:
        raise _PhaseError(f"{step} at {address}: {exc}") from exc
    # The client checked the manifest against ``expected`` already; this also proves the
    # weights are exactly the architecture's (no missing or extra tensors), cheaply.
    manifest = build_manifest(outcome.weights)
    try:
        check_manifest(manifest, expected=expected)
    except GptflError as exc:
        raise _PhaseError(f"the pretrained weights do not fit {spec.model.arch}: {exc}") from exc
    provenance = _provenance(
        address=address,
        pretrain=pretrain,
        request=request,
        settings=settings,
        dataset=dataset,
        outcome=outcome,
        weights_digest=manifest.digest,
        seconds=time.monotonic() - started,
    )
    host.report_pretrain(
        f"pretrained on {dataset.images} synthetic images: synthetic validation accuracy "
        f"{percent(outcome.final_val_accuracy)}"
    )
    return outcome.weights, provenance


class _GenerateProgress:
    """Turns Generate's progress into the job's status line (throttled)."""

    def __init__(self, host: PhaseHost) -> None:
        self._host = host
        self._last = -math.inf
        self._started = time.monotonic()

    def __call__(self, progress: SynthProgress) -> None:
        if self._host.stop_requested:
            raise JobInterrupted("stop requested during Generate")
        now = time.monotonic()
        final = progress.total > 0 and progress.done >= progress.total
        if now - self._last < PROGRESS_INTERVAL_S and not final:
            return
        self._last = now
        if progress.stage == "generate" and progress.total:
            rate = progress.done / max(now - self._started, 1e-9)
            self._host.report_pretrain(
                f"generating synthetic images: {progress.done}/{progress.total} "
                f"({rate:.1f} images/s)"
            )
        else:
            detail = progress.message or (
                f"{progress.done}/{progress.total}" if progress.total else ""
            )
            self._host.report_pretrain(f"{progress.stage}: {detail}".rstrip(": "))


class _EpochProgress:
    def __init__(self, host: PhaseHost, arch: str, images: int) -> None:
        self._host = host
        self._arch = arch
        self._images = images

    def __call__(self, epoch: EpochInfo) -> None:
        if self._host.stop_requested:
            raise JobInterrupted("stop requested during Pretrain")
        self._host.report_pretrain(
            f"pretraining {self._arch} on {self._images} synthetic images: epoch "
            f"{epoch.epoch}/{epoch.epochs}, synthetic val acc {percent(epoch.val_accuracy)}"
        )


def _provenance(
    *,
    address: str,
    pretrain: PretrainSpec,
    request: SynthesisRequest,
    settings: PretrainSettings,
    dataset: DatasetInfo,
    outcome: PretrainOutcome,
    weights_digest: str,
    seconds: float,
) -> dict[str, Any]:
    """The record kept in the job state, the model metadata, summary.json and the report."""
    return {
        "kind": "pretrain",
        "blake3": weights_digest,
        "seconds": seconds,
        "synth": address,
        "backend": pretrain.backend,
        "generator": pretrain.generator,
        "generator_id": dataset.generator_id,
        "generator_hash": dataset.generator_hash,
        "dataset_id": dataset.dataset_id,
        "manifest_sha256": dataset.manifest_sha256,
        "images": dataset.images,
        "counts": dict(sorted(dataset.counts.items())),
        "request": request.model_dump(mode="json"),
        "generator_settings": pretrain.generator_settings.model_dump(mode="json"),
        "generate": {"seconds": dataset.seconds, "device": dataset.device},
        "pretrain": {
            "settings": settings.model_dump(mode="json"),
            "seconds": outcome.seconds,
            "device": outcome.device,
            "initial_val_accuracy": finite_or_none(outcome.initial_val_accuracy),
            "final_val_accuracy": finite_or_none(outcome.final_val_accuracy),
            "epochs": [
                {
                    "epoch": e.epoch,
                    "train_loss": finite_or_none(e.train_loss),
                    "val_loss": finite_or_none(e.val_loss),
                    "val_accuracy": finite_or_none(e.val_accuracy),
                    "seconds": e.seconds,
                }
                for e in outcome.epochs
            ],
        },
    }


def _describe_rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return f"{name}: {details or 'no details'}"
