"""Model fingerprints: does an architecture name mean the same model in two processes?

A silo trains whatever its own installation builds for a name, and the coordinator averages
what comes back by tensor name. Both must therefore resolve each name to the same code and
the same parameter layout. A :class:`ModelFingerprint` says, for one architecture, which
distribution provides it (and its version) and a digest of the layout it builds at its probe
shape (every state-dict entry's name, shape and dtype, in order). A silo sends its
fingerprints when it registers; the coordinator compares them with its own
(:func:`mismatch_reason`) and refuses the silo with that one-line reason.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from gptfl.errors import ConfigError, ModelMismatchError
from gptfl.models.registry import RegisteredArchitecture, architectures

log = logging.getLogger(__name__)

#: how many hex digits of a layout digest a message shows
SHORT_DIGEST = 12
#: the in-place random fills that initialise parameters (torch.nn.init's building blocks)
_RANDOM_FILLS = frozenset(
    {"normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "log_normal_"}
    | {"cauchy_", "random_"}
)


class _SkipRandomFills(TorchFunctionMode):
    """Skips random fills of meta tensors. The values do not enter a layout, and on the meta
    device these ops have no kernel: PyTorch decomposes them through code that imports
    torch._dynamo on first use (about 1 s and 75 MB in every process that fingerprints)."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if (
            getattr(func, "__name__", "") in _RANDOM_FILLS
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].is_meta
        ):
            return args[0]
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class ModelFingerprint:
    """One architecture as one process resolves it.

    Attributes:
        arch: the registry name.
        provider: the distribution providing it (``gpt-fl`` for the built-in zoo).
        provider_version: that distribution's version; for a built-in architecture that
            wraps a large library, followed by that library's version in parentheses.
        layout_sha256: :func:`layout_digest` of the model built at the architecture's probe
            shape; empty when the versions stand for the layout (such a built-in).
    """

    arch: str
    provider: str
    provider_version: str
    layout_sha256: str

    def source(self) -> str:
        """``provider version``, as messages show it."""
        return f"{self.provider} {self.provider_version}"


def parameter_layout(state: Mapping[str, torch.Tensor]) -> list[tuple[str, list[int], str]]:
    """``(name, shape, dtype)`` of every entry of a state dict, in its order."""
    return [
        (name, list(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for name, tensor in state.items()
    ]


def layout_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of :func:`parameter_layout`: equal exactly when names, their order, shapes
    and dtypes are equal. The values do not enter it."""
    canonical = json.dumps(parameter_layout(state), separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def fingerprint(arch: RegisteredArchitecture) -> ModelFingerprint:
    """The fingerprint of ``arch``, built at its probe shape.

    The model is built on PyTorch's ``meta`` device, which allocates no memory, with its
    random initialisation skipped, so even a large model costs little; a builder that cannot
    build there is built on the CPU instead.

    A built-in architecture that wraps a large library (``layout_from``: the ``transformers``
    models) is not built: importing ``transformers``' model code costs every process about
    2.5 s and 130 MB, most of them never build such a model, and gpt-fl's version with the
    library's fixes its code and so its layout. Its version reads ``0.1.0 (transformers
    5.24.0)`` and its layout digest is empty.

    Raises:
        ConfigError: the builder refuses its own probe shape.
    """
    if arch.layout_from is not None:
        try:
            library = importlib.metadata.version(arch.layout_from)
        except importlib.metadata.PackageNotFoundError:
            library = "not installed"
        version = f"{arch.provider_version} ({arch.layout_from} {library})"
        return ModelFingerprint(arch.name, arch.provider, version, "")
    spec = arch.probe.spec(arch.name)
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"), _SkipRandomFills():
                state = arch.build(spec).state_dict()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - third-party builders fail in their own ways
            log.debug("%s does not build on the meta device (%s); using the CPU", arch.name, exc)
            state = arch.build(spec).state_dict()
    return ModelFingerprint(arch.name, arch.provider, arch.provider_version, layout_digest(state))


def local_fingerprints() -> tuple[ModelFingerprint, ...]:
    """Fingerprints of every architecture this process resolves, sorted by name.

    An architecture that cannot be built at its own probe shape is left out (and logged): it
    is broken wherever it is installed, and building it for a job fails with its own error.
    """
    found: list[ModelFingerprint] = []
    for arch in architectures():
        try:
            found.append(fingerprint(arch))
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the others
            log.error(
                "model architecture %s (%s %s) does not build at its probe shape: %s",
                arch.name,
                arch.provider,
                arch.provider_version,
                exc,
            )
    return tuple(sorted(found, key=lambda f: f.arch))


def mismatch_reason(
    coordinator: Iterable[ModelFingerprint], silo: Iterable[ModelFingerprint]
) -> str | None:
    """Why a silo's architectures do not match the coordinator's, in one line; None if they do.

    Only names both sides know are compared: a silo may lack a package it has no job for
    (a task on an architecture it lacks fails at the silo and says so), but a name both know
    must come from the same provider and version and build the same layout (when both sides
    have a layout digest: an empty one means the versions stand for it).
    """
    ours = {f.arch: f for f in coordinator}
    differences: list[str] = []
    for theirs in sorted(silo, key=lambda f: f.arch):
        mine = ours.get(theirs.arch)
        if mine is None or mine == theirs:
            continue
        if mine.source() != theirs.source():
            differences.append(
                f"model architecture {theirs.arch!r} comes from {mine.source()} at the "
                f"coordinator but from {theirs.source()} at the silo"
            )
        elif mine.layout_sha256 and theirs.layout_sha256:
            differences.append(
                f"model architecture {theirs.arch!r} ({mine.source()}) builds a different "
                f"parameter layout at the silo (layout {theirs.layout_sha256[:SHORT_DIGEST]}, "
                f"coordinator {mine.layout_sha256[:SHORT_DIGEST]})"
            )
    if not differences:
        return None
    more = len(differences) - 1
    return differences[0] + (f" (and {more} more architecture(s) differ)" if more else "")


def check_silo_models(
    coordinator: Iterable[ModelFingerprint], silo: Iterable[ModelFingerprint]
) -> None:
    """Raises :class:`~gptfl.errors.ModelMismatchError` with :func:`mismatch_reason`'s line
    when the silo's architectures do not match the coordinator's."""
    reason = mismatch_reason(coordinator, silo)
    if reason is not None:
        raise ModelMismatchError(reason)
