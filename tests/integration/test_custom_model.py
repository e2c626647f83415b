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

from gptfl.local_cluster import LocalCluster, SiloPlan
from gptfl.models import ModelSpec, architecture, build_model
from gptfl.models.fingerprint import fingerprint
from gptfl.models.registry import reload_plugins
from gptfl.weights_io import load_weights
from tests.conftest import REPO_ROOT
from tests.integration.conftest import start_and_submit, wait_for_end

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


@pytest.mark.slow
def test_a_job_trains_the_installed_model_and_a_silo_with_another_version_is_refused(
    tmp_path: Path, on_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coordinator and silo-1 have acme-vision-models 1.0.0; silo-2 has 1.0.1. All are real
    processes over mutual TLS. silo-2 is refused at registration and exits 1; the job runs
    ``acme-tinynet`` on silo-1 and its final model has the package's layout."""
    newer_site = pip_install_example(tmp_path / "newer-site", version="1.0.1")
    base_path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(on_path), base_path) if p))
    digits = {"kind": "sklearn-digits", "split": "train"}
    plans = [
        SiloPlan("silo-1", {"train": {**digits, "partition": {"index": 0, "count": 2}}}),
        SiloPlan(
            "silo-2",
            {"train": {**digits, "partition": {"index": 1, "count": 2}}},
            env={"PYTHONPATH": os.pathsep.join(p for p in (str(newer_site), base_path) if p)},
        ),
    ]
    spec = {
        "name": "acme-job",
        "model": {"arch": "acme-tinynet", "num_classes": 10, "in_channels": 3, "image_size": 16},
        "rounds": 2,
        "min_silos": 1,
        "round_deadline_s": 120,
        "wait_for_silos_s": 120,
        "local": {"epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        "evaluation": {"server": {**digits, "split": "test"}, "federated": False},
    }
    cluster = LocalCluster(tmp_path / "work", silos=plans, runs_dir=tmp_path / "runs")
    try:
        job_id = start_and_submit(cluster, spec)
        with cluster.admin() as admin:
            status = wait_for_end(admin, 240)
            assert status.phase == "finished", (status.message, cluster.log_tail("coordinator"))
            registered = {s.silo_id for s in admin.silos()}
        exits = cluster.wait_silos(timeout_s=60)
    finally:
        cluster.stop()
    assert exits == {"silo-1": 0, "silo-2": 1}, exits
    assert registered == {"silo-1"}
    reason = (
        "model architecture 'acme-tinynet' comes from acme-vision-models 1.0.0 at the "
        "coordinator but from acme-vision-models 1.0.1 at the silo"
    )
    assert f"the coordinator refused this silo: {reason}" in cluster.log_tail("silo-2")
    assert f"silo silo-2 refused: {reason}" in (cluster.logs_dir / "coordinator.log").read_text()
    weights, _ = load_weights(cluster.runs_dir / job_id / "model.safetensors")
    built = build_model(ModelSpec.model_validate(spec["model"])).state_dict()  # this process: 1.0.0
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in built.items()}
    summary = json.loads((cluster.runs_dir / job_id / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
