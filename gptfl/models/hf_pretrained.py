"""Starting a ``transformers`` zoo architecture from a local ``from_pretrained`` folder.

A user downloads a public checkpoint (``microsoft/resnet-50``, ``facebook/convnext-tiny-224``,
``google/vit-base-patch16-224``, ...) with ``save_pretrained`` or ``huggingface-cli
download`` and points :func:`load_pretrained` at the folder. The result has exactly the
layout :func:`~gptfl.models.build_model` gives the job's spec, so it can be a job's
``initial_model`` (``gptfl models import``) and the silos, which build the model from the
spec, load it unchanged:

- every tensor of the checkpoint's backbone is copied into the spec's model;
- the classification head is the spec's own (``num_classes`` outputs, seeded random
  initialisation) unless ``keep_head`` and its shape fits;
- ViT's position embeddings are resized (bicubic, as when fine-tuning at another
  resolution) when the spec's image size differs from the checkpoint's;
- for the GroupNorm ResNets, each BatchNorm's affine weight and bias become the
  GroupNorm's, and its running statistics are dropped: the convolutions are the
  checkpoint's, but the features are normalised per example and not with ImageNet's
  statistics, so expect to fine-tune (docs/models.md).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from gptfl.errors import ConfigError
from gptfl.models.hf_vision import HF_ARCHITECTURES, HfArchitecture, HfVisionFamily
from gptfl.models.registry import build_model
from gptfl.models.spec import ModelSpec

log = logging.getLogger(__name__)

#: the head's parameter names start with this in every family's classifier
HEAD_PREFIX = "net.classifier."
_VIT_POSITIONS = "net.vit.embeddings.position_embeddings"
_BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class PretrainedLoad:
    """What :func:`load_pretrained` did, for the initial model's provenance.

    Attributes:
        folder: the checkpoint folder.
        model_type: its config's ``model_type``.
        copied: tensors copied from the checkpoint.
        fresh: tensors initialised here (the head, unless kept).
        resized: tensors resized to the spec (ViT's position embeddings).
        dropped: checkpoint tensors not used (BatchNorm running statistics, the old head).
    """

    folder: str
    model_type: str
    copied: int
    fresh: tuple[str, ...]
    resized: tuple[str, ...]
    dropped: int

    def provenance(self) -> dict[str, Any]:
        return {
            "pretrained_folder": self.folder,
            "model_type": self.model_type,
            "copied_tensors": self.copied,
            "fresh_tensors": list(self.fresh),
            "resized_tensors": list(self.resized),
            "dropped_tensors": self.dropped,
        }


def _hf_architecture(spec: ModelSpec) -> HfArchitecture:
    found = HF_ARCHITECTURES.get(spec.arch)
    if found is None:
        raise ConfigError(
            f"model architecture {spec.arch!r} cannot start from a transformers checkpoint "
            f"(these can: {', '.join(HF_ARCHITECTURES)})"
        )
    return found


def _model_type(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"pretrained folder {folder} has no config.json (save_pretrained writes one)"
        )
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"pretrained folder {folder}: config.json is unreadable: {exc}") from None
    return str(value)


def _checkpoint_state(family: HfVisionFamily, folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, named as in the zoo's wrapper (``net.`` + the HF name)."""
    transformers = importlib.import_module("transformers")
    model_class = getattr(transformers, family.model_class)
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # its per-tensor progress bar would go to a CLI's stdout
    try:
        net = model_class.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"pretrained folder {folder} cannot be loaded: {first}") from None
    finally:
        if shown:
            bars.enable_progress_bar()
    return {f"net.{name}": tensor for name, tensor in net.state_dict().items()}


