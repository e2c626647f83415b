"""A typed client of the synth service (the coordinator's pretrain phase and ``gptfl synth``).

Both calls are long server streams: :meth:`SynthClient.generate` reports progress and returns
the stored dataset's description; :meth:`SynthClient.pretrain` reports every epoch and returns
the trained weights, verified chunk by chunk (crc32, BLAKE3 digest, names/shapes/dtypes when the
caller says what to expect, finiteness) before they are handed out.

A failed call raises the :class:`grpc.RpcError` as it came from the service (its status code
and one-line message say precisely what was wrong); callers map it to their own outcome. A
stream that ends without its final message, or with weights that do not verify, raises a
:class:`~gptfl.errors.GptflError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gptfl import serde
from gptfl.errors import UnavailableError, ValidationError
from gptfl.identity import insecure_metadata
from gptfl.models import ModelSpec
from gptfl.pki import Identity, TlsFiles
from gptfl.proto.v1 import synth_pb2, synth_pb2_grpc
from gptfl.retry import Backoff
from gptfl.rpc import open_channel
from gptfl.synth_spec import GeneratorSettings, PretrainSettings, SynthesisRequest
from gptfl.weights import PayloadReceiver, TensorSpec, WeightMap

log = logging.getLogger(__name__)

#: default deadline of a Generate or Pretrain call (a large text-to-image job takes hours)
LONG_CALL_TIMEOUT_S = 6 * 3600.0
#: deadline of one health check while waiting for the service
HEALTH_CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SynthProgress:
    """A progress report of a running call.

    Attributes:
        stage: ``"prompts"``, ``"load"``, ``"generate"``, ``"store"`` or ``"pretrain"``.
        done: units done in this stage (images, epochs).
        total: units in this stage.
        message: a human-readable line.
    """

    stage: str
    done: int
    total: int
    message: str


@dataclass(frozen=True)
class DatasetInfo:
    """A stored synthetic dataset, as Generate reports it.

    Attributes:
        dataset_id: the dataset's sha256 over its shards; Pretrain takes it.
        manifest_sha256: sha256 of the manifest's canonical JSON (provenance).
        generator_id: the generator's name (its folder).
        generator_hash: sha256 over the generator's files.
        images: images in the dataset.
        counts: images per label name.
        seconds: wall time of the call on the service.
        device: where it ran (``"cpu"``, ``"cuda:0"``).
    """

    dataset_id: str
    manifest_sha256: str
    generator_id: str
    generator_hash: str
    images: int
    counts: dict[str, int]
    seconds: float
    device: str


@dataclass(frozen=True)
class EpochInfo:
    """One pretraining epoch's metrics (validation on the held-out synthetic split)."""

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class PretrainOutcome:
    """The result of Pretrain.

    Attributes:
        weights: the trained weights (verified), tensor name -> tensor.
        epochs: per-epoch metrics, first epoch first.
        dataset_id: the dataset trained on.
        initial_val_accuracy: validation accuracy of the freshly initialised model.
        final_val_accuracy: validation accuracy after the last epoch.
        seconds: wall time of the call on the service.
        device: where it trained.
    """

    weights: WeightMap
    epochs: list[EpochInfo]
    dataset_id: str
    initial_val_accuracy: float
    final_val_accuracy: float
    seconds: float
    device: str


