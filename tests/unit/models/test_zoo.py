"""The model zoo: registry, shapes, deterministic init, aggregatable state."""

from __future__ import annotations

import pytest
import torch

from gptfl.errors import ConfigError
from gptfl.models import ModelSpec, available_architectures, build_model


def _spec(arch: str, *, channels: int = 1, size: int = 8, classes: int = 10) -> ModelSpec:
    return ModelSpec(arch=arch, num_classes=classes, in_channels=channels, image_size=size)


def test_both_architectures_are_registered() -> None:
    assert {"cnn-small", "resnet20"} <= set(available_architectures())


@pytest.mark.parametrize(
    ("arch", "channels", "size", "classes"),
    [
        ("cnn-small", 1, 8, 10),
        ("cnn-small", 1, 12, 3),
        ("cnn-small", 1, 28, 10),
        ("cnn-small", 3, 16, 7),
        ("resnet20", 3, 32, 10),
        ("resnet20", 1, 32, 2),
    ],
)
def test_output_has_one_logit_per_class(arch: str, channels: int, size: int, classes: int) -> None:
    model = build_model(_spec(arch, channels=channels, size=size, classes=classes), seed=0)
    logits = model(torch.rand(3, channels, size, size))
    assert logits.shape == (3, classes)
    assert torch.isfinite(logits).all()


def test_cnn_small_is_small() -> None:
    model = build_model(_spec("cnn-small", size=28))
    assert sum(p.numel() for p in model.parameters()) < 100_000


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_model(_spec("resnet20", channels=3, size=32), seed=7).state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    second = build_model(_spec("resnet20", channels=3, size=32), seed=7).state_dict()
    other = build_model(_spec("resnet20", channels=3, size=32), seed=8).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_unknown_arch_lists_available_ones() -> None:
    with pytest.raises(ConfigError) as error:
        build_model(_spec("vgg-huge"))
    message = str(error.value)
    assert "'vgg-huge'" in message
    assert "cnn-small" in message and "resnet20" in message


@pytest.mark.parametrize(
    ("arch", "size", "needle"), [("cnn-small", 64, "8 to 28"), ("resnet20", 28, "32 only")]
)
def test_unsupported_image_size_names_the_supported_range(
    arch: str, size: int, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle) as error:
        build_model(_spec(arch, channels=3, size=size))
    assert arch in str(error.value)


@pytest.mark.parametrize("arch", ["cnn-small", "resnet20"])
def test_state_dict_holds_only_float_parameters(arch: str) -> None:
    model = build_model(_spec(arch, channels=3, size=32 if arch == "resnet20" else 16), seed=0)
    state = model.state_dict()
    assert list(model.buffers()) == []
    assert set(state) == {name for name, _ in model.named_parameters()}
    assert all(tensor.dtype == torch.float32 for tensor in state.values())


@pytest.mark.parametrize(
    "fields",
    [
        {"num_classes": 1},
        {"in_channels": 2},
        {"image_size": 4},
        {"extra": True},
    ],
)
def test_spec_rejects_bad_values(fields: dict[str, object]) -> None:
    base: dict[str, object] = {
        "arch": "cnn-small",
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 8,
    }
    with pytest.raises(ValueError):
        ModelSpec.model_validate(base | fields)
