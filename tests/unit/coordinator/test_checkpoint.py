"""Checkpoints: round trip, LATEST, pruning, and what a crash can leave behind."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from coordinator.checkpoint import (
    LATEST,
    NICE_INCREMENT,
    CheckpointWriter,
    load_latest,
    lower_thread_priority,
    save_checkpoint,
)
from coordinator.job_state import JobState, Phase, RoundRecord, SiloSummary
from gptfl.errors import ValidationError
from gptfl.weights import WeightMap


def _weights(value: float) -> WeightMap:
    return {
        "conv.weight": torch.full((4, 1, 3, 3), value),
        "conv.bias": torch.arange(4, dtype=torch.float16) + value,
        "steps": torch.tensor(int(value)),
    }


def _state(round_: int) -> JobState:
    rounds = [
        RoundRecord(
            round=r,
            silos_selected=3,
            updates_accepted=2,
            updates_rejected=1,
            examples=100 * r,
            seconds=1.5,
            slowest_train_seconds=1.0,
            train_loss=0.5 / r,
            test_loss=None,
            test_accuracy=0.1 * r,
            federated_accuracy=None,
        )
        for r in range(1, round_ + 1)
    ]
    return JobState(
        job_id="job-1",
        spec={"name": "demo", "rounds": 10},
        phase=Phase.FEDERATING,
        message="training",
        round=round_,
        rounds=rounds,
        silos={"a": SiloSummary(rounds_participated=round_, examples=50, updates_rejected=1)},
        initialisation={"kind": "random", "seed": 3},
        created_unix=1000.0,
    )


def _save(folder: Path, round_: int, *, keep: int = 3, value: float | None = None) -> Path:
    return save_checkpoint(
        folder,
        round_=round_,
        weights=_weights(float(round_) if value is None else value),
        strategy_state={"m/w": torch.full((2,), float(round_))},
        state=_state(round_),
        keep=keep,
    )


def _rounds_on_disk(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_nothing_to_load_before_the_first_checkpoint(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "checkpoints") is None


def test_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    path = _save(folder, 2)
    assert path == folder / "round-0002"
    checkpoint = load_latest(folder)
    assert checkpoint is not None
    assert checkpoint.round == 2
    want = _weights(2.0)
    assert set(checkpoint.weights) == set(want)
    for name, tensor in want.items():
        assert checkpoint.weights[name].dtype == tensor.dtype
        assert torch.equal(checkpoint.weights[name], tensor), name
    assert torch.equal(checkpoint.strategy_state["m/w"], torch.full((2,), 2.0))
    assert checkpoint.state == _state(2)
    assert checkpoint.state.rounds[1].test_loss is None
    assert checkpoint.state.silos["a"].updates_rejected == 1


def test_empty_strategy_state_round_trips(tmp_path: Path) -> None:
    save_checkpoint(
        tmp_path, round_=0, weights=_weights(0.0), strategy_state={}, state=_state(0), keep=3
    )
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None
    assert checkpoint.round == 0
    assert checkpoint.strategy_state == {}


def test_latest_points_at_the_newest(tmp_path: Path) -> None:
    for r in range(4):
        _save(tmp_path, r, keep=10)
    assert (tmp_path / LATEST).read_text().strip() == "round-0003"
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None and checkpoint.round == 3
    assert torch.equal(checkpoint.weights["conv.weight"], torch.full((4, 1, 3, 3), 3.0))


def test_pruning_keeps_the_newest_n(tmp_path: Path) -> None:
    for r in range(6):
        _save(tmp_path, r, keep=2)
    assert _rounds_on_disk(tmp_path) == ["round-0004", "round-0005"]


def test_pruning_orders_rounds_by_number_past_four_digits(tmp_path: Path) -> None:
    # job specs allow up to 100000 rounds; "round-10000" sorts before "round-9999" as text
    for r in (9998, 9999, 10000):
        _save(tmp_path, r, keep=2)
    assert sorted(_rounds_on_disk(tmp_path)) == ["round-10000", "round-9999"]
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None and checkpoint.round == 10000


def test_a_leftover_staging_folder_does_not_break_loading(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    # a crash while writing round 2: its hidden staging folder holds a torn model file
    staging = tmp_path / ".round-0002.tmp"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\x00\x01torn")
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None and checkpoint.round == 1
    # the re-run of round 2 writes over the leftover
    _save(tmp_path, 2)
    assert not staging.exists()
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None and checkpoint.round == 2


def test_a_crash_before_latest_moves_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    latest = (tmp_path / LATEST).read_text()
    _save(tmp_path, 2)
    (tmp_path / LATEST).write_text(latest)  # the rename happened, the LATEST update did not
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None and checkpoint.round == 1


def test_resaving_a_round_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2, value=20.0)
    _save(tmp_path, 2, value=-7.0)  # the round re-run after a crash
    assert _rounds_on_disk(tmp_path) == ["round-0001", "round-0002"]
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None
    assert torch.equal(checkpoint.weights["conv.weight"], torch.full((4, 1, 3, 3), -7.0))


def test_checkpoint_folder_holds_no_temporary_files(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "state.json",
        "strategy.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    shutil.rmtree(path)  # LATEST now names a missing folder: loading must not pass silently
    with pytest.raises(ValidationError, match="round-0001"):
        load_latest(tmp_path)


# ---- the background writer -------------------------------------------------------------


def _submit(writer: CheckpointWriter, round_: int) -> None:
    writer.submit(
        round_=round_,
        weights=_weights(float(round_)),
        strategy_state={"m/w": torch.full((2,), float(round_))},
        state=_state(round_),
    )


def test_the_writer_writes_in_order_and_flush_waits(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, keep=2)
    for r in range(4):
        _submit(writer, r)
    writer.flush()
    assert _rounds_on_disk(tmp_path) == ["round-0002", "round-0003"]
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None and checkpoint.round == 3
    assert torch.equal(checkpoint.strategy_state["m/w"], torch.full((2,), 3.0))
    writer.close()
    with pytest.raises(RuntimeError):  # a closed writer takes no more checkpoints
        _submit(writer, 4)


def test_a_failed_write_surfaces_at_the_next_flush(tmp_path: Path) -> None:
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the folder should be")
    writer = CheckpointWriter(blocker, keep=2)
    _submit(writer, 1)  # returns at once
    with pytest.raises(OSError):
        writer.flush()
    writer.flush()  # reported once
    writer.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_writer_thread_runs_at_a_lower_priority() -> None:
    seen: list[tuple[int, int]] = []

    def probe() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        lower_thread_priority()
        seen.append((before, os.getpriority(os.PRIO_PROCESS, tid)))

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    ((before, after),) = seen
    assert after == min(19, before + NICE_INCREMENT)
    # only that thread: this one keeps its priority
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
