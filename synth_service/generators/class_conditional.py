"""The ``class-conditional`` backend: a diffusers ``UNet2DModel`` with class embeddings.

The model directory holds what ``UNet2DModel.save_pretrained`` and a scheduler's
``save_pretrained`` write (``config.json``, ``diffusion_pytorch_model.safetensors``,
``scheduler_config.json``) plus ``gptfl_labels.json``::

    {"labels": ["0", "1", ...], "aliases": {"zero": "0", ...}, "null_class": 10,
     "image_size": 16, "in_channels": 1, "value_range": [-1.0, 1.0]}

``labels[i]`` is class embedding ``i``; ``null_class`` (optional) is the embedding trained
with dropped labels, which enables classifier-free guidance (guidance 1 means plain
conditional sampling). Sampling uses ``DPMSolverMultistepScheduler`` built from the saved
scheduler config with a configurable number of steps. Each image's starting noise comes from
its own seed on the CPU, so it depends neither on the other images' seeds nor on the device's
random number generator.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Collection, Iterable, Sequence
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

BACKEND = "class-conditional"
LABELS_FILE = "gptfl_labels.json"


class ClassConditionalGenerator:
    """Samples a class-conditional ``UNet2DModel`` for named labels.

    An instance holds one stateful scheduler: call :meth:`generate` from one thread at a time.
    """

    def __init__(
        self,
        *,
        unet: Any,
        scheduler: Any,
        labels: Sequence[str],
        aliases: dict[str, str],
        null_class: int | None,
        value_range: tuple[float, float],
        generator_id: str,
        content_hash: str,
        num_inference_steps: int,
        device: torch.device,
    ) -> None:
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self._unet = unet
        self._scheduler = scheduler
        self._labels = tuple(labels)
        self._index = {name: i for i, name in enumerate(self._labels)}
        for alias, target in aliases.items():
            if target not in self._index:
                raise ConfigError(f"{LABELS_FILE}: alias {alias!r} names unknown label {target!r}")
            self._index.setdefault(alias, self._index[target])
        self._null_class = null_class
        self._value_range = value_range
        self._generator_id = generator_id
        self._content_hash = content_hash
        self._steps = num_inference_steps
        self._device = device

    @classmethod
    def from_directory(
        cls,
        path: Path,
        *,
        device: str = "auto",
        num_inference_steps: int = 20,
    ) -> ClassConditionalGenerator:
        """Loads the model and scheduler from ``path`` with ``local_files_only=True``.

        Args:
            path: the model directory (see the module docstring).
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. The model is small,
                so it runs in float32 on every device.
            num_inference_steps: DPM-Solver++ steps per image.

        Raises:
            ConfigError: the directory, a file, or a field of ``gptfl_labels.json`` is missing
                or malformed, or the labels do not match the model's class embeddings.
        """
        diffusers: Any = importlib.import_module("diffusers")  # untyped library

        root = Path(path)
        if not root.is_dir():
            raise ConfigError(f"class-conditional generator {root} does not exist")
        meta = read_labels_file(root / LABELS_FILE)
        torch_device = resolve_device(device)
        try:
            unet = diffusers.UNet2DModel.from_pretrained(
                str(root), local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False
            )
            config = diffusers.DPMSolverMultistepScheduler.load_config(
                str(root), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load a UNet2DModel and scheduler from {root}: {exc}"
            ) from None
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        )
        labels: list[str] = meta["labels"]
        null_class: int | None = meta.get("null_class")
        embeds = unet.config.num_class_embeds
        needed = len(labels) + (1 if null_class is not None else 0)
        if embeds is None or embeds < needed:
            raise ConfigError(
                f"{root}: the UNet has {embeds} class embeddings, {LABELS_FILE} needs {needed}"
            )
        if null_class is not None and not len(labels) <= null_class < embeds:
            raise ConfigError(f"{root}: null_class {null_class} is out of range")
        unet.to(torch_device).eval().requires_grad_(False)
        low, high = meta.get("value_range", [-1.0, 1.0])
        return cls(
            unet=unet,
            scheduler=scheduler,
            labels=labels,
            aliases=dict(meta.get("aliases", {})),
            null_class=null_class,
            value_range=(float(low), float(high)),
            generator_id=root.name,
            content_hash=hash_model_directory(root),
            num_inference_steps=num_inference_steps,
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
    def label_names(self) -> tuple[str, ...]:
        return self._labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = int(self._unet.config.sample_size)
        return int(self._unet.config.in_channels), size, size

    def settings(self) -> dict[str, Any]:
        return {"num_inference_steps": self._steps, "scheduler": "DPMSolverMultistepScheduler"}

    def check_labels(self, labels: Sequence[str]) -> None:
        """Raises ValidationError naming every label the model does not know.

        A label is known by its name in ``gptfl_labels.json`` or one of its aliases.
        """
        check_known_labels(self._generator_id, labels, known=self._index, names=self._labels)

    def generate(
        self,
        specs: Sequence[ImageSpec],
        *,
        batch_size: int = 64,
        progress: ProgressCallback | None = None,
        step_check: StepCheck | None = None,
    ) -> np.ndarray:
        """Samples one image per spec (the prompt is ignored; the label picks the class).

        Raises:
            ValidationError: a label is unknown, or a guidance other than 1 is asked of a
                model without a null class; both are checked before any sampling.
        """
        self.check_labels([spec.label for spec in specs])
        check_guidance(
            self._generator_id, [s.guidance for s in specs], null_class=self._null_class is not None
        )
        channels, height, width = self.image_shape
        out = np.empty((len(specs), channels, height, width), dtype=np.float32)
        done = 0
        for batch in batches_by_guidance(specs, batch_size=batch_size):
            chosen = [specs[i] for i in batch]
            out[batch] = self._sample(chosen, step_check)
            done += len(batch)
            if progress is not None:
                progress(done, len(specs))
        return out

    def _sample(self, specs: Sequence[ImageSpec], step_check: StepCheck | None) -> np.ndarray:
        channels, height, width = self.image_shape
        noise = torch.stack(
            [
                torch.randn(
                    (channels, height, width), generator=torch.Generator().manual_seed(s.seed)
                )
                for s in specs
            ]
        ).to(self._device)
        classes = torch.tensor([self._index[s.label] for s in specs], device=self._device)
        guidance = specs[0].guidance  # a batch shares one guidance (batches_by_guidance)
        guided = self._null_class is not None and guidance != 1.0
        if guided:
            classes = torch.cat([classes, torch.full_like(classes, int(self._null_class or 0))])
        scheduler = self._scheduler
        scheduler.set_timesteps(self._steps, device=self._device)
        sample = noise * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                if step_check is not None:
                    step_check()
                model_input = torch.cat([sample, sample]) if guided else sample
                model_input = scheduler.scale_model_input(model_input, t)
                prediction = self._unet(model_input, t, class_labels=classes).sample
                if guided:
                    conditional, unconditional = prediction.chunk(2)
                    prediction = unconditional + guidance * (conditional - unconditional)
                sample = scheduler.step(prediction, t, sample).prev_sample
        low, high = self._value_range
        images = ((sample.float() - low) / (high - low)).clamp(0.0, 1.0)
        result: np.ndarray = images.cpu().numpy().astype(np.float32, copy=False)
        return result


def check_known_labels(
    generator_id: str, labels: Sequence[str], *, known: Collection[str], names: Sequence[str]
) -> None:
    """Raises ValidationError naming every label not in ``known`` (names and aliases);
    ``names`` are the model's class names, listed in the message."""
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ValidationError(
            f"generator {generator_id!r} does not know label(s) "
            f"{', '.join(repr(u) for u in unknown)}; it knows {', '.join(names)}"
        )


