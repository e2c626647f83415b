"""Standard vision models from ``transformers``: ResNet-18/50, ConvNeXt-tiny and ViT-B/16.

Each is the ``transformers`` image classifier built from its published configuration with
random weights, its head sized by ``num_classes``, wrapped so that ``forward(x)`` takes the
zoo's inputs (float ``(N, C, H, W)`` in [0, 1], C 1 or 3) and returns logits:

- a grayscale batch is repeated to three channels, so the stem is the published one and a
  public RGB checkpoint loads unchanged (:mod:`gptfl.models.hf_pretrained`);
- the inputs are normalised inside the model with the statistics the public checkpoints
  were trained with (ImageNet's mean and std for ResNet and ConvNeXt, 0.5 and 0.5 for ViT),
  so every process that builds the model normalises alike;
- **BatchNorm is replaced by GroupNorm** in the ResNets (``resnet18-gn``, ``resnet50-gn``):
  FedAvg averages every state-dict entry, and running statistics averaged over silos
  describe none of them; Opacus refuses BatchNorm as well. GroupNorm keeps no statistics.
  ConvNeXt and ViT use LayerNorm already.

``transformers`` is imported on the first build, not when the zoo is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gptfl.errors import ConfigError
from gptfl.models.registry import register
from gptfl.models.spec import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: what google/vit-base-patch16-224 was trained with
HALF = (0.5, 0.5, 0.5)
#: the largest GroupNorm group count used (Wu and He's default)
MAX_GROUPS = 32


def _transformers() -> Any:
    return importlib.import_module("transformers")


@dataclass(frozen=True)
class HfVisionFamily:
    """One ``transformers`` model family as the zoo uses it.

    Attributes:
        model_type: the ``model_type`` of its configs (``resnet``, ``convnext``, ``vit``).
        config_class: the name of its config class in ``transformers``.
        model_class: the name of its image-classification class.
        mean: per-channel input mean the model normalises with.
        std: per-channel input std.
        group_norm: BatchNorm is replaced by GroupNorm.
    """

    model_type: str
    config_class: str
    model_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    group_norm: bool = False


RESNET = HfVisionFamily(
    "resnet", "ResNetConfig", "ResNetForImageClassification", IMAGENET_MEAN, IMAGENET_STD, True
)
CONVNEXT = HfVisionFamily(
    "convnext", "ConvNextConfig", "ConvNextForImageClassification", IMAGENET_MEAN, IMAGENET_STD
)
VIT = HfVisionFamily("vit", "ViTConfig", "ViTForImageClassification", HALF, HALF)


class HfImageClassifier(nn.Module):
    """A ``transformers`` image classifier behind the zoo's interface (see the module doc).

    Attributes:
        net: the ``transformers`` model; its parameters are the whole state dict (the
            normalisation constants are non-persistent buffers).
        family: the model family.
    """

    def __init__(self, net: nn.Module, *, family: HfVisionFamily, in_channels: int) -> None:
        super().__init__()
        self.net = net
        self.family = family
        self._gray = in_channels == 1
        # Not persistent: constants of the architecture, never sent, averaged or loaded.
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(family.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(family.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gray:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        return self.net(pixel_values=x).logits  # type: ignore[no-any-return]


def group_count(channels: int) -> int:
    """The GroupNorm group count for ``channels``: the largest of 32, 16, ..., 1 dividing it."""
    groups = MAX_GROUPS
    while channels % groups:
        groups //= 2
    return groups


def batchnorm_to_groupnorm(module: nn.Module) -> int:
    """Replaces every ``BatchNorm2d`` under ``module`` by a GroupNorm over the same channels,
    in place, keeping the affine weight and bias; returns how many were replaced.

    The running statistics are dropped: GroupNorm normalises each example by itself.
    """
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            norm = nn.GroupNorm(group_count(child.num_features), child.num_features, eps=child.eps)
            norm = norm.to(device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                norm.weight.copy_(child.weight)
                norm.bias.copy_(child.bias)
            setattr(module, name, norm)
            replaced += 1
        else:
            replaced += batchnorm_to_groupnorm(child)
    return replaced


def hf_config(family: HfVisionFamily, spec: ModelSpec, **fields: Any) -> Any:
    """The family's ``transformers`` config for ``spec``: ``fields`` plus 3 channels, the
    spec's classes and (for ViT) its image size."""
    config_class = getattr(_transformers(), family.config_class)
    sized = {"image_size": spec.image_size} if family is VIT else {}
    return config_class(num_channels=3, num_labels=spec.num_classes, **sized, **fields)


