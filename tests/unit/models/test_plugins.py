"""Architectures brought by installed packages through the ``gptfl.models`` entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptfl.errors import ConfigError
from gptfl.models import ModelSpec, architecture, available_architectures, build_model
from gptfl.models.registry import plugin_problems
from tests.plugin_dists import PluginPath

LINEAR_MODULE = """
import torch
from gptfl.errors import ConfigError
from gptfl.models import Architecture, ProbeShape

def build(spec):
    if spec.image_size > 16:
        raise ConfigError(f"flat-linear takes image_size up to 16, got {spec.image_size}")
    size = spec.in_channels * spec.image_size ** 2
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size, spec.num_classes))

FLAT = Architecture(build=build, probe=ProbeShape(num_classes=3, in_channels=1, image_size=8))
"""


def _spec(arch: str, *, size: int = 8, classes: int = 4) -> ModelSpec:
    return ModelSpec(arch=arch, num_classes=classes, in_channels=1, image_size=size)


def test_an_installed_architecture_builds_by_name(tmp_path: Path, plugin_path: PluginPath) -> None:
    assert "flat-linear" not in available_architectures()
    plugin_path.install(
        tmp_path / "site",
        dist="flat-models",
        version="2.3.1",
        module="flat_models",
        source=LINEAR_MODULE,
        entry_points={"flat-linear": "flat_models:FLAT"},
    )
    assert "flat-linear" in available_architectures()
    model = build_model(_spec("flat-linear"), seed=0)
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 4)
    found = architecture("flat-linear")
    assert (found.provider, found.provider_version) == ("flat-models", "2.3.1")
    assert (found.probe.num_classes, found.probe.image_size) == (3, 8)
    assert not found.builtin
    # The builder's own refusal reaches the caller unchanged.
    with pytest.raises(ConfigError, match="up to 16, got 32"):
        build_model(_spec("flat-linear", size=32))


@pytest.mark.parametrize(
    ("dist", "module", "source", "entry", "target", "needle"),
    [
        (
            "broken-models",
            "broken_models",
            "import no_such_module_here\n",
            "broken-net",
            "broken_models:BUILD",
            "entry point 'broken-net' of broken-models 1.0 failed to load: "
            "ModuleNotFoundError: No module named 'no_such_module_here'",
        ),
        (
            "shadow-models",
            "shadow_models",
            LINEAR_MODULE,
            "resnet20",
            "shadow_models:FLAT",
            "entry point 'resnet20' of shadow-models 1.0 is ignored: the name is a built-in",
        ),
        (
            "odd-models",
            "odd_models",
            "VALUE = 3\n",
            "not-a-builder",
            "odd_models:VALUE",
            "points at a int, not a builder or an Architecture",
        ),
        (
            "odd-models",
            "odd_models",
            LINEAR_MODULE,
            "Bad Name",
            "odd_models:FLAT",
            "the name must be lowercase letters, digits, . _ -",
        ),
    ],
)
def test_an_unusable_entry_point_is_not_registered_and_says_why(
    tmp_path: Path,
    plugin_path: PluginPath,
    dist: str,
    module: str,
    source: str,
    entry: str,
    target: str,
    needle: str,
) -> None:
    plugin_path.install(
        tmp_path / "site", dist=dist, module=module, source=source, entry_points={entry: target}
    )
    problem = plugin_problems()[entry]
    assert needle in problem and "\n" not in problem
    if entry == "resnet20":
        assert architecture("resnet20").builtin  # the built-in still answers to its name
        return
    assert entry not in available_architectures()
    with pytest.raises(ConfigError) as error:
        build_model(_spec(entry))
    assert str(error.value).startswith(f"unknown model architecture {entry!r} (available: ")
    assert str(error.value).endswith(problem)
    assert {"cnn-small", "resnet20"} <= set(available_architectures())  # the others still work


def test_a_plain_builder_is_probed_at_the_default_shape(
    tmp_path: Path, plugin_path: PluginPath
) -> None:
    plugin_path.install(
        tmp_path / "site",
        dist="plain-models",
        module="plain_models",
        source="import torch\ndef build(spec):\n    return torch.nn.Linear(3, spec.num_classes)\n",
        entry_points={"plain": "plain_models:build"},
    )
    probe = architecture("plain").probe
    assert (probe.num_classes, probe.in_channels, probe.image_size) == (10, 3, 32)


def test_a_name_two_packages_provide_is_refused(tmp_path: Path, plugin_path: PluginPath) -> None:
    for dist, module in (("one-models", "one_models"), ("two-models", "two_models")):
        plugin_path.install(
            tmp_path / dist,
            dist=dist,
            module=module,
            source=LINEAR_MODULE,
            entry_points={"twin": f"{module}:FLAT"},
        )
    with pytest.raises(ConfigError, match="provided by both") as error:
        build_model(_spec("twin"))
    assert "one-models 1.0" in str(error.value) and "two-models 1.0" in str(error.value)
