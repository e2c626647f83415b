"""Synthetic dataset artifacts: generate, store in checksummed shards, read back, regenerate.

An artifact is a directory::

    manifest.json            what was generated and how, and a sha256 per shard
    shard-00000.safetensors  "images": uint8 (n, C, S, S), "labels": int64 (n,)
    shard-00001.safetensors  ...

Images are stored as uint8 (value ``round(255 * x)``) at the task's input shape. The manifest
records the generator (backend, id, content hash, sampling settings), the labels, the prompts,
and per image its label, prompt, seed and guidance scale: with the same generator,
:func:`regenerate` replays that plan and reproduces the shards bit for bit (on the CPU, with
the same software versions). Shards are written before the manifest, each atomically, so a
directory with a manifest holds a complete artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic

from gptfl import atomic_io
from gptfl.config_loading import StrictModel, format_validation_error
from gptfl.data.dataset import ArrayDataset
from gptfl.errors import ChecksumError, ConfigError, ResourceLimitError, ValidationError
from gptfl.synth_spec import SynthesisRequest
from synth_service.generators.base import (
    Generator,
    ImageSpec,
    ProgressCallback,
    StepCheck,
    plan_images,
)
from synth_service.prompts import PromptExpander, build_prompts
from synth_service.resize import fit_images

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION: Literal[1] = 1
DEFAULT_IMAGES_PER_SHARD = 4096


class ShardEntry(StrictModel):
    """One shard file of an artifact."""

    file: str
    count: int = pydantic.Field(ge=0)
    sha256: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(StrictModel):
    """Everything needed to verify and to regenerate an artifact."""

    format_version: Literal[1] = FORMAT_VERSION
    backend: str
    generator_id: str
    generator_hash: str
    generator_settings: dict[str, Any]
    request: SynthesisRequest
    prompts: dict[str, list[str]]
    counts: dict[str, int]
    #: per image, in dataset order: label index, prompt index (into ``prompts[label]``), seed
    #: and guidance scale
    image_labels: list[int]
    image_prompts: list[int]
    image_seeds: list[int]
    image_guidance: list[float]
    storage: Literal["uint8"] = "uint8"
    shards: list[ShardEntry]
    #: sha256 over the shard hashes in order: one value that names the data
    dataset_sha256: str

    @pydantic.model_validator(mode="after")
    def _lengths(self) -> Manifest:
        total = len(self.image_labels)
        if (
            not len(self.image_prompts)
            == len(self.image_seeds)
            == len(self.image_guidance)
            == total
        ):
            raise ValueError("per-image lists must all have the same length")
        if sum(shard.count for shard in self.shards) != total:
            raise ValueError("shard counts do not add up to the number of images")
        return self


@dataclass(frozen=True)
class SyntheticDataset:
    """A synthetic dataset in memory with its manifest.

    Attributes:
        data: float32 images in [0, 1] at the task's shape, int64 labels.
        manifest: how it was made, with the shard checksums.
    """

    data: ArrayDataset
    manifest: Manifest


def synthesize(
    generator: Generator,
    request: SynthesisRequest,
    *,
    batch_size: int = 32,
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
    expander: PromptExpander | None = None,
    progress: ProgressCallback | None = None,
    step_check: StepCheck | None = None,
) -> SyntheticDataset:
    """Generates the dataset that ``request`` asks for.

    Labels, prompts and guidance are validated before any sampling.

    Args:
        generator: the backend with its model.
        request: labels, counts, target shape, seed, prompt and guidance settings.
        batch_size: images per generator call.
        images_per_shard: images per stored shard.
        expander: optional text-to-text prompt expander (text-to-image only).
        progress: called with (images done, images total) after each batch.
        step_check: called before every denoising step; raises to stop (see
            :meth:`~synth_service.generators.base.Generator.generate`).

    Raises:
        ValidationError: a label the generator does not know, or guidance it cannot apply.
        ConfigError: bad prompt settings.
    """
    generator.check_labels(request.labels)
    if generator.label_names is None:
        prompts = build_prompts(
            request.labels,
            per_label=request.prompts_per_label,
            seed=request.seed,
            overrides=request.prompt_overrides,
            expander=expander,
        )
    else:
        # A class-conditional model draws the label itself; the "prompt" is the label name.
        prompts = {label: [label] for label in request.labels}
    specs = plan_images(
        request.labels,
        images_per_label=request.images_per_label,
        prompts=prompts,
        seed=request.seed,
        guidance_range=(request.guidance_min, request.guidance_max),
        guidance_step=request.guidance_step,
    )
    images, labels = _render(
        generator, request, specs, batch_size=batch_size, progress=progress, step_check=step_check
    )
    shards = _encode_shards(images, labels, images_per_shard=images_per_shard)
    label_index = {label: i for i, label in enumerate(request.labels)}
    manifest = Manifest(
        backend=generator.backend,
        generator_id=generator.generator_id,
        generator_hash=generator.content_hash,
        generator_settings=generator.settings(),
        request=request,
        prompts=prompts,
        counts=dict.fromkeys(request.labels, request.images_per_label),
        image_labels=[label_index[s.label] for s in specs],
        image_prompts=[prompts[s.label].index(s.prompt) for s in specs],
        image_seeds=[s.seed for s in specs],
        image_guidance=[s.guidance for s in specs],
        shards=[entry for entry, _ in shards],
        dataset_sha256=_dataset_hash([entry for entry, _ in shards]),
    )
    logger.info(
        "synthesized %d images for %d labels with %s (dataset %s)",
        len(specs),
        len(request.labels),
        generator.generator_id,
        manifest.dataset_sha256[:12],
    )
    return SyntheticDataset(data=_dequantize(images, labels), manifest=manifest)


def check_artifact_target(directory: Path) -> None:
    """Raises ConfigError when ``directory`` already holds an artifact (none is overwritten)."""
    if (Path(directory) / MANIFEST_NAME).exists():
        raise ConfigError(f"{directory} already holds a synthetic dataset artifact")


def write_artifact(dataset: SyntheticDataset, directory: Path) -> Path:
    """Writes the shards, then the manifest; returns the manifest's path.

    Raises:
        ConfigError: ``directory`` already holds an artifact.
        ChecksumError: the data does not match the manifest's shard checksums.
    """
    directory = Path(directory)
    check_artifact_target(directory)
    manifest_path = directory / MANIFEST_NAME
    shards = _encode_shards(
        quantize(dataset.data.x), dataset.data.y, images_per_shard=_shard_size(dataset.manifest)
    )
    if [entry for entry, _ in shards] != dataset.manifest.shards:
        raise ChecksumError("the dataset's images do not match its manifest's shard checksums")
    for entry, payload in shards:
        atomic_io.write_bytes(directory / entry.file, payload)
    atomic_io.write_text(manifest_path, dataset.manifest.model_dump_json(indent=2) + "\n")
    return manifest_path


def read_manifest(path: Path) -> Manifest:
    """Parses an artifact's manifest (``path`` is the file or its directory).

    Raises:
        ValidationError: the file is missing, not JSON, or not a valid manifest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValidationError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    try:
        return Manifest.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValidationError(format_validation_error(exc, source=str(path))) from None


