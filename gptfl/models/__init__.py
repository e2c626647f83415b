"""The model zoo: build a downstream model from a :class:`ModelSpec` by architecture name.

Built-in architectures register on import; installed packages add theirs through the
``gptfl.models`` entry-point group (see :mod:`gptfl.models.registry` and docs/models.md).
"""

from gptfl.models import cnn, hf_vision, resnet  # noqa: F401  (importing registers them)
from gptfl.models.registry import (
    ENTRY_POINT_GROUP,
    Architecture,
    Builder,
    ProbeShape,
    architecture,
    architectures,
    available_architectures,
    build_model,
    register,
)
from gptfl.models.spec import ModelSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "Architecture",
    "Builder",
    "ModelSpec",
    "ProbeShape",
    "architecture",
    "architectures",
    "available_architectures",
    "build_model",
    "register",
]
