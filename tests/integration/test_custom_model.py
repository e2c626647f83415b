"""Bring your own model: the example package in examples/custom-model, installed with pip.

The package is installed the way an operator would (``pip install --target``, here without
its dependencies and offline), and its architecture must then resolve by name in this process
and in any other started with that folder on its path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gptfl.models import ModelSpec, architecture, build_model
from gptfl.models.fingerprint import fingerprint
from gptfl.models.registry import reload_plugins
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "custom-model"


def pip_install_example(dest: Path, *, version: str | None = None) -> Path:
    """Installs a copy of the example package into ``dest`` (``version`` replaces its
    version) and returns ``dest``."""
    pytest.importorskip("setuptools")  # the offline build uses the environment's setuptools
    source = dest.parent / f"{dest.name}-source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    if version is not None:
        pyproject = source / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8")
        pyproject.write_text(text.replace('version = "1.0.0"', f'version = "{version}"'))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + ["--no-deps", "--no-build-isolation", "--no-index", "--target", str(dest), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return dest


@pytest.fixture(scope="module")
def acme_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install_example(tmp_path_factory.mktemp("acme") / "site")


@pytest.fixture
def on_path(acme_site: Path) -> Iterator[Path]:
    sys.path.insert(0, str(acme_site))
    reload_plugins()
    yield acme_site
    sys.path.remove(str(acme_site))
    for name in [m for m in sys.modules if m == "acme_vision" or m.startswith("acme_vision.")]:
        del sys.modules[name]
    reload_plugins()


def test_the_installed_example_builds_and_trains_by_name(on_path: Path) -> None:
    spec = ModelSpec(arch="acme-tinynet", num_classes=5, in_channels=3, image_size=24)
    model = build_model(spec, seed=0)
    inputs, labels = torch.rand(4, 3, 24, 24), torch.tensor([0, 1, 2, 4])
    logits = model(inputs)
    assert logits.shape == (4, 5)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    arch = architecture("acme-tinynet")
    assert (arch.provider, arch.provider_version) == ("acme-vision-models", "1.0.0")
    assert fingerprint(arch).provider == "acme-vision-models"


def test_another_process_resolves_the_same_name(acme_site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(acme_site), str(REPO_ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "gptfl.cli.main", "models", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = {a["arch"]: a for a in json.loads(done.stdout)["architectures"]}
    assert listed["acme-tinynet"]["provider"] == "acme-vision-models"
    assert listed["acme-tinynet"]["provider_version"] == "1.0.0"
    assert {"cnn-small", "resnet20"} <= set(listed)