def _verified_shard(directory: Path, entry: ShardEntry) -> bytes:
    """The shard's bytes, once their sha256 matches the manifest's.

    Raises:
        ValidationError: the manifest names a path instead of a file name.
        ChecksumError: the shard is missing, unreadable or altered (data lost on the service).
    """
    if Path(entry.file).name != entry.file:
        raise ValidationError(f"shard name {entry.file!r} must be a plain file name")
    try:
        payload = (Path(directory) / entry.file).read_bytes()
    except OSError as exc:
        raise ChecksumError(f"shard {entry.file} cannot be read: {exc.strerror or exc}") from None
    actual = hashlib.sha256(payload).hexdigest()
    if actual != entry.sha256:
        raise ChecksumError(
            f"shard {entry.file} is corrupt: sha256 {actual[:16]}..., "
            f"manifest says {entry.sha256[:16]}..."
        )
    return payload


def shards_intact(directory: Path, manifest: Manifest) -> bool:
    """Whether every shard the manifest lists is in ``directory`` with its sha256."""
    try:
        for entry in manifest.shards:
            _verified_shard(directory, entry)
    except (ChecksumError, ValidationError):
        return False
    return True


def read_artifact(directory: Path) -> SyntheticDataset:
    """Reads an artifact and verifies every shard's sha256, shapes and labels.

    Raises:
        ValidationError: a missing or malformed manifest or shard.
        ChecksumError: a shard's sha256 differs from the manifest's.
    """
    from safetensors.numpy import load

    directory = Path(directory)
    manifest = read_manifest(directory)
    request = manifest.request
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for entry in manifest.shards:
        path = directory / entry.file
        payload = _verified_shard(directory, entry)
        try:
            tensors = load(payload)
        except Exception as exc:  # safetensors raises its own error types
            raise ValidationError(f"shard {path} is not a safetensors file: {exc}") from None
        shard_images, shard_labels = tensors.get("images"), tensors.get("labels")
        shape = (entry.count, request.in_channels, request.image_size, request.image_size)
        if shard_images is None or shard_images.dtype != np.uint8 or shard_images.shape != shape:
            raise ValidationError(f"shard {entry.file}: expected uint8 images of shape {shape}")
        if (
            shard_labels is None
            or shard_labels.dtype != np.int64
            or shard_labels.shape != shape[:1]
        ):
            raise ValidationError(f"shard {entry.file}: expected {entry.count} int64 labels")
        images.append(shard_images)
        labels.append(shard_labels)
    y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    if y.tolist() != manifest.image_labels:
        raise ValidationError("the shards' labels differ from the manifest's image labels")
    if _dataset_hash(manifest.shards) != manifest.dataset_sha256:
        raise ChecksumError("the manifest's dataset_sha256 does not match its shard checksums")
    x = np.concatenate(images) if images else np.zeros((0, *shape[1:]), dtype=np.uint8)
    return SyntheticDataset(data=_dequantize(x, y), manifest=manifest)


