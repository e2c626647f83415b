"""What every generation backend offers, and the per-image plan they all execute.

A generation request is turned into a *plan* before any model runs: one :class:`ImageSpec`
per image with its label, prompt, seed and guidance scale. Backends render a plan; the plan
goes into the artifact manifest, so replaying it with the same generator reproduces the data.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gptfl.errors import ConfigError

#: called after each batch with (images done, images total)
ProgressCallback = Callable[[int, int], None]
#: called before every denoising step; it raises to stop the work (shutdown, cancellation)
StepCheck = Callable[[], None]

# Files that describe a model but do not change its outputs; left out of the content hash.
_NON_CONTENT_SUFFIXES = frozenset({".md", ".png", ".jpg", ".jpeg"})
_NON_CONTENT_NAMES = frozenset({"training_summary.json"})


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines one generated image, given the generator.

    Attributes:
        label: the label name the image should show.
        prompt: the text prompt (for class-conditional generators, the label name).
        seed: seed of the image's initial noise.
        guidance: classifier-free guidance scale.
    """

    label: str
    prompt: str
    seed: int
    guidance: float


@runtime_checkable
class Generator(Protocol):
    """A generation backend bound to one model on disk."""

    @property
    def backend(self) -> str:
        """The backend name, e.g. ``"text-to-image"`` or ``"class-conditional"``."""
        ...

    @property
    def generator_id(self) -> str:
        """A human-readable id of the model (its directory name)."""
        ...

    @property
    def content_hash(self) -> str:
        """sha256 over the model's files (see :func:`hash_model_directory`)."""
        ...

    @property
    def label_names(self) -> tuple[str, ...] | None:
        """The labels the model can draw, or None when any label (prompt) is accepted."""
        ...

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The (channels, height, width) of the images :meth:`generate` returns."""
        ...

    def settings(self) -> dict[str, Any]:
        """JSON-compatible sampling settings that, with the plan, determine the output."""
        ...

    def check_labels(self, labels: Sequence[str]) -> None:
        """Raises a :class:`~gptfl.errors.ValidationError` for a label the model cannot draw."""
        ...

    def generate(
        self,
        specs: Sequence[ImageSpec],
        *,
        batch_size: int = 16,
        progress: ProgressCallback | None = None,
        step_check: StepCheck | None = None,
    ) -> np.ndarray:
        """Renders ``specs``: float32 ``(N, C, H, W)`` images in [0, 1], in ``specs`` order.

        ``step_check`` runs before every denoising step, so that a stop does not wait for
        the batch in progress; what it raises ends the call.
        """
        ...


def plan_images(
    labels: Sequence[str],
    *,
    images_per_label: int,
    prompts: Mapping[str, Sequence[str]],
    seed: int,
    guidance_range: tuple[float, float] = (1.0, 5.0),
    guidance_step: float = 0.5,
) -> list[ImageSpec]:
    """The per-image plan: labels in order, prompts cycled, seeds and guidance drawn.

    Guidance is drawn uniformly from ``guidance_range`` on a grid of ``guidance_step`` (the
    paper draws 1-5 for diversity); the grid lets images of equal guidance share a batch.
    A label's plan depends only on ``(seed, label)``, not on the other labels.

    Args:
        labels: label names in label order.
        images_per_label: images per label.
        prompts: label -> prompts; image ``i`` of a label uses prompt ``i mod len``.
        seed: seed of the per-image seeds and guidance draws.
        guidance_range: inclusive (low, high).
        guidance_step: grid step; 0 draws any real value in the range.

    Returns:
        ``len(labels) * images_per_label`` specs, grouped by label.

    Raises:
        ConfigError: a bad count, range, step, or a label without prompts.
    """
    if images_per_label < 1:
        raise ConfigError(f"images per label must be >= 1, got {images_per_label}")
    low, high = (float(v) for v in guidance_range)
    if not 0.0 <= low <= high or not np.isfinite(high):
        raise ConfigError(f"guidance range must satisfy 0 <= low <= high, got {guidance_range}")
    if guidance_step < 0 or not np.isfinite(guidance_step):
        raise ConfigError(f"guidance step must be >= 0, got {guidance_step}")
    grid: list[float] | None = None
    if guidance_step > 0:
        count = int(np.floor((high - low) / guidance_step + 1e-9)) + 1
        grid = [round(low + k * guidance_step, 6) for k in range(count)]
    specs: list[ImageSpec] = []
    for label in labels:
        options = list(prompts.get(label, ()))
        if not options:
            raise ConfigError(f"no prompts for label {label!r}")
        rng = random.Random(f"{seed}:{label}:plan")
        for index in range(images_per_label):
            guidance = rng.choice(grid) if grid is not None else round(rng.uniform(low, high), 6)
            specs.append(
                ImageSpec(
                    label=label,
                    prompt=options[index % len(options)],
                    seed=rng.getrandbits(31),
                    guidance=guidance,
                )
            )
    return specs


def hash_model_directory(path: Path) -> str:
    """sha256 over a model directory's files that determine its outputs.

    Weights, configs, tokenizer files and label files are hashed (with their relative paths,
    in sorted order); documentation (model cards, sample images) and hidden files are not.
    """
    root = Path(path)
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.suffix.lower() not in _NON_CONTENT_SUFFIXES
        and p.name not in _NON_CONTENT_NAMES
    )
    for file in files:
        relative = file.relative_to(root).as_posix().encode()
        digest.update(len(relative).to_bytes(8, "big") + relative)
        digest.update(file.stat().st_size.to_bytes(8, "big"))
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def batches_by_guidance(specs: Sequence[ImageSpec], *, batch_size: int) -> list[list[int]]:
    """Indices of ``specs`` grouped into batches of equal guidance, in first-seen order.

    Raises:
        ConfigError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    groups: dict[float, list[int]] = {}
    for index, spec in enumerate(specs):
        groups.setdefault(spec.guidance, []).append(index)
    batches: list[list[int]] = []
    for indices in groups.values():
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    return batches
