"""GPT-FL on an RGB task with the text-to-image backend, end to end over mutual TLS.

The synth service (a real process) loads a tiny Stable-Diffusion-shaped pipeline saved with
``save_pretrained`` (tests/conftest.py builds it offline from configs), turns the task's label
names into prompts, draws 16x16 RGB images and fits them to 32x32, pretrains ``resnet20`` on
them; the coordinator starts federated learning from that model on two silos holding small
RGB ``.npz`` datasets at 32x32. The pipeline's weights are random, so the images carry no
class signal: the test checks the plumbing (prompts from the labels, shapes, the pretrained
model being round 0 and what round 1 starts from), not accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gptfl.job_spec import JobSpec
from gptfl.local_cluster import LocalCluster, SiloPlan
from gptfl.models import build_model
from gptfl.synth_spec import PretrainSettings
from gptfl.weights_io import load_weights
from synth_service.artifacts import read_artifact
from synth_service.pretrain import pretrain
from synth_service.store import DatasetStore
from tests.integration.conftest import start_and_submit, wait_for_end

pytestmark = pytest.mark.slow

LABELS = ["red apple", "green leaf", "blue sky"]
SIZE = 32


def _rgb_npz(path: Path, *, count: int, seed: int) -> Path:
    """``count`` RGB 32x32 uint8 images (N, H, W, C) whose label is the brightest channel."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(LABELS), size=count)
    x = rng.integers(0, 90, size=(count, SIZE, SIZE, 3))
    x[np.arange(count), :, :, y] += 150
    np.savez(path, x=x.astype(np.uint8), y=y.astype(np.int64))
    return path


def _spec(test_npz: Path) -> dict[str, Any]:
    return {
        "name": "t2i-rgb",
        "model": {"arch": "resnet20", "num_classes": 3, "in_channels": 3, "image_size": SIZE},
        "rounds": 2,
        "seed": 0,
        "min_silos": 2,
        "round_deadline_s": 120,
        "wait_for_silos_s": 120,
        "local": {"epochs": 1, "batch_size": 16, "learning_rate": 0.05},
        "evaluation": {"server": {"kind": "npz", "path": str(test_npz)}, "federated": False},
        "pretrain": {
            "backend": "text-to-image",
            "generator": "tiny-sd",
            "labels": LABELS,
            "images_per_label": 4,
            "generation": {"prompts_per_label": 2, "guidance_min": 1.0, "guidance_max": 2.0},
            "generator_settings": {"num_inference_steps": 2},
            "training": {"epochs": 2, "batch_size": 8, "val_fraction": 0.25},
        },
    }


def test_text_to_image_pretraining_then_federated_fine_tuning_on_rgb(
    tmp_path: Path, tiny_text_to_image_dir: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    plans = [
        SiloPlan(
            f"silo-{i}",
            {"train": {"kind": "npz", "path": str(_rgb_npz(data / f"{i}.npz", count=48, seed=i))}},
        )
        for i in (1, 2)
    ]
    spec = _spec(_rgb_npz(data / "test.npz", count=60, seed=9))
    cluster = LocalCluster(tmp_path / "work", silos=plans, runs_dir=tmp_path / "runs", synth=True)
    cluster.provision()
    shutil.copytree(tiny_text_to_image_dir, Path(cluster.synth_config()["models_dir"]) / "tiny-sd")
    try:
        job_id = start_and_submit(cluster, spec)
        with cluster.admin() as admin:
            status = wait_for_end(admin, 300)
        assert status.phase == "finished", (status.message, cluster.log_tail("coordinator"))
        exits = cluster.wait_silos(timeout_s=60)
    finally:
        cluster.stop()
    assert exits == {"silo-1": 0, "silo-2": 0}, exits

    summary = json.loads((cluster.runs_dir / job_id / "summary.json").read_text())
    init = summary["initialisation"]
    assert init["kind"] == "pretrain" and init["images"] == 12
    assert init["counts"] == dict.fromkeys(LABELS, 4)
    assert (init["request"]["in_channels"], init["request"]["image_size"]) == (3, SIZE)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]

    # The synthetic dataset: prompts written from the label names, RGB images at 32x32.
    store = DatasetStore(Path(cluster.synth_config()["data_dir"]))
    stored = read_artifact(store.path_of(init["dataset_id"]))
    manifest = stored.manifest
    assert manifest.generator_id == "tiny-sd" and manifest.generator_hash == init["generator_hash"]
    for label in LABELS:
        prompts = manifest.prompts[label]
        assert len(prompts) == 2 and all(label in prompt for prompt in prompts), prompts
    assert stored.data.x.shape == (12, 3, SIZE, SIZE)
    assert stored.data.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4

    # Round 0 is the model pretrained on exactly that dataset (reproduced here bit for bit),
    # not a random start; federated training then moved it.
    job = JobSpec.model_validate(spec)
    assert job.pretrain is not None
    reproduced = pretrain(
        job.model, stored.data, PretrainSettings.model_validate(job.pretrain.training.model_dump())
    ).state_dict
    checkpoints = cluster.work_dir / "coordinator-state" / "jobs" / job_id / "checkpoints"
    round0, _ = load_weights(checkpoints / "round-0000" / "model.safetensors")
    assert all(torch.equal(round0[k], reproduced[k]) for k in reproduced)
    random_start = build_model(job.model, seed=job.seed).state_dict()
    assert not all(torch.equal(round0[k], random_start[k]) for k in random_start)
    final, metadata = load_weights(cluster.runs_dir / job_id / "model.safetensors")
    assert not all(torch.equal(final[k], round0[k]) for k in round0)
    assert metadata["initialisation"]["dataset_id"] == init["dataset_id"]