def regenerate(
    manifest: Manifest,
    generator: Generator,
    *,
    batch_size: int = 32,
    verify: bool = True,
    progress: ProgressCallback | None = None,
) -> SyntheticDataset:
    """Replays a manifest's plan with ``generator``: the same dataset, bit for bit.

    Args:
        manifest: the artifact's manifest.
        generator: the generator named by the manifest (same content hash and settings).
        batch_size: images per generator call.
        verify: compare the regenerated shards' sha256 with the manifest's.
        progress: called with (images done, images total) after each batch.

    Raises:
        ValidationError: another generator (backend, content hash or settings differ).
        ChecksumError: with ``verify``, the regenerated data differs from the manifest.
    """
    if generator.backend != manifest.backend:
        raise ValidationError(
            f"the artifact was made by backend {manifest.backend!r}, not {generator.backend!r}"
        )
    if generator.content_hash != manifest.generator_hash:
        raise ValidationError(
            f"generator {generator.generator_id!r} has content hash "
            f"{generator.content_hash[:16]}..., the artifact was made by "
            f"{manifest.generator_id!r} with {manifest.generator_hash[:16]}..."
        )
    settings = json.loads(json.dumps(generator.settings()))
    if settings != manifest.generator_settings:
        differing = sorted(
            key
            for key in set(settings) | set(manifest.generator_settings)
            if settings.get(key) != manifest.generator_settings.get(key)
        )
        raise ValidationError(f"generator settings differ from the artifact's: {differing}")
    request = manifest.request
    specs = [
        ImageSpec(
            label=request.labels[label],
            prompt=manifest.prompts[request.labels[label]][prompt],
            seed=seed,
            guidance=guidance,
        )
        for label, prompt, seed, guidance in zip(
            manifest.image_labels,
            manifest.image_prompts,
            manifest.image_seeds,
            manifest.image_guidance,
            strict=True,
        )
    ]
    generator.check_labels(request.labels)
    images, labels = _render(generator, request, specs, batch_size=batch_size, progress=progress)
    shards = _encode_shards(images, labels, images_per_shard=_shard_size(manifest))
    if verify:
        for (entry, _), expected in zip(shards, manifest.shards, strict=True):
            if entry != expected:
                raise ChecksumError(
                    f"regenerated shard {entry.file} has sha256 {entry.sha256[:16]}..., "
                    f"the manifest says {expected.sha256[:16]}..."
                )
    return SyntheticDataset(data=_dequantize(images, labels), manifest=manifest)


