"""The Synth gRPC servicer: a thin adapter between the wire and :class:`SynthEngine`.

Each call is checked in the calling thread (identity, JSON, the engine's ``plan_*``), so a
request that cannot be honoured fails at once with its precise status and nothing runs. The
work itself runs in a worker thread that holds the engine's one work slot; its progress
reaches the stream through a queue, so progress is sent while the model runs. A caller that
cancels (or whose deadline passes) stops the work at its next progress point.

Statuses (also in docs/synth-service.md):

- UNAUTHENTICATED: no usable client certificate; PERMISSION_DENIED: a role other than
  ``coordinator`` or ``admin``.
- INVALID_ARGUMENT: malformed JSON or values, unknown backend, a generator of another
  backend, a label the class-conditional generator does not know, unsupported guidance,
  unknown architecture, model shape or class count that differs from the dataset.
- NOT_FOUND: no such generator, no such dataset.
- RESOURCE_EXHAUSTED: too many images, not enough disk, out of GPU memory, or busy (another
  Generate or Pretrain is running and ``busy_wait_s`` passed).
- DATA_LOSS: a stored artifact failed its checksums.
- UNAVAILABLE: the service is shutting down. CANCELLED: the caller went away.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pydantic
import torch

from gptfl import serde
from gptfl.config_loading import StrictModel, format_validation_error
from gptfl.errors import GptflError, ResourceLimitError, ValidationError
from gptfl.identity import caller_identity, require_role
from gptfl.proto.v1 import synth_pb2, synth_pb2_grpc
from gptfl.rpc import maps_stream_errors
from gptfl.synth_client import DatasetInfo, SynthProgress
from gptfl.synth_spec import GeneratorSettings, PretrainSettings, SynthesisRequest
from gptfl.weights import build_manifest, iter_chunks
from synth_service.engine import SynthEngine
from synth_service.pretrain import EpochMetrics, PretrainResult

log = logging.getLogger(__name__)

#: certificate roles allowed to call the service
CALLER_ROLES = ("coordinator", "admin")

M = TypeVar("M", bound=StrictModel)
R = TypeVar("R")


class SynthServicer(synth_pb2_grpc.SynthServicer):
    def __init__(self, engine: SynthEngine, *, insecure: bool) -> None:
        self._engine = engine
        self._insecure = insecure

    @maps_stream_errors
    def Generate(  # noqa: N802 - gRPC method name
        self, request: synth_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[synth_pb2.GenerateEvent]:
        caller = self._authorize(context, "Generate")
        synthesis = _parse(SynthesisRequest, request.request_json, "request_json")
        settings = _parse(GeneratorSettings, request.generator_json or "{}", "generator_json")
        plan = self._engine.plan_generate(
            backend=request.backend,
            generator=request.generator,
            request=synthesis,
            settings=settings,
        )
        log.info(
            "Generate from %s: %d images of %d labels with %s/%s",
            caller,
            plan.images,
            len(synthesis.labels),
            plan.backend,
            plan.generator,
        )

        def work(emit: Callable[[object], None], cancelled: Callable[[], bool]) -> DatasetInfo:
            return self._engine.generate(plan, emit=emit, cancelled=cancelled)

        for item in self._run(f"Generate ({plan.generator})", context, work):
            if isinstance(item, SynthProgress):
                yield synth_pb2.GenerateEvent(progress=_progress_to_pb(item))
            elif isinstance(item, DatasetInfo):
                yield synth_pb2.GenerateEvent(dataset=_dataset_to_pb(item))

    @maps_stream_errors
    def Pretrain(  # noqa: N802 - gRPC method name
        self, request: synth_pb2.PretrainRequest, context: grpc.ServicerContext
    ) -> Iterator[synth_pb2.PretrainEvent]:
        caller = self._authorize(context, "Pretrain")
        if not request.HasField("model"):
            raise ValidationError("PretrainRequest.model is required")
        spec = serde.model_spec_from_pb(request.model)
        settings = _parse(PretrainSettings, request.settings_json or "{}", "settings_json")
        plan = self._engine.plan_pretrain(
            dataset_id=request.dataset_id, spec=spec, settings=settings
        )
        log.info(
            "Pretrain from %s: %s for %d epochs on dataset %s",
            caller,
            spec.arch,
            settings.epochs,
            plan.dataset_id[:12],
        )

        def work(emit: Callable[[object], None], cancelled: Callable[[], bool]) -> PretrainResult:
            return self._engine.pretrain(plan, on_epoch=emit, cancelled=cancelled)

        result: PretrainResult | None = None
        for item in self._run(f"Pretrain ({spec.arch})", context, work):
            if isinstance(item, EpochMetrics):
                yield synth_pb2.PretrainEvent(epoch=_epoch_to_pb(item))
            elif isinstance(item, PretrainResult):
                result = item
        if result is None:  # pragma: no cover - _run yields the result or raises
            raise GptflError("pretraining ended without a result")
        manifest = build_manifest(result.state_dict)
        for part in serde.weight_stream_to_pb(manifest, iter_chunks(result.state_dict, manifest)):
            yield synth_pb2.PretrainEvent(weights=part)
        yield synth_pb2.PretrainEvent(
            summary=synth_pb2.PretrainSummary(
                dataset_id=plan.dataset_id,
                initial_val_accuracy=result.initial_val_accuracy,
                final_val_accuracy=result.final_val_accuracy,
                seconds=result.seconds,
                device=self._engine.device_name,
            )
        )

    def _authorize(self, context: grpc.ServicerContext, method: str) -> str:
        identity = caller_identity(context, insecure=self._insecure)
        require_role(identity, *CALLER_ROLES)
        return f"{identity.role}:{identity.common_name}"

    def _run(
        self,
        what: str,
        context: grpc.ServicerContext,
        work: Callable[[Callable[[object], None], Callable[[], bool]], R],
    ) -> Iterator[object]:
        """Runs ``work`` in a worker thread holding the work slot; yields what it emits, then
        its result; re-raises its error."""
        self._engine.acquire(what)
        ended = threading.Event()
        context.add_callback(ended.set)  # the RPC terminated: cancelled, deadline or done

        def cancelled() -> bool:
            return ended.is_set() or not context.is_active()

        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def run() -> None:
            try:
                result = work(lambda event: events.put(("event", event)), cancelled)
            except GptflError as exc:
                events.put(("error", exc))
            except torch.cuda.OutOfMemoryError:
                events.put(
                    (
                        "error",
                        ResourceLimitError(
                            "out of GPU memory; lower the service's batch size or the request"
                        ),
                    )
                )
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    log.exception("%s failed", what)
                    events.put(("error", GptflError(f"{what} failed: {exc}")))
                else:
                    events.put(("error", ResourceLimitError(f"disk full while storing: {exc}")))
            except Exception as exc:  # a bug or a library failure: INTERNAL, logged
                log.exception("%s failed", what)
                events.put(("error", GptflError(f"{what} failed: {type(exc).__name__}: {exc}")))
            else:
                events.put(("result", result))
            finally:
                self._engine.release()

        try:
            threading.Thread(target=run, name=f"synth-work-{what}", daemon=True).start()
        except BaseException:
            self._engine.release()
            raise
        while True:
            kind, value = events.get()
            if kind == "error":
                log.warning("%s ended: %s", what, value)
                raise value
            yield value
            if kind == "result":
                return


def _parse(model: type[M], text: str, field: str) -> M:
    """Validates JSON from the wire with the shared typed model; one-line errors."""
    if not text:
        raise ValidationError(f"{field} is required")
    try:
        return model.model_validate_json(text)
    except pydantic.ValidationError as exc:
        raise ValidationError(format_validation_error(exc, source=field)) from None


def _progress_to_pb(progress: SynthProgress) -> synth_pb2.Progress:
    return synth_pb2.Progress(
        stage=progress.stage, done=progress.done, total=progress.total, message=progress.message
    )


def _dataset_to_pb(info: DatasetInfo) -> synth_pb2.DatasetInfo:
    return synth_pb2.DatasetInfo(
        dataset_id=info.dataset_id,
        manifest_sha256=info.manifest_sha256,
        generator_id=info.generator_id,
        generator_hash=info.generator_hash,
        images=info.images,
        counts=info.counts,
        seconds=info.seconds,
        device=info.device,
    )


def _epoch_to_pb(metrics: EpochMetrics) -> synth_pb2.EpochMetrics:
    return synth_pb2.EpochMetrics(
        epoch=metrics.epoch,
        epochs=metrics.epochs,
        train_loss=metrics.train_loss,
        val_loss=metrics.val_loss,
        val_accuracy=metrics.val_accuracy,
        seconds=metrics.seconds,
    )
