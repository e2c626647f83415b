"""Checkpoints: after each round, the global model, the strategy's state and the job state.

Layout under a job's folder::

    checkpoints/round-0003/model.safetensors
    checkpoints/round-0003/strategy.safetensors
    checkpoints/round-0003/state.json
    checkpoints/LATEST            <- "round-0003"

A checkpoint is written into a hidden temporary folder that is renamed into place, and only
then is ``LATEST`` replaced (atomically), so a crash at any moment leaves the previous
complete checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.job_state import JobState
from gptfl import atomic_io
from gptfl.weights import WeightMap
from gptfl.weights_io import load_weights, save_weights

LATEST = "LATEST"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    weights: WeightMap
    strategy_state: WeightMap
    state: JobState


def _name(round_: int) -> str:
    return f"round-{round_:04d}"


def save_checkpoint(
    folder: Path,
    *,
    round_: int,
    weights: Mapping[str, torch.Tensor],
    strategy_state: Mapping[str, torch.Tensor],
    state: JobState,
    keep: int,
) -> Path:
    """Writes checkpoint ``round_`` under ``folder`` and prunes all but the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / _name(round_)
    staging = folder / f".{_name(round_)}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_weights(staging / "model.safetensors", weights, metadata={"round": round_})
    save_weights(staging / "strategy.safetensors", strategy_state)
    atomic_io.write_json(staging / "state.json", state.to_json())
    if final.exists():  # a round re-run after a crash replaces its older checkpoint
        shutil.rmtree(final)
    os.replace(staging, final)
    atomic_io.fsync_dir(folder)
    atomic_io.write_text(folder / LATEST, final.name + "\n")
    _prune(folder, keep=keep)
    return final


def _prune(folder: Path, *, keep: int) -> None:
    # By number, not by name: "round-10000" sorts before "round-9999" as text.
    numbered = {
        int(p.name.removeprefix("round-")): p
        for p in folder.glob("round-*")
        if p.is_dir() and p.name.removeprefix("round-").isdigit()
    }
    rounds = [numbered[n] for n in sorted(numbered)]
    for old in rounds[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_latest(folder: Path) -> Checkpoint | None:
    """The checkpoint ``LATEST`` names, or None when there is none yet."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    weights, meta = load_weights(path / "model.safetensors")
    strategy_state, _ = load_weights(path / "strategy.safetensors")
    state = JobState.from_json(json.loads((path / "state.json").read_text()))
    return Checkpoint(int(meta["round"]), weights, strategy_state, state)