def check_guidance(generator_id: str, guidances: Iterable[float], *, null_class: bool) -> None:
    """Raises ValidationError if guidance other than 1.0 is asked of a model without a null
    class (classifier-free guidance needs the unconditional prediction)."""
    guided = sorted({g for g in guidances if g != 1.0})
    if guided and not null_class:
        raise ValidationError(
            f"generator {generator_id!r} has no null class, so it supports only guidance 1.0, "
            f"got {guided[:3]}"
        )


def read_labels_file(path: Path) -> dict[str, Any]:
    """Reads and checks ``gptfl_labels.json`` (see the module docstring) without the model.

    Raises:
        ConfigError: a missing file or a malformed field.
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    labels = meta.get("labels")
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) and x for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ConfigError(f"{path}: 'labels' must be a non-empty list of distinct names")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise ConfigError(f"{path}: 'aliases' must map names to label names")
    null_class = meta.get("null_class")
    if null_class is not None and (not isinstance(null_class, int) or isinstance(null_class, bool)):
        raise ConfigError(f"{path}: 'null_class' must be an integer or null")
    value_range = meta.get("value_range", [-1.0, 1.0])
    if (
        not isinstance(value_range, list)
        or len(value_range) != 2
        or not all(isinstance(v, int | float) for v in value_range)
        or not value_range[0] < value_range[1]
    ):
        raise ConfigError(f"{path}: 'value_range' must be [low, high] with low < high")
    return meta
