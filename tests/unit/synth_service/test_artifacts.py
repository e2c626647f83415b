"""Synthetic dataset artifacts: round trip, checksums, and bit-for-bit regeneration on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptfl.errors import ChecksumError, ConfigError, ResourceLimitError, ValidationError
from gptfl.synth_spec import SynthesisRequest
from synth_service.artifacts import (
    MANIFEST_NAME,
    SyntheticDataset,
    check_disk_space,
    estimate_artifact_bytes,
    manifest_sha256,
    read_artifact,
    read_manifest,
    regenerate,
    synthesize,
    write_artifact,
)
from synth_service.generators import load_generator
from synth_service.generators.base import Generator
from synth_service.store import DatasetStore

REQUEST = SynthesisRequest(
    labels=["cat", "dog", "bird"],
    images_per_label=4,
    in_channels=1,
    image_size=8,
    seed=11,
    guidance_min=1.0,
    guidance_max=3.0,
)


def _cc(directory: Path, steps: int = 3) -> Generator:
    return load_generator("class-conditional", directory, device="cpu", num_inference_steps=steps)


@pytest.fixture(scope="module")
def made(tiny_class_conditional_dir: Path) -> SyntheticDataset:
    return synthesize(_cc(tiny_class_conditional_dir), REQUEST, batch_size=5, images_per_shard=5)


def test_round_trip_keeps_images_labels_and_manifest(
    made: SyntheticDataset, tmp_path: Path
) -> None:
    manifest_path = write_artifact(made, tmp_path / "artifact")
    assert manifest_path == tmp_path / "artifact" / MANIFEST_NAME
    files = sorted(p.name for p in (tmp_path / "artifact").iterdir())
    assert files == [MANIFEST_NAME, *(f"shard-0000{i}.safetensors" for i in range(3))]
    back = read_artifact(tmp_path / "artifact")
    np.testing.assert_array_equal(back.data.x, made.data.x)
    np.testing.assert_array_equal(back.data.y, made.data.y)
    assert back.manifest == made.manifest
    manifest = back.manifest
    assert manifest.backend == "class-conditional"
    assert manifest.generator_id == "tiny-cc"
    assert len(manifest.generator_hash) == 64
    assert manifest.counts == {"cat": 4, "dog": 4, "bird": 4}
    assert [s.count for s in manifest.shards] == [5, 5, 2]
    assert manifest.image_labels == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(manifest.image_seeds)) == 12
    assert all(1.0 <= g <= 3.0 for g in manifest.image_guidance)
    assert manifest_sha256(read_manifest(manifest_path)) == manifest_sha256(made.manifest)


def test_a_corrupt_shard_is_detected_by_its_sha256(made: SyntheticDataset, tmp_path: Path) -> None:
    write_artifact(made, tmp_path)
    shard = tmp_path / "shard-00001.safetensors"
    payload = bytearray(shard.read_bytes())
    payload[-3] ^= 0x10  # one pixel's bit
    shard.write_bytes(bytes(payload))
    with pytest.raises(ChecksumError, match="shard shard-00001.safetensors is corrupt"):
        read_artifact(tmp_path)


def test_missing_shard_and_tampered_manifest_are_rejected(
    made: SyntheticDataset, tmp_path: Path
) -> None:
    write_artifact(made, tmp_path / "a")
    (tmp_path / "a" / "shard-00002.safetensors").unlink()
    # data lost on the service (DATA_LOSS), not a bad request; no server path in the message
    with pytest.raises(ChecksumError, match="^shard shard-00002.safetensors cannot be read"):
        read_artifact(tmp_path / "a")

    write_artifact(made, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest["image_labels"][0] = 2
    (tmp_path / "b" / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ValidationError, match="labels differ"):
        read_artifact(tmp_path / "b")

    manifest["image_labels"] = manifest["image_labels"][:3]
    (tmp_path / "b" / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ValidationError, match="same length"):
        read_artifact(tmp_path / "b")

    (tmp_path / "b" / MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValidationError, match="invalid JSON"):
        read_artifact(tmp_path / "b")


def test_an_existing_artifact_is_never_overwritten(made: SyntheticDataset, tmp_path: Path) -> None:
    write_artifact(made, tmp_path)
    with pytest.raises(ConfigError, match="already holds"):
        write_artifact(made, tmp_path)


def test_data_that_does_not_match_the_manifest_is_not_written(
    made: SyntheticDataset, tmp_path: Path
) -> None:
    x = made.data.x.copy()
    x[0, 0, 0, 0] = 1.0 - x[0, 0, 0, 0]
    altered = SyntheticDataset(data=type(made.data)(x=x, y=made.data.y), manifest=made.manifest)
    with pytest.raises(ChecksumError):
        write_artifact(altered, tmp_path)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_regenerate_reproduces_the_class_conditional_dataset_bit_for_bit(
    made: SyntheticDataset, tiny_class_conditional_dir: Path, tmp_path: Path
) -> None:
    write_artifact(made, tmp_path)
    manifest = read_manifest(tmp_path)
    # A freshly loaded generator and another batch size: the same images.
    again = regenerate(manifest, _cc(tiny_class_conditional_dir), batch_size=3)
    np.testing.assert_array_equal(again.data.x, made.data.x)
    np.testing.assert_array_equal(again.data.y, made.data.y)


def test_regenerate_reproduces_the_text_to_image_dataset_bit_for_bit(
    tiny_text_to_image_dir: Path, tmp_path: Path
) -> None:
    def t2i() -> Generator:
        return load_generator(
            "text-to-image", tiny_text_to_image_dir, device="cpu", num_inference_steps=2
        )

    request = SynthesisRequest(
        labels=["cat", "ship"], images_per_label=3, in_channels=3, image_size=8, seed=2
    )
    made = synthesize(t2i(), request, batch_size=4)
    write_artifact(made, tmp_path)
    again = regenerate(read_manifest(tmp_path), t2i(), batch_size=4)
    assert again.manifest.dataset_sha256 == made.manifest.dataset_sha256
    np.testing.assert_array_equal(again.data.x, made.data.x)


def test_regenerate_refuses_another_generator_or_other_settings(
    made: SyntheticDataset, tiny_class_conditional_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match=r"settings differ.*num_inference_steps"):
        regenerate(made.manifest, _cc(tiny_class_conditional_dir, steps=4))
    copy = tmp_path / "tiny-cc"
    shutil.copytree(tiny_class_conditional_dir, copy)
    weights = copy / "diffusion_pytorch_model.safetensors"
    payload = bytearray(weights.read_bytes())
    payload[-1] ^= 0x01
    weights.write_bytes(bytes(payload))
    with pytest.raises(ValidationError, match="content hash"):
        regenerate(made.manifest, _cc(copy))


def test_regenerate_detects_data_that_no_longer_matches(
    made: SyntheticDataset, tiny_class_conditional_dir: Path
) -> None:
    shards = list(made.manifest.shards)
    shards[0] = shards[0].model_copy(update={"sha256": "0" * 64})
    tampered = made.manifest.model_copy(update={"shards": shards})
    with pytest.raises(ChecksumError, match="regenerated shard shard-00000"):
        regenerate(tampered, _cc(tiny_class_conditional_dir))


def test_bad_requests_are_config_errors() -> None:
    assert _parse({}).resize_mode == "stretch"
    with pytest.raises(ConfigError, match="resize_mode"):
        _parse({"resize_mode": "squash"})
    with pytest.raises(ConfigError, match="in_channels"):
        _parse({"in_channels": 2})
    with pytest.raises(ConfigError, match="guidance_min"):
        _parse({"guidance_min": 4.0, "guidance_max": 2.0})
    with pytest.raises(ConfigError, match="distinct"):
        _parse({"labels": ["a", "a"]})


def _parse(changes: dict[str, object]) -> SynthesisRequest:
    from gptfl.config_loading import parse_config

    base: dict[str, object] = {
        "labels": ["a"],
        "images_per_label": 1,
        "in_channels": 1,
        "image_size": 8,
    }
    return parse_config(SynthesisRequest, {**base, **changes}, source="request")


def test_disk_space_check(tmp_path: Path) -> None:
    needed = estimate_artifact_bytes(REQUEST)
    assert needed >= 12 * 64
    check_disk_space(tmp_path / "not" / "yet", needed)
    with pytest.raises(ResourceLimitError, match="not enough disk space"):
        check_disk_space(tmp_path, 1 << 62)


def test_a_damaged_stored_dataset_is_written_again(made: SyntheticDataset, tmp_path: Path) -> None:
    """Generating the same dataset again repairs it instead of reporting it stored."""
    store = DatasetStore(tmp_path)
    folder = store.save(made)
    shard = folder / "shard-00001.safetensors"
    payload = bytearray(shard.read_bytes())
    payload[-3] ^= 0x10
    shard.write_bytes(bytes(payload))
    with pytest.raises(ChecksumError):
        store.load(made.manifest.dataset_sha256)
    assert store.save(made) == folder
    assert store.load(made.manifest.dataset_sha256).manifest == made.manifest
