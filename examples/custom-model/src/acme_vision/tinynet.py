"""``acme-tinynet``: a small all-convolutional classifier for RGB or grayscale images.

What GPT-FL asks of an architecture:

- a builder ``ModelSpec -> nn.Module`` whose ``forward(x)`` maps a float batch
  ``(N, in_channels, image_size, image_size)`` in [0, 1] to logits ``(N, num_classes)``;
- a :class:`~gptfl.errors.ConfigError` naming the supported range for a shape it cannot take;
- no BatchNorm: FedAvg averages every state-dict entry, and averaged running statistics do
  not describe any silo's data (Opacus refuses BatchNorm as well). GroupNorm has none.
"""

from __future__ import annotations

import torch
from torch import nn

from gptfl.errors import ConfigError
from gptfl.models import Architecture, ModelSpec, ProbeShape

MIN_IMAGE_SIZE = 16


class TinyNet(nn.Module):
    """Two stride-2 conv blocks, global average pooling and a linear head."""

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


def build_tinynet(spec: ModelSpec) -> nn.Module:
    """Builds ``acme-tinynet`` for ``spec``; any image size from 16 up."""
    if spec.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"model architecture 'acme-tinynet' needs image_size >= {MIN_IMAGE_SIZE}, "
            f"got {spec.image_size}"
        )
    return TinyNet(in_channels=spec.in_channels, num_classes=spec.num_classes)


#: what the entry point names: the builder, and a shape it supports (for its fingerprint)
TINYNET = Architecture(
    build=build_tinynet, probe=ProbeShape(num_classes=10, in_channels=3, image_size=32)
)
