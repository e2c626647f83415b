"""``resnet20``: the CIFAR-style ResNet-20 (He et al. 2016) with GroupNorm instead of BatchNorm."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from gptfl.errors import ConfigError
from gptfl.models.registry import register
from gptfl.models.spec import ModelSpec

SUPPORTED_IMAGE_SIZE = 32
_STAGE_WIDTHS = (16, 32, 64)
_BLOCKS_PER_STAGE = 3


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm keeps no running statistics: every state_dict entry is an averageable parameter.
    return nn.GroupNorm(num_groups=min(8, channels // 4), num_channels=channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                _norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return functional.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """3 stages x 3 basic blocks with 16/32/64 channels, global average pooling, linear head."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, _STAGE_WIDTHS[0], 3, padding=1, bias=False),
            _norm(_STAGE_WIDTHS[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        width = _STAGE_WIDTHS[0]
        for stage, out_width in enumerate(_STAGE_WIDTHS):
            for block in range(_BLOCKS_PER_STAGE):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(width, out_width, stride))
                width = out_width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.head(torch.flatten(out, 1))  # type: ignore[no-any-return]


@register("resnet20")
def build_resnet20(spec: ModelSpec) -> nn.Module:
    """Builds ``resnet20`` for ``spec``; supports 32x32 inputs only (the CIFAR shape)."""
    if spec.image_size != SUPPORTED_IMAGE_SIZE:
        raise ConfigError(
            f"model architecture 'resnet20' supports image_size {SUPPORTED_IMAGE_SIZE} only, "
            f"got {spec.image_size}"
        )
    return ResNet20(in_channels=spec.in_channels, num_classes=spec.num_classes)