def manifest_sha256(manifest: Manifest) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys): the artifact's provenance id."""
    canonical = json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def estimate_artifact_bytes(request: SynthesisRequest) -> int:
    """An upper bound of the artifact's size on disk (images, labels, headers, manifest)."""
    count = len(request.labels) * request.images_per_label
    per_image = request.in_channels * request.image_size**2 + 8 + 64
    return count * per_image + 64 * 1024


def check_disk_space(directory: Path, needed_bytes: int) -> None:
    """Raises ResourceLimitError when the file system of ``directory`` lacks ``needed_bytes``."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise ResourceLimitError(
            f"not enough disk space in {directory}: {needed_bytes} bytes needed, {free} free"
        )


def _render(
    generator: Generator,
    request: SynthesisRequest,
    specs: Sequence[ImageSpec],
    *,
    batch_size: int,
    progress: ProgressCallback | None,
    step_check: StepCheck | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generates and fits to the task's shape: uint8 images and int64 labels."""
    raw = generator.generate(specs, batch_size=batch_size, progress=progress, step_check=step_check)
    fitted = fit_images(
        raw,
        in_channels=request.in_channels,
        image_size=request.image_size,
        mode=request.resize_mode,
    )
    index = {label: i for i, label in enumerate(request.labels)}
    labels = np.asarray([index[s.label] for s in specs], dtype=np.int64)
    return quantize(fitted), labels


def quantize(x: np.ndarray) -> np.ndarray:
    """float images in [0, 1] -> uint8 levels ``round(255 * x)``."""
    levels: np.ndarray = np.rint(np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    return levels


def _dequantize(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
    return ArrayDataset(x=images.astype(np.float32) / np.float32(255.0), y=labels)


def _encode_shards(
    images: np.ndarray, labels: np.ndarray, *, images_per_shard: int
) -> list[tuple[ShardEntry, bytes]]:
    from safetensors.numpy import save

    if images_per_shard < 1:
        raise ConfigError(f"images per shard must be >= 1, got {images_per_shard}")
    shards = []
    for number, start in enumerate(range(0, max(labels.shape[0], 1), images_per_shard)):
        chunk = slice(start, start + images_per_shard)
        payload = save(
            {
                "images": np.ascontiguousarray(images[chunk]),
                "labels": np.ascontiguousarray(labels[chunk]),
            }
        )
        entry = ShardEntry(
            file=f"shard-{number:05d}.safetensors",
            count=int(labels[chunk].shape[0]),
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        shards.append((entry, payload))
    return shards


def _shard_size(manifest: Manifest) -> int:
    return max(manifest.shards[0].count, 1) if manifest.shards else DEFAULT_IMAGES_PER_SHARD


def _dataset_hash(shards: Sequence[ShardEntry]) -> str:
    digest = hashlib.sha256()
    for entry in shards:
        digest.update(bytes.fromhex(entry.sha256))
    return digest.hexdigest()
