"""Starting a ``transformers`` architecture from a local ``from_pretrained`` folder."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from gptfl.errors import ConfigError
from gptfl.models import ModelSpec, build_model
from gptfl.models.fingerprint import layout_digest
from gptfl.models.hf_pretrained import (
    HEAD_PREFIX,
    copy_pretrained,
    load_pretrained,
    resize_positions,
)
from gptfl.models.hf_vision import RESNET
from tests.hf_tiny import TINY, save_random_resnet18, save_tiny_checkpoint, tiny_model


def _spec(*, channels: int = 3, size: int = 32, classes: int = 3, arch: str = "x") -> ModelSpec:
    return ModelSpec(arch=arch, num_classes=classes, in_channels=channels, image_size=size)


def _checkpoint(kind: str, folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as transformers loads them (v5 renames some on load)."""
    model_class = getattr(importlib.import_module("transformers"), TINY[kind][0].model_class)
    loaded = model_class.from_pretrained(str(folder), local_files_only=True)
    return {f"net.{k}": v for k, v in loaded.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_the_backbone_is_copied_and_the_head_is_the_specs(tmp_path: Path, kind: str) -> None:
    spec = _spec()
    folder = save_tiny_checkpoint(kind, spec, tmp_path / "ckpt", num_labels=6)
    model = tiny_model(kind, spec)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIX)}
    layout = layout_digest(model.state_dict())

    report = copy_pretrained(model, TINY[kind][0], folder)

    source = _checkpoint(kind, folder)
    state = model.state_dict()
    assert layout_digest(state) == layout  # the spec's layout, whatever the checkpoint
    assert set(report.fresh) == set(head_before) and report.resized == ()
    assert all(torch.equal(state[k], v) for k, v in head_before.items())
    backbone = [k for k in state if not k.startswith(HEAD_PREFIX)]
    assert report.copied == len(backbone)
    assert all(torch.equal(state[k], source[k]) for k in backbone)
    assert report.dropped == len(source) - len(backbone)
    if TINY[kind][0] is RESNET:
        # BatchNorm's running statistics are what is dropped besides the old head.
        stats = [
            k for k in source if k.endswith(("running_mean", "running_var", "batches_tracked"))
        ]
        assert stats and report.dropped == len(stats) + len(head_before)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_keep_head_keeps_a_head_that_fits(tmp_path: Path) -> None:
    spec = _spec(classes=4)
    folder = save_tiny_checkpoint("convnext", spec, tmp_path / "ckpt", num_labels=4)
    model = tiny_model("convnext", spec)
    report = copy_pretrained(model, TINY["convnext"][0], folder, keep_head=True)
    assert report.fresh == ()
    source = _checkpoint("convnext", folder)
    assert torch.equal(model.state_dict()["net.classifier.weight"], source["net.classifier.weight"])


def test_vit_position_embeddings_follow_the_image_size(tmp_path: Path) -> None:
    folder = save_tiny_checkpoint("vit", _spec(size=32), tmp_path / "ckpt", num_labels=3)
    spec = _spec(size=64)  # patch 8: a 4x4 grid in the checkpoint, 8x8 here
    model = tiny_model("vit", spec)
    report = copy_pretrained(model, TINY["vit"][0], folder)
    key = "net.vit.embeddings.position_embeddings"
    assert report.resized == (key,)
    source, resized = _checkpoint("vit", folder)[key], model.state_dict()[key]
    assert source.shape == (1, 17, 16) and resized.shape == (1, 65, 16)
    assert torch.equal(resized[:, 0], source[:, 0])  # the class token's row
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3)


def test_resizing_to_the_same_grid_changes_nothing() -> None:
    positions = torch.randn(1, 1 + 16, 8)
    assert torch.allclose(resize_positions(positions, 17), positions, atol=1e-6)
    with pytest.raises(ConfigError, match="cannot be resized"):
        resize_positions(positions, 20)


def test_a_grayscale_spec_uses_the_rgb_stem_on_repeated_channels(tmp_path: Path) -> None:
    folder = save_tiny_checkpoint("resnet", _spec(), tmp_path / "ckpt", num_labels=3)
    gray = tiny_model("resnet", _spec(channels=1))
    rgb = tiny_model("resnet", _spec(channels=3))
    for model in (gray, rgb):
        copy_pretrained(model, RESNET, folder, keep_head=True)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-6)


def test_load_pretrained_starts_the_published_architecture(tmp_path: Path) -> None:
    """A full-size random ResNet-18 checkpoint (BatchNorm, 1000 classes) into resnet18-gn."""
    save_random_resnet18(tmp_path / "resnet-18")
    spec = _spec(arch="resnet18-gn", classes=10)
    model, report = load_pretrained(spec, tmp_path / "resnet-18", seed=0)
    assert report.model_type == "resnet" and report.fresh == (
        "net.classifier.1.weight",
        "net.classifier.1.bias",
    )
    assert layout_digest(model.state_dict()) == layout_digest(build_model(spec).state_dict())
    assert report.provenance()["copied_tensors"] == report.copied


@pytest.mark.parametrize(
    ("arch", "make", "needle"),
    [
        ("cnn-small", "resnet", "'cnn-small' cannot start from a transformers checkpoint"),
        ("resnet18-gn", "vit", "holds a 'vit' model; resnet18-gn starts from 'resnet'"),
        ("resnet18-gn", "resnet", "does not fit resnet18-gn: net.resnet.embedder"),
        ("resnet18-gn", "missing", "does not exist or is not a directory"),
        ("resnet18-gn", "no-config", "has no config.json"),
        ("resnet18-gn", "bad-config", "config.json is unreadable"),
    ],
)
def test_a_folder_that_does_not_fit_is_refused_in_one_line(
    tmp_path: Path, arch: str, make: str, needle: str
) -> None:
    folder = tmp_path / "ckpt"
    if make in ("resnet", "vit"):
        save_tiny_checkpoint(make, _spec(), folder, num_labels=3)
    elif make != "missing":
        folder.mkdir()
        if make == "bad-config":
            (folder / "config.json").write_text("{not json")
    spec = _spec(arch=arch, size=28 if arch == "cnn-small" else 32)
    with pytest.raises(ConfigError) as error:
        load_pretrained(spec, folder)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_without_weights_is_refused(tmp_path: Path) -> None:
    folder = save_tiny_checkpoint("resnet", _spec(), tmp_path / "ckpt", num_labels=3)
    (folder / "model.safetensors").unlink()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "resnet"
    with pytest.raises(ConfigError, match="cannot be loaded"):
        copy_pretrained(tiny_model("resnet", _spec()), RESNET, folder)
