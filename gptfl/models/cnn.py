"""``cnn-small``: a compact CNN for small grayscale (or RGB) images, 8x8 up to 28x28."""

from __future__ import annotations

import torch
from torch import nn

from gptfl.errors import ConfigError
from gptfl.models.registry import ProbeShape, register
from gptfl.models.spec import ModelSpec

MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 28
_POOLED_SIZE = 4


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # GroupNorm instead of BatchNorm: no running statistics, so the state_dict holds only
    # parameters that FedAvg can average, and it behaves the same for any batch size.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(num_groups=8, num_channels=out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCnn(nn.Module):
    """Three 3x3 conv blocks (one 2x downsampling for inputs >= 16) and a linear classifier."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        # Downsample only when there is room for it; an 8x8 digit would lose too much detail.
        downsample: nn.Module = nn.MaxPool2d(2) if image_size >= 16 else nn.Identity()
        self.features = nn.Sequential(
            _conv_block(in_channels, 16),
            _conv_block(16, 32),
            downsample,
            _conv_block(32, 32),
            # A fixed spatial size keeps the classifier identical for every supported input size.
            nn.AdaptiveAvgPool2d(_POOLED_SIZE),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * _POOLED_SIZE * _POOLED_SIZE, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # type: ignore[no-any-return]


@register("cnn-small", probe=ProbeShape(image_size=MAX_IMAGE_SIZE))
def build_cnn_small(spec: ModelSpec) -> nn.Module:
    """Builds ``cnn-small`` for ``spec``; supports image sizes 8 to 28."""
    if not MIN_IMAGE_SIZE <= spec.image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"model architecture 'cnn-small' supports image_size {MIN_IMAGE_SIZE} to "
            f"{MAX_IMAGE_SIZE}, got {spec.image_size}"
        )
    return SmallCnn(
        in_channels=spec.in_channels, num_classes=spec.num_classes, image_size=spec.image_size
    )
