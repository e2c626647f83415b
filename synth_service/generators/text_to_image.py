"""The ``text-to-image`` backend: any diffusers text-to-image pipeline saved on disk.

Stable Diffusion 1.x/2.x and similar pipelines are loaded with
``DiffusionPipeline.from_pretrained(path, local_files_only=True)``; nothing is downloaded.
The pipeline's scheduler is replaced by ``DPMSolverMultistepScheduler`` built from its own
config (good images in 20-25 steps). On CUDA the pipeline runs in float16, on the CPU in
float32.

Each image has its own seed (its own ``torch.Generator``) and its own guidance scale from the
plan; images of equal guidance share a batch (:func:`plan_images` draws guidance on a grid for
that reason).

**Safety checker.** Off by default: synthetic training data for a classifier is never shown to
people, and the checker both costs GPU time and replaces flagged images with black squares
that would poison the training set. Set ``enable_safety_checker=True`` (the service config's
switch) to load and run the pipeline's own checker when the model directory ships one; images
it flags are then black, as diffusers makes them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptfl.errors import ConfigError, ValidationError
from gptfl.training import resolve_device
from synth_service.generators.base import (
    ImageSpec,
    ProgressCallback,
    StepCheck,
    batches_by_guidance,
    hash_model_directory,
)

logger = logging.getLogger(__name__)

BACKEND = "text-to-image"


class TextToImageGenerator:
    """Generates images from prompts with a diffusers text-to-image pipeline.

    The pipeline (and its scheduler) is stateful: call :meth:`generate` from one thread at a
    time.
    """

    def __init__(
        self,
        *,
        pipeline: Any,
        generator_id: str,
        content_hash: str,
        num_inference_steps: int,
        resolution: int,
        negative_prompt: str | None,
        safety_checker: bool,
        device: torch.device,
    ) -> None:
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if resolution < 8 or resolution % 8:
            raise ConfigError(f"resolution must be a positive multiple of 8, got {resolution}")
        self._pipeline = pipeline
        self._generator_id = generator_id
        self._content_hash = content_hash
        self._steps = num_inference_steps
        self._resolution = resolution
        self._negative_prompt = negative_prompt
        self._safety_checker = safety_checker
        self._device = device

    @classmethod
    def from_directory(
        cls,
        path: Path,
        *,
        device: str = "auto",
        num_inference_steps: int = 25,
        resolution: int | None = None,
        negative_prompt: str | None = None,
        enable_safety_checker: bool = False,
    ) -> TextToImageGenerator:
        """Loads a saved pipeline from ``path`` with ``local_files_only=True``.

        Args:
            path: a directory written by ``pipeline.save_pretrained`` (``model_index.json``
                and one sub-folder per component).
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; float16 on CUDA.
            num_inference_steps: DPM-Solver++ steps per image.
            resolution: side of the generated square images; by default the pipeline's
                native size (UNet sample size times the VAE scale factor).
            negative_prompt: an optional negative prompt for every image.
            enable_safety_checker: load and run the pipeline's safety checker (see the
                module docstring); off by default.

        Raises:
            ConfigError: the directory is missing or does not hold a loadable text-to-image
                pipeline.
        """
        diffusers: Any = importlib.import_module("diffusers")  # untyped library

        root = Path(path)
        if not (root / "model_index.json").is_file():
            raise ConfigError(f"text-to-image generator {root} has no model_index.json")
        torch_device = resolve_device(device)
        dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
        try:
            index = diffusers.DiffusionPipeline.load_config(str(root), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the pipeline index in {root}: {exc}") from None
        options: dict[str, Any] = {}
        has_checker = (
            isinstance(index.get("safety_checker"), list) and index["safety_checker"][0] is not None
        )
        if "safety_checker" in index and not enable_safety_checker:
            # Not loading it at all saves memory and start-up time.
            options = {"safety_checker": None, "requires_safety_checker": False}
        if enable_safety_checker and not has_checker:
            logger.warning("safety checker requested but %s ships none; running without", root)
        try:
            pipeline = diffusers.DiffusionPipeline.from_pretrained(
                str(root), local_files_only=True, dtype=dtype, **options
            )
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load a diffusers pipeline from {root}: {exc}") from None
        if not hasattr(pipeline, "scheduler") or not hasattr(pipeline, "unet"):
            raise ConfigError(f"{root} is not a UNet text-to-image pipeline")
        pipeline.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            pipeline.scheduler.config
        )
        pipeline.to(torch_device)
        pipeline.set_progress_bar_config(disable=True)
        native = int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)
        return cls(
            pipeline=pipeline,
            generator_id=root.name,
            content_hash=hash_model_directory(root),
            num_inference_steps=num_inference_steps,
            resolution=resolution or native,
            negative_prompt=negative_prompt,
            safety_checker=enable_safety_checker and has_checker,
            device=torch_device,
        )

    @property
    def backend(self) -> str:
        return BACKEND

    @property
    def generator_id(self) -> str:
        return self._generator_id

    @property
    def content_hash(self) -> str:
        return self._content_hash

    @property
    def label_names(self) -> None:
        """Any label is accepted: the prompt carries it."""
        return None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self._resolution, self._resolution

    def settings(self) -> dict[str, Any]:
        return {
            "num_inference_steps": self._steps,
            "resolution": self._resolution,
            "negative_prompt": self._negative_prompt,
            "safety_checker": self._safety_checker,
            "scheduler": "DPMSolverMultistepScheduler",
            "dtype": "float16" if self._device.type == "cuda" else "float32",
        }

    def check_labels(self, labels: Sequence[str]) -> None:
        """Accepts any non-empty label name."""
        empty = [label for label in labels if not label.strip()]
        if empty:
            raise ValidationError("label names must be non-empty")

    def generate(
        self,
        specs: Sequence[ImageSpec],
        *,
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
        step_check: StepCheck | None = None,
    ) -> np.ndarray:
        """Renders one image per spec at the configured resolution, RGB in [0, 1].

        Raises:
            ValidationError: a spec has an empty prompt (checked before any sampling).
        """
        if any(not spec.prompt.strip() for spec in specs):
            raise ValidationError("every image needs a non-empty prompt")
        side = self._resolution
        out = np.empty((len(specs), 3, side, side), dtype=np.float32)
        done = 0
        on_step: dict[str, Any] = {}
        if step_check is not None:

            def after_step(
                _pipe: Any, _step: int, _timestep: Any, tensors: dict[str, Any]
            ) -> dict[str, Any]:
                step_check()
                return tensors

            on_step["callback_on_step_end"] = after_step
        for batch in batches_by_guidance(specs, batch_size=batch_size):
            chosen = [specs[i] for i in batch]
            # Noise is drawn on the CPU from each image's own seed: reproducible on any device.
            generators = [torch.Generator().manual_seed(s.seed) for s in chosen]
            negative = [self._negative_prompt] * len(chosen) if self._negative_prompt else None
            result = self._pipeline(
                prompt=[s.prompt for s in chosen],
                negative_prompt=negative,
                guidance_scale=float(chosen[0].guidance),
                num_inference_steps=self._steps,
                height=side,
                width=side,
                generator=generators,
                output_type="np",
                **on_step,
            )
            images = np.asarray(result.images, dtype=np.float32)
            if not np.isfinite(images).all():
                # float16 VAEs can overflow; a black image is safer than NaN in a dataset.
                logger.warning("non-finite pixels in a generated batch were set to 0")
                images = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
            out[batch] = np.clip(images, 0.0, 1.0).transpose(0, 3, 1, 2)
            done += len(batch)
            if progress is not None:
                progress(done, len(specs))
        return out
