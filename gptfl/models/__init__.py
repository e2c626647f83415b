"""The model zoo: build a downstream model from a :class:`ModelSpec` by architecture name."""

from gptfl.models import cnn, resnet  # noqa: F401  (importing registers the architectures)
from gptfl.models.registry import available_architectures, build_model, register
from gptfl.models.spec import ModelSpec

__all__ = ["ModelSpec", "available_architectures", "build_model", "register"]
