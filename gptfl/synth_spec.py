"""What a caller asks of the synth service: the typed, validated synthesis and pretrain specs.

These models live in the shared core (not in ``synth_service``) because the coordinator and
the job spec validate them at submit time, and services import only ``gptfl``. On the wire
they travel as JSON (``GenerateRequest.request_json``, ``GenerateRequest.generator_json``,
``PretrainRequest.settings_json``) and the service validates them again with the same models.
The synthesis request is also written into every artifact manifest, so its field names are a
stored format: add fields with defaults, never rename.
"""

from __future__ import annotations

from typing import Literal

import pydantic

from gptfl.config_loading import StrictModel
from gptfl.data.dataset import RESIZE_MODES

#: how generated images are fitted to the task's input shape (see ``synth_service.resize``):
#: :data:`gptfl.data.dataset.RESIZE_MODES` plus the content-aware ``ink-box``
FIT_MODES: tuple[str, ...] = (*RESIZE_MODES, "ink-box")

#: the generation backends the synth service offers
BACKENDS: tuple[str, ...] = ("text-to-image", "class-conditional")


class SynthesisRequest(StrictModel):
    """What to generate.

    Attributes:
        labels: label names in label order (label ``i`` of the dataset is ``labels[i]``).
        images_per_label: images per label.
        in_channels: the task's channels (1 or 3).
        image_size: the task's square input size.
        resize_mode: how generated images are fitted (see :data:`FIT_MODES`).
        seed: seed of prompts, per-image noise seeds and guidance draws.
        prompts_per_label: distinct prompts per label (text-to-image only).
        prompt_overrides: label -> prompts that replace the generated ones.
        guidance_min: lowest guidance scale drawn.
        guidance_max: highest guidance scale drawn.
        guidance_step: grid of the guidance draws (0: continuous).
        prompt_expander: text-to-image only: a text-to-text model (a folder under the synth
            service's ``models_dir``, e.g. T5 fine-tuned on CommonGen) whose sentences come
            first among each label's prompts; "" uses the templates alone.
    """

    labels: list[str] = pydantic.Field(min_length=1)
    images_per_label: int = pydantic.Field(ge=1)
    in_channels: int = pydantic.Field(ge=1, le=3)
    image_size: int = pydantic.Field(ge=1)
    resize_mode: str = "stretch"
    seed: int = 0
    prompts_per_label: int = pydantic.Field(default=16, ge=1)
    prompt_overrides: dict[str, list[str]] = pydantic.Field(default_factory=dict)
    guidance_min: float = pydantic.Field(default=1.0, ge=0.0)
    guidance_max: float = pydantic.Field(default=5.0, ge=0.0)
    guidance_step: float = pydantic.Field(default=0.5, ge=0.0)
    prompt_expander: str = ""

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> SynthesisRequest:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        if self.in_channels not in (1, 3):
            raise ValueError("in_channels must be 1 or 3")
        if self.resize_mode not in FIT_MODES:
            raise ValueError(f"resize_mode must be one of {FIT_MODES}")
        if self.guidance_min > self.guidance_max:
            raise ValueError("guidance_min must be <= guidance_max")
        return self


class GeneratorSettings(StrictModel):
    """Per-request sampling settings of the generator (the service loads it with these).

    Attributes:
        num_inference_steps: DPM-Solver++ steps per image; None uses the backend's default
            (20 for class-conditional, 25 for text-to-image).
        enable_safety_checker: text-to-image only: run the pipeline's own safety checker when
            the model directory ships one (off by default: flagged images become black
            squares that would poison a training set).
    """

    num_inference_steps: int | None = pydantic.Field(default=None, ge=1, le=1000)
    enable_safety_checker: bool = False


class PretrainSettings(StrictModel):
    """Hyper-parameters of a pretraining run.

    Attributes:
        epochs: passes over the training part.
        batch_size: examples per step.
        optimizer: ``"sgd"`` (with momentum) or ``"adamw"``.
        learning_rate: peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty (SGD) or decoupled weight decay (AdamW).
        schedule: ``"cosine"`` (decays to 0 at the end) or ``"constant"``.
        warmup_epochs: linear warm-up before the schedule.
        max_shift: augmentation: random shift in pixels along each axis (0: off).
        label_smoothing: cross-entropy label smoothing.
        val_fraction: share of each label held out for validation.
        seed: seed of the split, the initial weights, the order and the augmentation.
    """

    epochs: int = pydantic.Field(default=10, ge=1)
    batch_size: int = pydantic.Field(default=64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    learning_rate: float = pydantic.Field(default=0.05, gt=0.0)
    momentum: float = pydantic.Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = pydantic.Field(default=5e-4, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = pydantic.Field(default=0, ge=0)
    max_shift: int = pydantic.Field(default=1, ge=0)
    label_smoothing: float = pydantic.Field(default=0.0, ge=0.0, lt=1.0)
    val_fraction: float = pydantic.Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 0
