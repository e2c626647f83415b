"""The ``transformers`` vision architectures: shapes, no BatchNorm, training, Opacus."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gptfl.errors import ConfigError
from gptfl.models import ModelSpec, build_model
from gptfl.models.hf_vision import HF_ARCHITECTURES, batchnorm_to_groupnorm, group_count, hf_config
from tests.hf_tiny import TINY, tiny_model


def _spec(arch: str = "x", *, channels: int = 3, size: int = 32, classes: int = 5) -> ModelSpec:
    return ModelSpec(arch=arch, num_classes=classes, in_channels=channels, image_size=size)


@pytest.mark.parametrize(
    ("arch", "parameters"),
    [
        ("resnet18-gn", 11_180_103),
        ("resnet50-gn", 23_522_375),
        ("convnext-tiny", 27_825_511),
        ("vit-b16", 85_656_583),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_architecture_builds_and_returns_logits(
    arch: str, parameters: int, channels: int
) -> None:
    """The published sizes (7 classes): ResNet-18 11.2M, ResNet-50 23.5M, ConvNeXt-T 27.8M,
    ViT-B/16 85.7M parameters."""
    model = build_model(_spec(arch, channels=channels, classes=7), seed=0)
    assert sum(p.numel() for p in model.parameters()) == parameters
    with torch.no_grad():
        logits = model(torch.rand(2, channels, 32, 32))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    # FedAvg averages the whole state dict: parameters only, no BatchNorm statistics.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


def test_vit_takes_the_spec_image_size() -> None:
    model = build_model(_spec("vit-b16", size=48, classes=3), seed=0)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 48, 48)).shape == (1, 3)


@pytest.mark.parametrize(
    ("arch", "size", "needle"),
    [
        ("resnet18-gn", 16, "'resnet18-gn' supports image_size 32 and up; got 16"),
        ("convnext-tiny", 28, "'convnext-tiny' supports image_size 32 and up; got 28"),
        ("vit-b16", 40, "'vit-b16' supports image_size 32 and up, a multiple of 16; got 40"),
    ],
)
def test_unsupported_sizes_are_refused_in_one_line(arch: str, size: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_model(_spec(arch, size=size))


def test_seeded_builds_are_deterministic() -> None:
    first = build_model(_spec("resnet18-gn"), seed=3).state_dict()
    again = build_model(_spec("resnet18-gn"), seed=3).state_dict()
    other = build_model(_spec("resnet18-gn"), seed=4).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_the_published_configurations_are_the_defaults_of_their_families() -> None:
    """ResNetConfig, ConvNextConfig and ViTConfig default to ResNet-50, ConvNeXt-T and
    ViT-B/16: the fields the zoo spells out must agree with them."""
    for name in ("resnet50-gn", "convnext-tiny", "vit-b16"):
        arch = HF_ARCHITECTURES[name]
        spec = _spec(name, size=224)
        default = hf_config(arch.family, spec)
        for field, value in arch.fields:
            found = getattr(default, field)
            assert (list(found) if isinstance(found, tuple) else found) == value, (name, field)


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (8, 8), (48, 16), (6, 2), (7, 1)])
def test_group_count(channels: int, groups: int) -> None:
    assert group_count(channels) == groups


def test_batchnorm_to_groupnorm_keeps_the_affine_parameters() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sequential(nn.BatchNorm2d(8)))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2)
        net[1].bias.uniform_(-1, 1)
    weight, bias = net[1].weight.clone(), net[1].bias.clone()
    assert batchnorm_to_groupnorm(net) == 2
    assert isinstance(net[1], nn.GroupNorm) and isinstance(net[2][0], nn.GroupNorm)
    assert net[1].num_groups == 8
    assert torch.equal(net[1].weight, weight) and torch.equal(net[1].bias, bias)
    assert list(net.buffers()) == []


@pytest.mark.parametrize("kind", sorted(TINY))
def test_a_tiny_model_learns_a_batch_with_sgd(kind: str) -> None:
    """What train_local does (cross-entropy on model(inputs), SGD): the loss on a fixed
    batch falls."""
    spec = _spec(channels=1, classes=3)
    torch.manual_seed(0)
    model = tiny_model(kind, spec)
    inputs, labels = torch.rand(6, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("kind", sorted(TINY))
def test_opacus_accepts_the_groupnorm_and_layernorm_variants(kind: str) -> None:
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(tiny_model(kind, _spec()), strict=False) == []


def test_opacus_refuses_the_stock_batchnorm_resnet() -> None:
    """What the GroupNorm variants avoid: transformers' own ResNet has BatchNorm."""
    from opacus.validators import ModuleValidator

    family, fields = TINY["resnet"]
    stock = getattr(__import__("transformers"), family.model_class)(
        hf_config(family, _spec(), **fields)
    )
    errors = ModuleValidator.validate(stock, strict=False)
    assert errors and all("BatchNorm" in str(e) for e in errors)


@pytest.mark.parametrize(
    ("kind", "mode"),
    [("resnet", "ew"), ("resnet-bottleneck", "ew"), ("convnext", "hooks"), ("vit", "hooks")],
)
def test_one_dp_sgd_step_with_opacus(kind: str, mode: str) -> None:
    """A DP-SGD step (per-example clipping and noise) runs. transformers' ResNet adds its
    shortcut in place, which Opacus' hooks cannot follow, so the ResNets take the
    expanded-weights mode; ConvNeXt and ViT the default hooks (docs/models.md)."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = tiny_model(kind, _spec(classes=3))
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and accounting
        private, optimizer, private_loader = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
        )
        for inputs, labels in private_loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(private(inputs), labels).backward()
            optimizer.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
