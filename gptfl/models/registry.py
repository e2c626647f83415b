"""Name -> builder registry of the model zoo.

Architectures register themselves with :func:`register`; everything else builds models only
through :func:`build_model`, so a job spec names an architecture by a stable string and never
by a class path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptfl.errors import ConfigError
from gptfl.models.spec import ModelSpec

Builder = Callable[[ModelSpec], torch.nn.Module]

_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Registers a builder under ``name``.

    The builder raises :class:`~gptfl.errors.ConfigError` for shapes it does not support.

    Args:
        name: the architecture's registry name.

    Returns:
        A decorator that records the builder and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered (a programming error, not a config one).
    """

    def decorator(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model architecture {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorator


def available_architectures() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_BUILDERS)


def build_model(spec: ModelSpec, *, seed: int | None = None) -> torch.nn.Module:
    """Builds a fresh model for ``spec``.

    Args:
        spec: architecture and input/output shape.
        seed: when given, parameters are initialised deterministically from it without
            disturbing the caller's global random state.

    Returns:
        The model on the CPU, in training mode.

    Raises:
        ConfigError: the architecture is unknown or does not support the spec's shape.
    """
    builder = _BUILDERS.get(spec.arch)
    if builder is None:
        available = ", ".join(available_architectures()) or "none"
        raise ConfigError(f"unknown model architecture {spec.arch!r} (available: {available})")
    if seed is None:
        return builder(spec)
    # fork_rng restores the global CPU generator afterwards, so seeding the init here does not
    # change random draws elsewhere in the process. Builders run on the CPU only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(spec)
