"""The job manager after a crash: what it resumes, and what it must not."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest

from coordinator.job_manager import ACTIVE, JobManager
from coordinator.metrics import CoordinatorMetrics
from coordinator.silo_registry import SiloRegistry
from coordinator.tasks import TaskBoard
from tests.waiting import wait_until

SPEC = """\
name: crash
model: {arch: cnn-small, num_classes: 10, in_channels: 1, image_size: 8}
rounds: 2
min_silos: 1
wait_for_silos_s: 60
"""


def _manager(tmp_path: Path) -> JobManager:
    return JobManager(
        state_dir=tmp_path / "state",
        runs_dir=tmp_path / "runs",
        registry=SiloRegistry(timeout_s=60),
        board=TaskBoard(),
        metrics=CoordinatorMetrics.create(),
    )


def _wait_ended(manager: JobManager) -> None:
    wait_until(
        lambda: (runner := manager.current()) is not None and not runner.is_running,
        timeout_s=30,
        what="the job to end",
    )


def test_a_job_that_ended_is_not_resumed_after_a_crash_during_its_export(
    tmp_path: Path,
) -> None:
    first = _manager(tmp_path)
    job_id = first.submit(SPEC, submitted_by="admin")
    latest = tmp_path / "state" / "jobs" / job_id / "checkpoints" / "LATEST"
    # round 0 is checkpointed while it waits for silos
    wait_until(latest.exists, timeout_s=30, what="the round-0 checkpoint")
    first.stop("enough")
    _wait_ended(first)
    summary = tmp_path / "runs" / job_id / "summary.json"
    assert json.loads(summary.read_text())["status"] == "stopped"
    # The crash: the report was not (fully) written and ACTIVE was not yet removed.
    summary.unlink()
    (tmp_path / "state" / ACTIVE).write_text(job_id + "\n")

    second = _manager(tmp_path)
    assert second.resume_if_any() is None  # not resumed: it had ended
    assert not (tmp_path / "state" / ACTIVE).exists()
    assert json.loads(summary.read_text())["status"] == "stopped"  # written again
    assert (tmp_path / "runs" / job_id / "model.safetensors").exists()


def test_an_unreadable_checkpoint_does_not_stop_the_coordinator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _manager(tmp_path)
    job_id = first.submit(SPEC, submitted_by="admin")
    checkpoints = tmp_path / "state" / "jobs" / job_id / "checkpoints"
    wait_until((checkpoints / "LATEST").exists, timeout_s=30, what="the round-0 checkpoint")
    first.shutdown(grace_s=10)  # suspended: a restart would resume it
    latest = checkpoints / (checkpoints / "LATEST").read_text().strip()
    (latest / "state.json").write_text('{"job_id": ')  # damaged by hand, not by a crash

    second = _manager(tmp_path)
    assert second.resume_if_any() is None
    assert second.current() is None
    assert f"cannot resume job {job_id}" in caplog.text
    assert (tmp_path / "state" / ACTIVE).exists()  # left for the admin to look at


def test_a_new_job_lets_the_last_ended_one_go(tmp_path: Path) -> None:
    # The ended job stays current (status, download-model) only until the next one starts;
    # holding it longer kept its final model in memory for the whole next job.
    manager = _manager(tmp_path)
    manager.submit(SPEC, submitted_by="admin")
    manager.stop("enough")
    _wait_ended(manager)
    ended = manager.current()
    assert ended is not None and not ended.is_running
    gone = weakref.ref(ended)
    del ended
    manager.submit(SPEC.replace("name: crash", "name: next"), submitted_by="admin")
    gc.collect()
    assert gone() is None
    current = manager.current()
    assert current is not None and current.job_id.startswith("next-")
    manager.stop("done")
    _wait_ended(manager)
