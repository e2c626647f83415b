"""Model fingerprints: layout digests, the probe build, and the coordinator's comparison."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gptfl import __version__
from gptfl.errors import ModelMismatchError
from gptfl.models import architecture, build_model
from gptfl.models.fingerprint import (
    ModelFingerprint,
    check_silo_models,
    fingerprint,
    layout_digest,
    local_fingerprints,
    mismatch_reason,
)
from gptfl.models.registry import ProbeShape, RegisteredArchitecture
from tests.conftest import REPO_ROOT
from tests.plugin_dists import PluginPath


def _state(**shapes: tuple[int, ...]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((name, torch.zeros(shape)) for name, shape in shapes.items())


def test_the_layout_digest_sees_names_order_shapes_and_dtypes_but_not_values() -> None:
    base = _state(w=(3, 2), b=(3,))
    digest = layout_digest(base)
    assert len(digest) == 64
    assert layout_digest(OrderedDict((k, torch.randn_like(v)) for k, v in base.items())) == digest
    assert layout_digest(_state(w=(3, 2), bias=(3,))) != digest
    assert layout_digest(_state(b=(3,), w=(3, 2))) != digest
    assert layout_digest(_state(w=(2, 3), b=(3,))) != digest
    assert layout_digest(OrderedDict(w=torch.zeros(3, 2, dtype=torch.float16), b=base["b"])) != (
        digest
    )


def test_the_meta_build_has_the_layout_of_a_real_build() -> None:
    for name, spec_size in (("cnn-small", 28), ("resnet20", 32)):
        arch = architecture(name)
        real = build_model(arch.probe.spec(name)).state_dict()
        assert arch.probe.image_size == spec_size
        found = fingerprint(arch)
        assert found.layout_sha256 == layout_digest(real)
        assert (found.provider, found.provider_version) == ("gpt-fl", arch.provider_version)


def test_a_builder_that_cannot_build_on_meta_is_built_on_the_cpu() -> None:
    def build(spec: object) -> torch.nn.Module:
        layer = torch.nn.Linear(4, 2)
        if layer.weight.abs().sum().item() < 0:  # .item() is impossible on the meta device
            raise AssertionError
        return layer

    arch = RegisteredArchitecture("needs-cpu", build, ProbeShape(), "x", "1")
    assert fingerprint(arch).layout_sha256 == layout_digest(torch.nn.Linear(4, 2).state_dict())


def test_building_fingerprints_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    local_fingerprints()
    assert torch.equal(torch.rand(1), expected)


FP = ModelFingerprint("acme-net", "acme-models", "1.0.0", "a" * 64)


@pytest.mark.parametrize(
    ("silo", "expected"),
    [
        ([FP], None),
        ([], None),  # a silo may lack a package
        ([replace(FP, arch="other-net")], None),  # a name only the silo knows
        (
            [replace(FP, provider_version="1.1.0")],
            "model architecture 'acme-net' comes from acme-models 1.0.0 at the coordinator "
            "but from acme-models 1.1.0 at the silo",
        ),
        (
            [replace(FP, provider="fork-models")],
            "model architecture 'acme-net' comes from acme-models 1.0.0 at the coordinator "
            "but from fork-models 1.0.0 at the silo",
        ),
        (
            [replace(FP, layout_sha256="b" * 64)],
            "model architecture 'acme-net' (acme-models 1.0.0) builds a different parameter "
            "layout at the silo (layout bbbbbbbbbbbb, coordinator aaaaaaaaaaaa)",
        ),
    ],
)
def test_mismatch_reason(silo: list[ModelFingerprint], expected: str | None) -> None:
    assert mismatch_reason([FP], silo) == expected


def test_several_differences_make_one_line() -> None:
    other = ModelFingerprint("beta-net", "acme-models", "1.0.0", "c" * 64)
    reason = mismatch_reason(
        [FP, other], [replace(other, layout_sha256="d" * 64), replace(FP, provider_version="2")]
    )
    assert reason is not None and "\n" not in reason
    assert reason.startswith("model architecture 'acme-net' comes from")
    assert reason.endswith("(and 1 more architecture(s) differ)")
    with pytest.raises(ModelMismatchError, match="acme-net") as error:
        check_silo_models([FP, other], [replace(FP, provider_version="2")])
    assert error.value.code.name == "FAILED_PRECONDITION"
    check_silo_models([FP, other], [FP])  # equal: no error


def _net(hidden: int) -> str:
    return (
        "import torch\nfrom gptfl.models import Architecture, ProbeShape\n"
        "def build(spec):\n"
        f"    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, "
        f"{hidden}), torch.nn.Linear({hidden}, spec.num_classes))\n"
        "NET = Architecture(build=build)\n"
    )


def test_two_installations_of_a_plugin_are_told_apart(
    tmp_path: Path, plugin_path: PluginPath
) -> None:
    """The coordinator's installation against a silo's: same version, changed code."""

    def install(where: str, version: str, hidden: int) -> Path:
        return plugin_path.install(
            tmp_path / where,
            dist="acme-models",
            version=version,
            module="acme_net",
            source=_net(hidden),
            entry_points={"acme-net": "acme_net:NET"},
        )

    coordinator_site = install("coordinator", "1.0.0", 8)
    coordinator = local_fingerprints()
    assert "acme-net" in {f.arch for f in coordinator}
    plugin_path.remove(coordinator_site)

    same = install("same", "1.0.0", 8)
    assert mismatch_reason(coordinator, local_fingerprints()) is None
    plugin_path.remove(same)

    edited = install("edited", "1.0.0", 16)
    reason = mismatch_reason(coordinator, local_fingerprints())
    assert reason is not None and "builds a different parameter layout at the silo" in reason
    plugin_path.remove(edited)

    install("newer", "1.0.1", 8)
    reason = mismatch_reason(coordinator, local_fingerprints())
    assert reason is not None and "but from acme-models 1.0.1 at the silo" in reason


def test_an_architecture_that_refuses_its_own_probe_is_left_out(
    tmp_path: Path, plugin_path: PluginPath
) -> None:
    plugin_path.install(
        tmp_path / "site",
        dist="picky-models",
        module="picky_models",
        source="from gptfl.errors import ConfigError\n"
        "def build(spec):\n    raise ConfigError('picky-net takes 224x224 only')\n",
        entry_points={"picky-net": "picky_models:build"},
    )
    names = {f.arch for f in local_fingerprints()}
    assert "picky-net" not in names and {"cnn-small", "resnet20"} <= names


def test_fingerprinting_is_cheap_and_transformers_models_go_by_version() -> None:
    code = (
        "import json, sys\n"
        "from gptfl.models.fingerprint import local_fingerprints\n"
        "found = {f.arch: [f.provider_version, f.layout_sha256] for f in local_fingerprints()}\n"
        "heavy = [m for m in ('transformers', 'torch._dynamo') if m in sys.modules]\n"
        "print(json.dumps({'found': found, 'imported': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # Neither transformers' model code nor torch._dynamo (which random fills of meta tensors
    # would import) is loaded by fingerprinting: each costs every process a second or more.
    assert result["imported"] == []
    library = importlib.metadata.version("transformers")
    for arch in ("resnet18-gn", "resnet50-gn", "convnext-tiny", "vit-b16"):
        assert result["found"][arch] == [f"{__version__} (transformers {library})", ""]
    assert len(result["found"]["cnn-small"][1]) == 64  # the small ones are built


def test_a_version_only_fingerprint_is_compared_by_its_versions() -> None:
    vit = ModelFingerprint("vit-b16", "gpt-fl", "0.1.0 (transformers 5.24.0)", "")
    assert mismatch_reason([vit], [vit]) is None
    reason = mismatch_reason([vit], [replace(vit, provider_version="0.1.0 (transformers 5.3.0)")])
    assert reason == (
        "model architecture 'vit-b16' comes from gpt-fl 0.1.0 (transformers 5.24.0) at the "
        "coordinator but from gpt-fl 0.1.0 (transformers 5.3.0) at the silo"
    )
    # An empty digest on one side only (a peer that built it) is not a layout difference.
    assert mismatch_reason([vit], [replace(vit, layout_sha256="e" * 64)]) is None