def build_hf_classifier(family: HfVisionFamily, spec: ModelSpec, config: Any) -> nn.Module:
    """Builds the family's classifier from ``config`` (random weights) for ``spec``."""
    net = getattr(_transformers(), family.model_class)(config)
    if family.group_norm:
        batchnorm_to_groupnorm(net)
    return HfImageClassifier(net, family=family, in_channels=spec.in_channels)


@dataclass(frozen=True)
class HfArchitecture:
    """A registered ``transformers`` architecture: its family, config fields and sizes.

    Attributes:
        name: the registry name.
        family: the model family.
        fields: config fields beyond the family defaults (the published configuration).
        min_image_size: the smallest input side it takes.
        multiple_of: the input side must be a multiple of this (ViT's patch size).
    """

    name: str
    family: HfVisionFamily
    fields: tuple[tuple[str, Any], ...]
    min_image_size: int = 32
    multiple_of: int = 1

    def check(self, spec: ModelSpec) -> None:
        """Raises :class:`ConfigError` for an input size this architecture cannot take."""
        size = spec.image_size
        if size < self.min_image_size or size % self.multiple_of:
            multiple = f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
            raise ConfigError(
                f"model architecture {self.name!r} supports image_size {self.min_image_size} "
                f"and up{multiple}; got {size}"
            )

    def config(self, spec: ModelSpec) -> Any:
        return hf_config(self.family, spec, **dict(self.fields))

    def build(self, spec: ModelSpec) -> nn.Module:
        self.check(spec)
        return build_hf_classifier(self.family, spec, self.config(spec))


#: the published configurations (microsoft/resnet-18, microsoft/resnet-50,
#: facebook/convnext-tiny-224, google/vit-base-patch16-224)
HF_ARCHITECTURES = {
    a.name: a
    for a in (
        HfArchitecture(
            "resnet18-gn",
            RESNET,
            (
                ("embedding_size", 64),
                ("hidden_sizes", [64, 128, 256, 512]),
                ("depths", [2, 2, 2, 2]),
                ("layer_type", "basic"),
            ),
        ),
        HfArchitecture(
            "resnet50-gn",
            RESNET,
            (
                ("embedding_size", 64),
                ("hidden_sizes", [256, 512, 1024, 2048]),
                ("depths", [3, 4, 6, 3]),
                ("layer_type", "bottleneck"),
            ),
        ),
        HfArchitecture(
            "convnext-tiny",
            CONVNEXT,
            (("hidden_sizes", [96, 192, 384, 768]), ("depths", [3, 3, 9, 3]), ("patch_size", 4)),
        ),
        HfArchitecture(
            "vit-b16",
            VIT,
            (
                ("hidden_size", 768),
                ("num_hidden_layers", 12),
                ("num_attention_heads", 12),
                ("intermediate_size", 3072),
                ("patch_size", 16),
            ),
            multiple_of=16,
        ),
    )
}


def _builder(arch: HfArchitecture) -> Callable[[ModelSpec], nn.Module]:
    def build(spec: ModelSpec) -> nn.Module:
        return arch.build(spec)

    build.__doc__ = f"Builds ``{arch.name}`` ({arch.family.model_class}) for ``spec``."
    return build


for _arch in HF_ARCHITECTURES.values():
    # Fingerprinted by the transformers version, so that fingerprinting imports nothing.
    register(_arch.name, layout_from="transformers")(_builder(_arch))