class SynthClient:
    """Calls the synth service over mutual TLS with a coordinator (or admin) certificate.

    With ``tls=None`` the channel is plaintext (development only) and the calls name the
    caller as role ``coordinator`` in the ``x-gptfl-identity`` metadata.
    """

    def __init__(
        self, address: str, *, tls: TlsFiles | None, server_name: str | None = None
    ) -> None:
        self.address = address
        self._channel = open_channel(address, tls=tls, server_name=server_name)
        self._stub = synth_pb2_grpc.SynthStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (
            insecure_metadata(Identity("coordinator", "coordinator")) if tls is None else ()
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SynthClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout_s: float) -> None:
        """Polls the standard health service until it reports SERVING.

        A readiness poll, not a retry, so it stays a loop rather than a gRPC retry policy:
        ``NOT_SERVING`` (still loading a generator) is an answer gRPC would not retry, and the
        wait is bounded by ``timeout_s``, not by a number of attempts. The synth calls
        themselves are streams (Generate, Pretrain), which gRPC does not retry either.

        Raises:
            UnavailableError: not SERVING within ``timeout_s`` (unreachable, a TLS
                failure, or still loading).
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        for delay in Backoff(initial_s=0.1, maximum_s=2.0).delays():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply = self._health.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=min(HEALTH_CHECK_TIMEOUT_S, remaining),
                )
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            else:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        raise UnavailableError(
            f"synth service at {self.address} not serving after {timeout_s:g}s ({last})"
        )

    def generate(
        self,
        *,
        backend: str,
        generator: str,
        request: SynthesisRequest,
        generator_settings: GeneratorSettings | None = None,
        on_progress: Callable[[SynthProgress], None] | None = None,
        timeout_s: float = LONG_CALL_TIMEOUT_S,
    ) -> DatasetInfo:
        """Generates and stores a synthetic dataset on the service.

        Args:
            backend: ``"class-conditional"`` or ``"text-to-image"``.
            generator: a generator folder under the service's models_dir (``"digits"`` is
                the bundled digits generator).
            request: labels, counts, target shape, seed, prompts and guidance.
            generator_settings: sampling settings; None uses the backend's defaults.
            on_progress: called with every progress report; raising from it cancels the call.
            timeout_s: deadline of the whole call.

        Raises:
            grpc.RpcError: the service refused or failed the call.
            ValidationError: the stream ended without the dataset's description.
        """
        pb_request = synth_pb2.GenerateRequest(
            backend=backend,
            generator=generator,
            request_json=request.model_dump_json(),
            generator_json=(
                generator_settings.model_dump_json() if generator_settings is not None else ""
            ),
        )
        call = self._stub.Generate(pb_request, timeout=timeout_s, metadata=self._metadata)
        with _cancel_on_error(call):
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(_progress_from_pb(event.progress))
                elif kind == "dataset":
                    info = _dataset_from_pb(event.dataset)
                    # a proto map has no order: give the counts in label order
                    ordered = {k: info.counts[k] for k in request.labels if k in info.counts}
                    ordered.update(info.counts)
                    return dataclasses.replace(info, counts=ordered)
        raise ValidationError("the synth service ended Generate without describing a dataset")

    def pretrain(
        self,
        *,
        dataset_id: str,
        model: ModelSpec,
        settings: PretrainSettings,
        expected: Sequence[TensorSpec] | None = None,
        on_epoch: Callable[[EpochInfo], None] | None = None,
        timeout_s: float = LONG_CALL_TIMEOUT_S,
    ) -> PretrainOutcome:
        """Trains ``model`` on a stored dataset and receives the weights.

        Args:
            dataset_id: a ``DatasetInfo.dataset_id`` from :meth:`generate`.
            model: the downstream model's architecture and shapes.
            settings: optimizer, schedule, epochs, augmentation, split and seed.
            expected: the tensors the weights must hold (names, shapes, dtypes); checked
                against the manifest before any chunk is accepted.
            on_epoch: called after every epoch; raising from it cancels the call.
            timeout_s: deadline of the whole call.

        Raises:
            grpc.RpcError: the service refused or failed the call.
            GptflError: the weights do not verify (ManifestMismatchError, ChecksumError,
                ChunkOrderError, NonFiniteError) or the stream is incomplete
                (ValidationError).
        """
        pb_request = synth_pb2.PretrainRequest(
            dataset_id=dataset_id,
            model=serde.model_spec_to_pb(model),
            settings_json=settings.model_dump_json(),
        )
        call = self._stub.Pretrain(pb_request, timeout=timeout_s, metadata=self._metadata)
        epochs: list[EpochInfo] = []
        receiver: PayloadReceiver | None = None
        weights: WeightMap | None = None
        with _cancel_on_error(call):
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "epoch":
                    info = _epoch_from_pb(event.epoch)
                    epochs.append(info)
                    if on_epoch is not None:
                        on_epoch(info)
                elif kind == "weights":
                    part = event.weights
                    if part.WhichOneof("part") == "manifest":
                        if receiver is not None:
                            raise ValidationError("Pretrain sent a second weight manifest")
                        receiver = PayloadReceiver(
                            serde.manifest_from_pb(part.manifest), expected=expected
                        )
                    elif receiver is None:
                        raise ValidationError("Pretrain sent a weight chunk before the manifest")
                    else:
                        receiver.add(serde.chunk_from_pb(part.chunk))
                elif kind == "summary":
                    if receiver is None:
                        raise ValidationError("Pretrain finished without sending weights")
                    weights = receiver.finish()
                    summary = event.summary
                    return PretrainOutcome(
                        weights=weights,
                        epochs=epochs,
                        dataset_id=summary.dataset_id,
                        initial_val_accuracy=summary.initial_val_accuracy,
                        final_val_accuracy=summary.final_val_accuracy,
                        seconds=summary.seconds,
                        device=summary.device,
                    )
        raise ValidationError("the synth service ended Pretrain without its summary")


@contextlib.contextmanager
def _cancel_on_error(call: Any) -> Iterator[None]:
    """Cancels a streaming call when its consumer stops early (a callback raised, the
    weights did not verify), so the service stops working for nobody."""
    try:
        yield
    except grpc.RpcError:
        raise
    except BaseException:
        call.cancel()
        raise


def _progress_from_pb(pb: synth_pb2.Progress) -> SynthProgress:
    return SynthProgress(stage=pb.stage, done=pb.done, total=pb.total, message=pb.message)


def _dataset_from_pb(pb: synth_pb2.DatasetInfo) -> DatasetInfo:
    return DatasetInfo(
        dataset_id=pb.dataset_id,
        manifest_sha256=pb.manifest_sha256,
        generator_id=pb.generator_id,
        generator_hash=pb.generator_hash,
        images=pb.images,
        counts={k: int(v) for k, v in pb.counts.items()},
        seconds=pb.seconds,
        device=pb.device,
    )


def _epoch_from_pb(pb: synth_pb2.EpochMetrics) -> EpochInfo:
    return EpochInfo(
        epoch=pb.epoch,
        epochs=pb.epochs,
        train_loss=pb.train_loss,
        val_loss=pb.val_loss,
        val_accuracy=pb.val_accuracy,
        seconds=pb.seconds,
    )


__all__ = [
    "DatasetInfo",
    "EpochInfo",
    "PretrainOutcome",
    "SynthClient",
    "SynthProgress",
]
