"""Name -> builder registry of the model zoo, built-in and brought by installed packages.

Architectures come from two places:

- the built-in zoo (``cnn-small``, ``resnet20``, ...), which registers itself with
  :func:`register` when :mod:`gptfl.models` is imported;
- installed packages that declare an entry point in the ``gptfl.models`` group (see
  docs/models.md). The entry point's name is the architecture's name; it points at a builder
  (``ModelSpec -> nn.Module``) or at an :class:`Architecture`. They are loaded once, on first
  use, so the same name resolves in every process that has the package installed: the
  coordinator, the silo agents and the synth service.

Everything else builds models only through :func:`build_model`, so a job spec names an
architecture by a stable string and never by a class path.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from gptfl import __version__
from gptfl.errors import ConfigError
from gptfl.models.spec import ModelSpec

log = logging.getLogger(__name__)

Builder = Callable[[ModelSpec], torch.nn.Module]

#: the entry-point group an installed package declares its architectures in
ENTRY_POINT_GROUP = "gptfl.models"
#: the provider name of the built-in architectures (this distribution's name)
BUILTIN_PROVIDER = "gpt-fl"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ProbeShape:
    """An input/output shape the builder supports, used to fingerprint its parameter layout.

    Attributes:
        num_classes: output logits of the probe build.
        in_channels: 1 or 3.
        image_size: square input side.
    """

    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32

    def spec(self, arch: str) -> ModelSpec:
        return ModelSpec(
            arch=arch,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
        )


@dataclass(frozen=True)
class Architecture:
    """What a ``gptfl.models`` entry point may point at: a builder and the shape to probe it at.

    A plain builder function is also accepted; it is probed at :class:`ProbeShape`'s defaults
    (10 classes, 3 channels, 32x32), so a builder that refuses that shape must come wrapped in
    an :class:`Architecture` naming one it supports.

    Attributes:
        build: ``ModelSpec -> nn.Module``; raises :class:`~gptfl.errors.ConfigError` for shapes
            it does not support.
        probe: a shape ``build`` supports.
    """

    build: Builder
    probe: ProbeShape = field(default_factory=ProbeShape)


@dataclass(frozen=True)
class RegisteredArchitecture:
    """One architecture as this process resolves it.

    Attributes:
        name: the registry name a job spec uses.
        build: the builder.
        probe: the shape its layout fingerprint is taken at.
        provider: the distribution that provides it (``gpt-fl`` for the built-in zoo).
        provider_version: that distribution's version.
        layout_from: for a built-in architecture that wraps a large library, that
            library's distribution name: its version stands for the parameter layout in the
            fingerprint, so that fingerprinting does not import it (see
            :func:`gptfl.models.fingerprint.fingerprint`).
    """

    name: str
    build: Builder
    probe: ProbeShape
    provider: str
    provider_version: str
    layout_from: str | None = None

    @property
    def builtin(self) -> bool:
        return self.provider == BUILTIN_PROVIDER


_BUILTINS: dict[str, RegisteredArchitecture] = {}
# Reentrant: a plugin's module may look up architectures while it is being imported.
_lock = threading.RLock()
_plugins: dict[str, RegisteredArchitecture] | None = None
#: name -> why an entry point of that name was not registered
_problems: dict[str, str] = {}


def register(
    name: str, *, probe: ProbeShape | None = None, layout_from: str | None = None
) -> Callable[[Builder], Builder]:
    """Registers a built-in builder under ``name``.

    Args:
        name: the architecture's registry name.
        probe: a shape the builder supports (for the layout fingerprint); the
            :class:`ProbeShape` defaults when left out.
        layout_from: the distribution whose version identifies the layout instead of a
            probe build (see :class:`RegisteredArchitecture`).

    Returns:
        A decorator that records the builder and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered or malformed (a programming error, not a
            config one).
    """

    def decorator(builder: Builder) -> Builder:
        if not _NAME.match(name):
            raise ValueError(f"model architecture name {name!r} is malformed")
        if name in _BUILTINS:
            raise ValueError(f"model architecture {name!r} is already registered")
        _BUILTINS[name] = RegisteredArchitecture(
            name, builder, probe or ProbeShape(), BUILTIN_PROVIDER, __version__, layout_from
        )
        return builder

    return decorator


def reload_plugins() -> None:
    """Forgets the loaded entry points; the next lookup scans the installed packages again.

    A process loads them once; this is for tests and tools that change ``sys.path``.
    """
    global _plugins
    with _lock:
        _plugins = None
        _problems.clear()
    importlib.invalidate_caches()


def _loaded() -> dict[str, RegisteredArchitecture]:
    global _plugins
    with _lock:
        if _plugins is None:
            _plugins = {}  # what a lookup from inside a plugin's import sees
            _plugins = _load_entry_points(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        return _plugins


def _load_entry_points(
    entry_points: Iterable[importlib.metadata.EntryPoint],
) -> dict[str, RegisteredArchitecture]:
    """Loads every entry point; those that cannot be used are logged and kept in _problems."""
    found: dict[str, list[RegisteredArchitecture]] = {}
    for entry in entry_points:
        dist = entry.dist
        provider = dist.name if dist is not None else "unknown"
        version = dist.version if dist is not None else "unknown"
        where = f"entry point {entry.name!r} of {provider} {version}"
        if not _NAME.match(entry.name):
            _problem(entry.name, f"{where}: the name must be lowercase letters, digits, . _ -")
            continue
        if entry.name in _BUILTINS:
            _problem(entry.name, f"{where} is ignored: the name is a built-in architecture")
            continue
        try:
            target = entry.load()
        except Exception as exc:  # noqa: BLE001 - any import error of a third-party package
            _problem(entry.name, f"{where} failed to load: {type(exc).__name__}: {exc}")
            continue
        if isinstance(target, Architecture):
            build, probe = target.build, target.probe
        elif callable(target):
            build, probe = target, ProbeShape()
        else:
            _problem(
                entry.name,
                f"{where} points at a {type(target).__name__}, not a builder or an Architecture",
            )
            continue
        found.setdefault(entry.name, []).append(
            RegisteredArchitecture(entry.name, build, probe, provider, version)
        )
    plugins: dict[str, RegisteredArchitecture] = {}
    for name, candidates in found.items():
        if len(candidates) > 1:
            providers = " and ".join(f"{c.provider} {c.provider_version}" for c in candidates)
            _problem(name, f"model architecture {name!r} is provided by both {providers}")
            continue
        plugins[name] = candidates[0]
        log.info(
            "model architecture %s from %s %s",
            name,
            candidates[0].provider,
            candidates[0].provider_version,
        )
    return plugins


def _problem(name: str, message: str) -> None:
    log.error("%s", message)
    _problems[name] = message


def plugin_problems() -> dict[str, str]:
    """Entry points that were not registered, by name, with the reason (one line each)."""
    _loaded()
    with _lock:
        return dict(_problems)


def architectures() -> list[RegisteredArchitecture]:
    """Every architecture this process resolves, built-in first, each group sorted by name."""
    plugins = _loaded()
    return [_BUILTINS[n] for n in sorted(_BUILTINS)] + [plugins[n] for n in sorted(plugins)]


def available_architectures() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_BUILTINS.keys() | _loaded().keys())


def architecture(name: str) -> RegisteredArchitecture:
    """The architecture registered as ``name``.

    Raises:
        ConfigError: no such architecture (the message lists the available ones, and says why
            an entry point of that name was not registered when one was found).
    """
    found = _BUILTINS.get(name) or _loaded().get(name)
    if found is not None:
        return found
    available = ", ".join(available_architectures()) or "none"
    message = f"unknown model architecture {name!r} (available: {available})"
    problem = plugin_problems().get(name)
    if problem is not None:
        message = f"{message}; {problem}"
    raise ConfigError(message)


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
    builder = architecture(spec.arch).build
    if seed is None:
        return builder(spec)
    # fork_rng restores the global CPU generator afterwards, so seeding the init here does not
    # change random draws elsewhere in the process. Builders run on the CPU only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(spec)
