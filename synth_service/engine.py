"""The synth service's work, without the network: check a request, then generate or pretrain.

Every request goes through two steps. ``plan_*`` checks everything that can be checked
without running a model (backend, generator folder, labels the class-conditional generator
knows, guidance it supports, prompt settings, sizes, free disk, dataset id, model shape) and
raises a precise :class:`~gptfl.errors.GptflError` at once. Only a plan then runs, in the one
work slot (:meth:`SynthEngine.acquire`): one generation or pretraining at a time, because both
fill the device. The gRPC servicer is a thin adapter over this class.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptfl.errors import (
    CancelledError,
    ConfigError,
    NotFoundError,
    ResourceLimitError,
    UnavailableError,
    ValidationError,
)
from gptfl.models import ModelSpec, available_architectures, build_model
from gptfl.synth_client import DatasetInfo, SynthProgress
from gptfl.synth_spec import BACKENDS, GeneratorSettings, PretrainSettings, SynthesisRequest
from gptfl.training import resolve_device
from synth_service.artifacts import (
    check_disk_space,
    estimate_artifact_bytes,
    manifest_sha256,
    synthesize,
)
from synth_service.config import SynthConfig
from synth_service.generators import BUNDLED_DIGITS_GENERATOR, Generator, load_generator
from synth_service.generators.class_conditional import (
    LABELS_FILE,
    check_guidance,
    check_known_labels,
    read_labels_file,
)
from synth_service.metrics import SynthMetrics
from synth_service.pretrain import EpochMetrics, PretrainResult, pretrain
from synth_service.prompts import Seq2SeqExpander, build_prompts
from synth_service.store import DatasetStore

logger = logging.getLogger(__name__)

#: the name that always means the class-conditional digits generator shipped in the package
BUNDLED_DIGITS_NAME = "digits"
_GENERATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class GeneratePlan:
    """A checked Generate request."""

    backend: str
    generator: str
    path: Path
    request: SynthesisRequest
    settings: GeneratorSettings

    @property
    def images(self) -> int:
        return len(self.request.labels) * self.request.images_per_label


@dataclass(frozen=True)
class PretrainPlan:
    """A checked Pretrain request."""

    dataset_id: str
    spec: ModelSpec
    settings: PretrainSettings


class SynthEngine:
    """Generation and pretraining on this process's device, one at a time."""

    def __init__(self, config: SynthConfig, *, metrics: SynthMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else SynthMetrics.create()
        self.device = resolve_device(config.device)
        self.store = DatasetStore(config.data_dir)
        self._slot = threading.Lock()
        self._running = ""
        self._refusing = threading.Event()
        self._aborting = threading.Event()
        self._loaded: tuple[tuple[Any, ...], Generator] | None = None
        self._expander: tuple[Path, Seq2SeqExpander] | None = None
        if (config.models_dir / BUNDLED_DIGITS_NAME).exists():
            logger.warning(
                "%s is ignored: the generator name %r always means the bundled digits generator",
                config.models_dir / BUNDLED_DIGITS_NAME,
                BUNDLED_DIGITS_NAME,
            )

    @property
    def device_name(self) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else 0
            return f"cuda:{index}"
        return self.device.type

    # ---- checks (no model runs) ------------------------------------------------------------

    def plan_generate(
        self,
        *,
        backend: str,
        generator: str,
        request: SynthesisRequest,
        settings: GeneratorSettings,
    ) -> GeneratePlan:
        """Checks a Generate request without loading or running the generator.

        Raises:
            ValidationError: unknown backend, a generator folder of another backend, a label
                the class-conditional generator does not know, guidance it cannot apply, a
                safety checker or prompt expander asked of a class-conditional generator, bad
                prompt settings, or an image size above ``max_image_size`` (INVALID_ARGUMENT).
            NotFoundError: no such generator or prompt expander (NOT_FOUND).
            ResourceLimitError: too many images, or not enough free disk (RESOURCE_EXHAUSTED).
        """
        if backend not in BACKENDS:
            raise ValidationError(
                f"unknown backend {backend!r}; this service offers {', '.join(BACKENDS)}"
            )
        path = self.generator_path(generator)
        plan = GeneratePlan(backend, generator, path, request, settings)
        if plan.images > self.config.max_images_per_request:
            raise ResourceLimitError(
                f"{plan.images} images requested; this service allows at most "
                f"{self.config.max_images_per_request} per request"
            )
        if request.image_size > self.config.max_image_size:
            raise ValidationError(
                f"image_size {request.image_size} is above this service's max_image_size "
                f"{self.config.max_image_size}"
            )
        if backend == "class-conditional":
            self._check_class_conditional(plan)
        else:
            if not (path / "model_index.json").is_file():
                raise ValidationError(
                    f"generator {generator!r} is not a text-to-image pipeline (no "
                    "model_index.json); is it a class-conditional one?"
                )
            try:
                build_prompts(
                    request.labels,
                    per_label=request.prompts_per_label,
                    seed=request.seed,
                    overrides=request.prompt_overrides,
                )
            except ConfigError as exc:
                raise ValidationError(f"prompts: {exc}") from None
            if request.prompt_expander:
                self.expander_path(request.prompt_expander)
        needed = estimate_artifact_bytes(request) + self.config.min_free_bytes
        check_disk_space(self.store.root, needed)
        return plan

    def generator_path(self, name: str) -> Path:
        """The folder of generator ``name`` (``digits``: the bundled one).

        Raises:
            ValidationError: not a plain folder name.
            NotFoundError: no such folder under models_dir.
        """
        if name == BUNDLED_DIGITS_NAME:
            return BUNDLED_DIGITS_GENERATOR
        if not _GENERATOR_NAME.match(name):
            raise ValidationError(
                f"generator must be a folder name under models_dir (letters, digits, '.', '_', "
                f"'-'), got {name[:80]!r}"
            )
        path = self.config.models_dir / name
        if not path.is_dir():
            raise NotFoundError(
                f"no generator {name!r} on this service; it has: {', '.join(self.generators())}"
            )
        return path

    def expander_path(self, name: str) -> Path:
        """The folder of prompt expander ``name``: a text-to-text model under models_dir.

        Raises:
            ValidationError: not a plain folder name.
            NotFoundError: no such folder, or it holds no model ``config.json``.
        """
        if not _GENERATOR_NAME.match(name):
            raise ValidationError(
                f"prompt_expander must be a folder name under models_dir (letters, digits, '.', "
                f"'_', '-'), got {name[:80]!r}"
            )
        path = self.config.models_dir / name
        if not (path / "config.json").is_file():
            raise NotFoundError(
                f"no prompt expander {name!r} on this service: models_dir has no folder of that "
                "name holding a text-to-text model (config.json)"
            )
        return path

    def generators(self) -> list[str]:
        """The generator names this service offers (folders that hold a text-to-image pipeline
        or a class-conditional generator)."""
        names = {BUNDLED_DIGITS_NAME}
        if self.config.models_dir.is_dir():
            names.update(
                p.name
                for p in self.config.models_dir.iterdir()
                if _GENERATOR_NAME.match(p.name)
                and ((p / "model_index.json").is_file() or (p / LABELS_FILE).is_file())
            )
        return sorted(names)

    def _check_class_conditional(self, plan: GeneratePlan) -> None:
        if not (plan.path / LABELS_FILE).is_file():
            raise ValidationError(
                f"generator {plan.generator!r} is not a class-conditional generator (no "
                f"{LABELS_FILE}); is it a text-to-image pipeline?"
            )
        if plan.settings.enable_safety_checker:
            raise ValidationError(
                "enable_safety_checker applies to text-to-image pipelines only; a "
                "class-conditional generator has no safety checker"
            )
        if plan.request.prompt_expander:
            raise ValidationError(
                "prompt_expander applies to text-to-image pipelines only; a class-conditional "
                "generator takes no prompts"
            )
        try:
            meta = read_labels_file(plan.path / LABELS_FILE)
        except ConfigError as exc:
            raise ValidationError(f"generator {plan.generator!r} is unusable: {exc}") from None
        request = plan.request
        known = set(meta["labels"]) | set(meta.get("aliases", {}))
        check_known_labels(plan.generator, request.labels, known=known, names=meta["labels"])
        check_guidance(
            plan.generator,
            (request.guidance_min, request.guidance_max),
            null_class=meta.get("null_class") is not None,
        )

    def plan_pretrain(
        self, *, dataset_id: str, spec: ModelSpec, settings: PretrainSettings
    ) -> PretrainPlan:
        """Checks a Pretrain request against the stored dataset's manifest (shards unread).

        Raises:
            ValidationError: a malformed dataset id, an unknown architecture, or a model whose
                input shape or class count differs from the dataset's (INVALID_ARGUMENT).
            NotFoundError: no such dataset on this service (NOT_FOUND).
        """
        manifest = self.store.manifest(dataset_id)
        if spec.arch not in available_architectures():
            raise ValidationError(
                f"unknown model architecture {spec.arch!r}; available: "
                f"{', '.join(available_architectures())}"
            )
        request = manifest.request
        data_shape = (request.in_channels, request.image_size, request.image_size)
        model_shape = (spec.in_channels, spec.image_size, spec.image_size)
        if data_shape != model_shape:
            raise ValidationError(
                f"shape mismatch: dataset {dataset_id[:12]} holds images of shape "
                f"{list(data_shape)}, model {spec.arch!r} takes {list(model_shape)}"
            )
        if spec.num_classes != len(request.labels):
            raise ValidationError(
                f"dataset {dataset_id[:12]} has {len(request.labels)} labels, the model has "
                f"{spec.num_classes} classes"
            )
        try:
            build_model(spec)
        except ConfigError as exc:
            raise ValidationError(str(exc)) from None
        return PretrainPlan(dataset_id, spec, settings)

    # ---- the work slot ---------------------------------------------------------------------

    def acquire(self, what: str) -> None:
        """Takes the one work slot, waiting up to ``busy_wait_s``.

        Raises:
            UnavailableError: the service is shutting down.
            ResourceLimitError: another call holds the slot (RESOURCE_EXHAUSTED).
        """
        if self._refusing.is_set():
            raise UnavailableError("the synth service is shutting down")
        wait = self.config.busy_wait_s
        acquired = self._slot.acquire(timeout=wait) if wait > 0 else self._slot.acquire(False)
        if not acquired:
            raise ResourceLimitError(
                f"busy: {self._running or 'another call'} is running; this service runs one "
                "Generate or Pretrain at a time"
            )
        self._running = what

    def release(self) -> None:
        self._running = ""
        self._slot.release()

    def refuse_new_work(self) -> None:
        """Shutdown, step 1: new calls get UNAVAILABLE; running work goes on."""
        self._refusing.set()

    def wait_idle(self, timeout_s: float) -> bool:
        """Shutdown, step 2: waits until no work runs; True when idle in time."""
        if not self._slot.acquire(timeout=max(timeout_s, 0.0)):
            return False
        self._slot.release()
        return True

    def abort_work(self) -> None:
        """Shutdown, step 3: running work stops at its next progress point (UNAVAILABLE)."""
        self._refusing.set()
        self._aborting.set()

    def _checker(self, cancelled: Callable[[], bool]) -> Callable[[], None]:
        def check() -> None:
            if self._aborting.is_set():
                raise UnavailableError("the synth service is shutting down")
            if cancelled():
                raise CancelledError("the caller cancelled the call")

        return check

    # ---- the work (holding the slot) -------------------------------------------------------

    def generate(
        self,
        plan: GeneratePlan,
        *,
        emit: Callable[[SynthProgress], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> DatasetInfo:
        """Loads the generator (cached), generates, stores; reports progress through ``emit``.

        Raises:
            CancelledError: ``cancelled()`` became true; nothing is stored.
            UnavailableError: the service is stopping; nothing is stored.
            ValidationError: the generator does not load or refuses the request.
        """
        check = self._checker(cancelled)
        started = time.perf_counter()
        total = plan.images
        emit(SynthProgress("load", 0, 1, f"loading generator {plan.generator!r}"))
        generator = self._generator(plan)  # its labels were checked by plan_generate
        expander = self._load_expander(plan.request.prompt_expander)
        check()
        emit(SynthProgress("generate", 0, total, f"generating {total} images"))
        last = [0, time.perf_counter()]

        def on_batch(done: int, all_images: int) -> None:
            now = time.perf_counter()
            batch = done - last[0]
            self.metrics.images_generated.inc(batch)
            if now > last[1]:
                self.metrics.images_per_second.set(batch / (now - last[1]))
            last[:] = [done, now]
            self._record_gpu_memory()
            emit(SynthProgress("generate", done, all_images, f"{done}/{all_images} images"))

        batch_size = (
            self.config.class_conditional_batch_size
            if plan.backend == "class-conditional"
            else self.config.text_to_image_batch_size
        )
        dataset = synthesize(
            generator,
            plan.request,
            batch_size=batch_size,
            expander=expander,
            progress=on_batch,
            step_check=check,  # before every denoising step: no wait for a whole batch
        )
        check()
        emit(SynthProgress("store", 0, 1, "writing the artifact"))
        path = self.store.save(dataset)
        manifest = dataset.manifest
        emit(SynthProgress("store", 1, 1, f"stored {path.name[:12]}"))
        seconds = time.perf_counter() - started
        logger.info(
            "generated dataset %s: %d images with %s in %.1fs on %s",
            manifest.dataset_sha256[:12],
            total,
            plan.generator,
            seconds,
            self.device_name,
        )
        return DatasetInfo(
            dataset_id=manifest.dataset_sha256,
            manifest_sha256=manifest_sha256(manifest),
            generator_id=manifest.generator_id,
            generator_hash=manifest.generator_hash,
            images=len(manifest.image_labels),
            counts=dict(manifest.counts),
            seconds=seconds,
            device=self.device_name,
        )

    def pretrain(
        self,
        plan: PretrainPlan,
        *,
        on_epoch: Callable[[EpochMetrics], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> PretrainResult:
        """Reads and verifies the dataset, then trains; reports every epoch.

        Raises:
            ChecksumError: the stored artifact is corrupt (DATA_LOSS).
            CancelledError, UnavailableError: as for :meth:`generate`.
        """
        check = self._checker(cancelled)
        data = self.store.load(plan.dataset_id)
        check()
        self.metrics.pretrain_epoch.set(0)

        def progress(metrics: EpochMetrics) -> None:
            self.metrics.pretrain_epoch.set(metrics.epoch)
            self.metrics.pretrain_epoch_accuracy.set(metrics.val_accuracy)
            self._record_gpu_memory()
            on_epoch(metrics)
            check()

        return pretrain(plan.spec, data.data, plan.settings, device=self.device, progress=progress)

    def _load_expander(self, name: str) -> Seq2SeqExpander | None:
        """The request's prompt expander (the last one loaded stays loaded); None for none.

        Raises:
            ValidationError: the folder does not hold a loadable text-to-text model.
        """
        if not name:
            return None
        path = self.expander_path(name)
        if self._expander is None or self._expander[0] != path:
            try:
                self._expander = (path, Seq2SeqExpander.from_directory(path))
            except ConfigError as exc:
                raise ValidationError(f"prompt expander {name!r} is unusable: {exc}") from None
        return self._expander[1]

    def _generator(self, plan: GeneratePlan) -> Generator:
        """The plan's generator; the last one loaded stays loaded (one model on the device)."""
        options: dict[str, Any] = {}
        if plan.settings.num_inference_steps is not None:
            options["num_inference_steps"] = plan.settings.num_inference_steps
        if plan.backend == "text-to-image":
            options["enable_safety_checker"] = plan.settings.enable_safety_checker
        key = (plan.backend, str(plan.path.resolve()), tuple(sorted(options.items())))
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self._loaded = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            generator = load_generator(plan.backend, plan.path, device=str(self.device), **options)
        except ConfigError as exc:
            raise ValidationError(f"generator {plan.generator!r} does not load: {exc}") from None
        self._loaded = (key, generator)
        return generator

    def _record_gpu_memory(self) -> None:
        if self.device.type == "cuda":
            self.metrics.gpu_memory_bytes.set(torch.cuda.memory_allocated(self.device))
