"""Checkpoints: after each round, the global model, the strategy's state and the job state.

Layout under a job's folder::

    checkpoints/round-0003/model.safetensors
    checkpoints/round-0003/strategy.safetensors
    checkpoints/round-0003/state.json
    checkpoints/LATEST            <- "round-0003"

A checkpoint is written into a hidden temporary folder that is renamed into place, and only
then is ``LATEST`` replaced (atomically), so a crash at any moment leaves the previous
complete checkpoint in charge.

A job writes its checkpoints through a :class:`CheckpointWriter`: one at a time, in order, on
a thread of its own at a lower CPU priority, straight from the model's tensors (no copy; see
:func:`gptfl.weights_io.save_weights` for how the page cache is kept small too). The round
goes on meanwhile; the write yields the CPU to the round's transfers and finishes in the time
the silos train.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.job_state import JobState
from gptfl import atomic_io
from gptfl.weights import WeightMap
from gptfl.weights_io import load_weights, save_weights

LATEST = "LATEST"
#: the checkpoint thread's nice value above the coordinator's (Linux: a per-thread setting)
NICE_INCREMENT = 10

log = logging.getLogger(__name__)


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


def lower_thread_priority(increment: int = NICE_INCREMENT) -> None:
    """Raises the calling thread's nice value by ``increment`` (best effort: Linux only, and a
    process that may not change its priority keeps it)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted
        log.debug("checkpoint thread keeps its priority: %s", exc)


class CheckpointWriter:
    """Writes a job's checkpoints in the background, one at a time and in order.

    :meth:`submit` returns at once; the tensors it is given are read while the checkpoint is
    written, so the caller must not change them in place until :meth:`flush` has returned
    (the job's global models are never changed; a strategy's state is, and the job flushes
    before it updates it). Errors of a write surface from the next :meth:`flush`.
    """

    def __init__(self, folder: Path, *, keep: int, name: str = "checkpoint") -> None:
        self.folder = folder
        self._keep = keep
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=lower_thread_priority
        )
        self._pending: Future[Path] | None = None

    def submit(
        self,
        *,
        round_: int,
        weights: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, torch.Tensor],
        state: JobState,
    ) -> None:
        """Starts writing checkpoint ``round_`` once the one being written (if any) is done."""
        self.flush()
        self._pending = self._executor.submit(
            save_checkpoint,
            self.folder,
            round_=round_,
            weights=weights,
            strategy_state=strategy_state,
            state=state,
            keep=self._keep,
        )

    def flush(self) -> None:
        """Waits for the checkpoint being written; raises what its write raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Waits for the last write (see :meth:`flush`) and ends the thread."""
        try:
            self.flush()
        finally:
            self._executor.shutdown(wait=True)
