"""The declarative description of a downstream model: architecture name and input/output shape."""

from __future__ import annotations

import pydantic

from gptfl.config_loading import StrictModel


class ModelSpec(StrictModel):
    """Which architecture to build and for what inputs and classes.

    Attributes:
        arch: registry name of the architecture, e.g. ``"cnn-small"`` or ``"resnet20"``.
        num_classes: number of output logits.
        in_channels: 1 (grayscale) or 3 (RGB).
        image_size: side length of the square input images.
    """

    arch: str = pydantic.Field(min_length=1)
    num_classes: int = pydantic.Field(ge=2)
    in_channels: int = pydantic.Field(ge=1, le=3)
    image_size: int = pydantic.Field(ge=8)

    @pydantic.field_validator("in_channels")
    @classmethod
    def _gray_or_rgb(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError("in_channels must be 1 (grayscale) or 3 (RGB)")
        return value