def resize_positions(positions: torch.Tensor, tokens: int) -> torch.Tensor:
    """ViT position embeddings ``(1, 1 + g*g, D)`` resized to ``(1, tokens, D)``: the class
    token's row is kept, the ``g x g`` grid is resized bicubically to the new grid."""
    old_grid = math.isqrt(positions.shape[1] - 1)
    new_grid = math.isqrt(tokens - 1)
    if old_grid * old_grid != positions.shape[1] - 1 or new_grid * new_grid != tokens - 1:
        raise ConfigError(
            f"position embeddings of {positions.shape[1]} tokens cannot be resized to {tokens}"
        )
    cls_row, grid = positions[:, :1], positions[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = functional.interpolate(
        grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(positions.dtype)
    return torch.cat([cls_row, grid], dim=1)


def load_pretrained(
    spec: ModelSpec, folder: Path, *, keep_head: bool = False, seed: int = 0
) -> tuple[nn.Module, PretrainedLoad]:
    """The spec's model with the weights of the checkpoint in ``folder`` (module docstring).

    Args:
        spec: a ``transformers`` zoo architecture and the job's shape.
        folder: a ``from_pretrained`` folder (``config.json`` and the weights) of the same
            family and size.
        keep_head: keep the checkpoint's classification head when its shape fits
            ``num_classes`` (a checkpoint already fine-tuned on these classes).
        seed: seeds the initialisation of what is not copied (the head).

    Returns:
        The model (CPU, training mode) and what was copied.

    Raises:
        ConfigError: not such an architecture, no usable folder, a checkpoint of another
            family, or one whose tensors do not fit (another size: the first one is named).
    """
    arch = _hf_architecture(spec)
    model = build_model(spec, seed=seed)
    return model, copy_pretrained(model, arch.family, folder, keep_head=keep_head, name=spec.arch)


def copy_pretrained(
    model: nn.Module,
    family: HfVisionFamily,
    folder: Path,
    *,
    keep_head: bool = False,
    name: str = "the model",
) -> PretrainedLoad:
    """Copies the checkpoint in ``folder`` into ``model`` (an :class:`HfImageClassifier` of
    ``family``), in place; see :func:`load_pretrained`. ``name`` is used in messages."""
    if not folder.is_dir():
        raise ConfigError(f"pretrained folder {folder} does not exist or is not a directory")
    model_type = _model_type(folder)
    if model_type != family.model_type:
        raise ConfigError(
            f"pretrained folder {folder} holds a {model_type!r} model; {name} starts from "
            f"{family.model_type!r} checkpoints"
        )
    source = _checkpoint_state(family, folder)
    target = model.state_dict()
    unfit = f"pretrained folder {folder} does not fit {name}"
    copied, fresh, resized = 0, [], []
    with torch.no_grad():
        for key, tensor in target.items():
            value = source.get(key)
            if key.startswith(HEAD_PREFIX) and (
                not keep_head or value is None or value.shape != tensor.shape
            ):
                fresh.append(key)
                continue
            if value is None:
                raise ConfigError(f"{unfit}: it has no {key}")
            if key == _VIT_POSITIONS and value.shape != tensor.shape:
                value = resize_positions(value, tensor.shape[1])
                resized.append(key)
            if value.shape != tensor.shape:
                raise ConfigError(
                    f"{unfit}: {key} has shape {list(value.shape)} there, "
                    f"{list(tensor.shape)} here (a checkpoint of another size?)"
                )
            tensor.copy_(value)
            copied += 1
    unexpected = [
        key
        for key in source
        if key not in target
        and not key.startswith(HEAD_PREFIX)
        and not key.endswith(_BATCHNORM_STATS)
    ]
    if unexpected:
        raise ConfigError(
            f"{unfit}: {unexpected[0]} has no place here ({len(unexpected)} such tensors; a "
            "checkpoint of another size?)"
        )
    report = PretrainedLoad(
        str(folder), model_type, copied, tuple(fresh), tuple(resized), len(source) - copied
    )
    log.info(
        "%s from %s: %d tensors copied, %d fresh, %d resized, %d dropped",
        name,
        folder,
        report.copied,
        len(report.fresh),
        len(report.resized),
        report.dropped,
    )
    return report
