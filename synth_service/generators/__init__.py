"""Generation backends: diffusers pipelines loaded from local directories only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gptfl.errors import ConfigError
from gptfl.synth_spec import BACKENDS
from synth_service.generators.base import (
    Generator,
    ImageSpec,
    ProgressCallback,
    hash_model_directory,
    plan_images,
)

#: the class-conditional digits generator shipped with the project (trained on public MNIST)
BUNDLED_DIGITS_GENERATOR = Path(__file__).resolve().parent.parent / "assets" / "digits-generator"


def load_generator(backend: str, path: Path, *, device: str = "auto", **settings: Any) -> Generator:
    """Loads a generator of ``backend`` from the model directory ``path``.

    Args:
        backend: ``"text-to-image"`` or ``"class-conditional"``.
        path: the model directory (nothing is downloaded).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        **settings: backend options (see ``TextToImageGenerator.from_directory`` and
            ``ClassConditionalGenerator.from_directory``).

    Raises:
        ConfigError: unknown backend, missing directory, or a model that does not load.
    """
    if backend == "class-conditional":
        from synth_service.generators.class_conditional import ClassConditionalGenerator

        return ClassConditionalGenerator.from_directory(path, device=device, **settings)
    if backend == "text-to-image":
        from synth_service.generators.text_to_image import TextToImageGenerator

        return TextToImageGenerator.from_directory(path, device=device, **settings)
    raise ConfigError(f"unknown generation backend {backend!r} (expected one of {BACKENDS})")


def load_options(backend: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`load_generator` options that reproduce a manifest's ``generator_settings``.

    Settings that follow from the model or the device (scheduler, dtype) are not options;
    :func:`synth_service.artifacts.regenerate` still compares them.
    """
    options: dict[str, Any] = {}
    if "num_inference_steps" in settings:
        options["num_inference_steps"] = int(settings["num_inference_steps"])
    if backend == "text-to-image":
        if settings.get("resolution") is not None:
            options["resolution"] = int(settings["resolution"])
        options["negative_prompt"] = settings.get("negative_prompt")
        options["enable_safety_checker"] = bool(settings.get("safety_checker", False))
    return options


__all__ = [
    "BACKENDS",
    "BUNDLED_DIGITS_GENERATOR",
    "Generator",
    "ImageSpec",
    "ProgressCallback",
    "hash_model_directory",
    "load_generator",
    "load_options",
    "plan_images",
]
