"""Generation backends: tiny pipelines built offline and loaded from disk; the shipped model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gptfl.errors import ConfigError, ValidationError
from gptfl.synth_spec import SynthesisRequest
from synth_service.artifacts import synthesize
from synth_service.generators import (
    BUNDLED_DIGITS_GENERATOR,
    ImageSpec,
    hash_model_directory,
    load_generator,
    plan_images,
)
from synth_service.generators.base import batches_by_guidance
from synth_service.generators.class_conditional import ClassConditionalGenerator
from synth_service.generators.text_to_image import TextToImageGenerator


def _spy_from_pretrained(monkeypatch: pytest.MonkeyPatch, owner: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    original = owner.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, "from_pretrained", spy)
    return calls


def test_plan_is_seeded_and_guidance_stays_on_the_grid_within_range() -> None:
    prompts = {"cat": ["a cat", "a cat, sketch"], "dog": ["a dog"]}
    plan = plan_images(["cat", "dog"], images_per_label=20, prompts=prompts, seed=3)
    again = plan_images(["cat", "dog"], images_per_label=20, prompts=prompts, seed=3)
    other = plan_images(["cat", "dog"], images_per_label=20, prompts=prompts, seed=4)
    assert plan == again
    assert [s.seed for s in plan] != [s.seed for s in other]
    assert [s.label for s in plan] == ["cat"] * 20 + ["dog"] * 20
    assert [s.prompt for s in plan[:3]] == ["a cat", "a cat, sketch", "a cat"]
    guidance = {s.guidance for s in plan}
    assert guidance <= {1.0 + 0.5 * k for k in range(9)}
    assert len(guidance) > 3  # drawn, not constant
    continuous = plan_images(
        ["cat"],
        images_per_label=50,
        prompts=prompts,
        seed=0,
        guidance_range=(2.0, 3.0),
        guidance_step=0,
    )
    assert all(2.0 <= s.guidance <= 3.0 for s in continuous)
    assert len({s.guidance for s in continuous}) > 40


def test_plan_rejects_bad_ranges_and_missing_prompts() -> None:
    with pytest.raises(ConfigError, match="guidance range"):
        plan_images(["a"], images_per_label=1, prompts={"a": ["a"]}, seed=0, guidance_range=(5, 1))
    with pytest.raises(ConfigError, match="no prompts for label 'b'"):
        plan_images(["a", "b"], images_per_label=1, prompts={"a": ["a"]}, seed=0)
    with pytest.raises(ConfigError, match="images per label"):
        plan_images(["a"], images_per_label=0, prompts={"a": ["a"]}, seed=0)


def test_batches_group_equal_guidance_and_respect_the_batch_size() -> None:
    specs = [ImageSpec("a", "a", i, g) for i, g in enumerate([1.0, 2.0, 1.0, 1.0, 2.0])]
    assert batches_by_guidance(specs, batch_size=2) == [[0, 2], [3], [1, 4]]


def test_text_to_image_loads_from_disk_only_and_generates_at_the_target_shape(
    tiny_text_to_image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    calls = _spy_from_pretrained(monkeypatch, diffusers.DiffusionPipeline)
    generator = load_generator(
        "text-to-image", tiny_text_to_image_dir, device="cpu", num_inference_steps=2
    )
    assert isinstance(generator, TextToImageGenerator)
    assert calls and all(call.get("local_files_only") is True for call in calls)
    assert generator.label_names is None
    assert generator.image_shape == (3, 16, 16)
    assert generator.settings()["safety_checker"] is False
    assert generator.settings()["dtype"] == "float32"
    request = SynthesisRequest(
        labels=["cat", "dog"],
        images_per_label=3,
        in_channels=3,
        image_size=8,
        prompts_per_label=2,
        guidance_min=1.5,
        guidance_max=4.0,
        seed=5,
    )
    seen: list[tuple[int, int]] = []
    result = synthesize(generator, request, batch_size=4, progress=lambda d, t: seen.append((d, t)))
    data, manifest = result.data, result.manifest
    assert data.x.shape == (6, 3, 8, 8)
    assert data.x.dtype == np.float32
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    assert data.x.std() > 0.01  # real images, not a constant fill
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert seen[-1] == (6, 6)
    assert manifest.counts == {"cat": 3, "dog": 3}
    assert len(manifest.image_guidance) == 6
    assert all(1.5 <= g <= 4.0 for g in manifest.image_guidance)
    assert all(len(manifest.prompts[label]) == 2 for label in ("cat", "dog"))
    assert all("cat" in p for p in manifest.prompts["cat"])


def test_text_to_image_images_depend_on_their_seed_only(tiny_text_to_image_dir: Path) -> None:
    generator = load_generator(
        "text-to-image", tiny_text_to_image_dir, device="cpu", num_inference_steps=2
    )
    specs = [ImageSpec("cat", "a photo of a cat", s, 2.0) for s in (1, 2, 1)]
    images = generator.generate(specs, batch_size=3)
    assert images.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(images[0], images[2], atol=1e-5)
    assert np.abs(images[0] - images[1]).max() > 1e-3
    with pytest.raises(ValidationError, match="non-empty prompt"):
        generator.generate([ImageSpec("cat", " ", 1, 2.0)])


def test_the_tiny_pipeline_tokenizes_like_clip_and_its_prompts_matter(
    tiny_text_to_image_dir: Path,
) -> None:
    generator = load_generator(
        "text-to-image", tiny_text_to_image_dir, device="cpu", num_inference_steps=2
    )
    assert isinstance(generator, TextToImageGenerator)
    tokenizer = generator._pipeline.tokenizer
    ids = tokenizer("a photo of a cat")["input_ids"]
    # CLIP's own ids for these words (the vocabulary keeps CLIP's order; only the special
    # tokens move because the tiny vocabulary keeps the first merges only).
    assert ids[1:-1] == [320, 1125, 539, 320, 2368]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    cat, ship = generator.generate(
        [ImageSpec("cat", "a photo of a cat", 7, 3.0), ImageSpec("ship", "a ship at sea", 7, 3.0)]
    )
    assert np.abs(cat - ship).max() > 1e-4


def test_text_to_image_rejects_a_directory_without_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_index.json"):
        load_generator("text-to-image", tmp_path, device="cpu")


def test_class_conditional_yields_the_requested_count_per_label_at_the_target_shape(
    tiny_class_conditional_dir: Path,
) -> None:
    generator = load_generator(
        "class-conditional", tiny_class_conditional_dir, device="cpu", num_inference_steps=3
    )
    assert isinstance(generator, ClassConditionalGenerator)
    assert generator.label_names == ("cat", "dog", "bird")
    assert generator.image_shape == (1, 8, 8)
    request = SynthesisRequest(
        labels=["bird", "kitten"],  # an alias resolves to its label
        images_per_label=5,
        in_channels=3,
        image_size=12,
        guidance_min=1.0,
        guidance_max=3.0,
    )
    result = synthesize(generator, request, batch_size=4)
    assert result.data.x.shape == (10, 3, 12, 12)
    assert np.bincount(result.data.y).tolist() == [5, 5]
    assert result.manifest.counts == {"bird": 5, "kitten": 5}
    assert result.manifest.prompts == {"bird": ["bird"], "kitten": ["kitten"]}
    assert all(1.0 <= g <= 3.0 for g in result.manifest.image_guidance)


def test_class_conditional_rejects_an_unknown_label_before_sampling(
    tiny_class_conditional_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = ClassConditionalGenerator.from_directory(
        tiny_class_conditional_dir, device="cpu", num_inference_steps=2
    )

    def no_sampling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sampling must not start")

    monkeypatch.setattr(generator, "_sample", no_sampling)
    request = SynthesisRequest(
        labels=["cat", "zebra"], images_per_label=2, in_channels=1, image_size=8
    )
    with pytest.raises(ValidationError, match=r"does not know label\(s\) 'zebra'; it knows cat"):
        synthesize(generator, request)
    with pytest.raises(ValidationError, match="'zebra'"):
        generator.generate([ImageSpec("cat", "cat", 0, 1.0), ImageSpec("zebra", "zebra", 1, 1.0)])


def test_class_conditional_without_a_null_class_accepts_only_guidance_one(
    tiny_class_conditional_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "no-null"
    shutil.copytree(tiny_class_conditional_dir, copy)
    meta = json.loads((copy / "gptfl_labels.json").read_text(encoding="utf-8"))
    meta["null_class"] = None
    (copy / "gptfl_labels.json").write_text(json.dumps(meta), encoding="utf-8")
    generator = ClassConditionalGenerator.from_directory(copy, device="cpu", num_inference_steps=2)
    assert generator.generate([ImageSpec("cat", "cat", 0, 1.0)]).shape == (1, 1, 8, 8)
    with pytest.raises(ValidationError, match="only guidance 1.0"):
        generator.generate([ImageSpec("cat", "cat", 0, 2.5)])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"labels": []}, "non-empty list"),
        ({"labels": ["a", "a"]}, "distinct"),
        ({"labels": ["a", "b", "c", "d"]}, "class embeddings"),
        ({"aliases": {"x": "nope"}}, "unknown label 'nope'"),
        ({"null_class": 1}, "null_class 1 is out of range"),
        ({"value_range": [1, -1]}, "value_range"),
    ],
)
def test_class_conditional_rejects_a_malformed_labels_file(
    tiny_class_conditional_dir: Path, tmp_path: Path, edit: dict[str, Any], message: str
) -> None:
    copy = tmp_path / "bad"
    shutil.copytree(tiny_class_conditional_dir, copy)
    meta = json.loads((copy / "gptfl_labels.json").read_text(encoding="utf-8"))
    (copy / "gptfl_labels.json").write_text(json.dumps({**meta, **edit}), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        ClassConditionalGenerator.from_directory(copy, device="cpu")


def test_content_hash_covers_weights_but_not_documentation(
    tiny_class_conditional_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_class_conditional_dir, copy)
    original = hash_model_directory(tiny_class_conditional_dir)
    assert hash_model_directory(copy) == original
    (copy / "MODEL_CARD.md").write_text("notes", encoding="utf-8")
    assert hash_model_directory(copy) == original
    weights = copy / "diffusion_pytorch_model.safetensors"
    payload = bytearray(weights.read_bytes())
    payload[-1] ^= 0x01
    weights.write_bytes(bytes(payload))
    assert hash_model_directory(copy) != original


def test_unknown_backend_and_missing_directory_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown generation backend 'gan'"):
        load_generator("gan", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_generator("class-conditional", tmp_path / "missing", device="cpu")


def test_the_shipped_digits_generator_is_small_and_draws_every_digit() -> None:
    weights = BUNDLED_DIGITS_GENERATOR / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    for name in (
        "config.json",
        "scheduler_config.json",
        "gptfl_labels.json",
        "MODEL_CARD.md",
        "samples.png",
    ):
        assert (BUNDLED_DIGITS_GENERATOR / name).is_file(), name
    generator = load_generator(
        "class-conditional", BUNDLED_DIGITS_GENERATOR, device="cpu", num_inference_steps=8
    )
    assert generator.label_names == tuple(str(d) for d in range(10))
    generator.check_labels(["seven"])  # an alias
    specs = plan_images(
        list(generator.label_names),
        images_per_label=1,
        prompts={d: [d] for d in generator.label_names},
        seed=0,
        guidance_range=(2.0, 2.0),
    )
    images = generator.generate(specs, batch_size=10)
    assert images.shape == (10, 1, 16, 16)
    # Digits: bright strokes on a dark background.
    assert float(np.median(images)) < 0.2
    assert all(float(img.max()) > 0.6 for img in images)


class _Stop(Exception):
    pass


def _stop_at(call: int) -> tuple[list[int], Callable[[], None]]:
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == call:
            raise _Stop

    return calls, check


@pytest.mark.parametrize("backend", ["class-conditional", "text-to-image"])
def test_a_stop_ends_generation_within_a_step_not_at_the_batch_end(
    backend: str, tiny_class_conditional_dir: Path, tiny_text_to_image_dir: Path
) -> None:
    """So that SIGTERM during a long batch does not wait for it (docs/synth-service.md)."""
    folder = (
        tiny_class_conditional_dir if backend == "class-conditional" else tiny_text_to_image_dir
    )
    generator = load_generator(backend, folder, device="cpu", num_inference_steps=4)
    specs = [ImageSpec("cat", "a photo of a cat", seed, 1.0) for seed in range(4)]
    calls, check = _stop_at(2)
    with pytest.raises(_Stop):
        generator.generate(specs, batch_size=4, step_check=check)
    assert len(calls) == 2  # stopped in the first batch, at its second step
    counted, count_only = _stop_at(0)  # never stops: one check per step
    generator.generate(specs[:2], batch_size=2, step_check=count_only)
    assert len(counted) == 4
