"""A round as stages: publish a task of one kind to chosen silos, wait, expire, retire.

Every stage of every round goes through :meth:`StageRunner.run`, written once: a plain round
is a training stage and an evaluation stage; a secure-aggregation round adds key exchange
and unmasking stages, each with its own deadline. What a stage's replies mean is up to
whoever receives them (the update intake folds uploads into the round's fold); the runner
only knows which tasks finished, were declined, or expired.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coordinator.inflight_uploads import InFlightUploads
from coordinator.tasks import TaskBoard, TaskRecord, TaskStatus
from gptfl.task import TaskKind

log = logging.getLogger(__name__)

#: how often a stage that waits wakes to end uploads that stalled
_STALL_CHECK_S = 1.0

#: builds a stage's tasks: (kind, silos, deadline as Unix time) -> one task per silo
TaskMaker = Callable[[TaskKind, Sequence[str], float], list[TaskRecord]]


@dataclass(frozen=True)
class Stage:
    """One step of a round.

    Attributes:
        name: what the stage is called in logs and status ("train", "evaluate", ...).
        kind: the kind of task each silo gets.
        silos: the silos that take part, one task each.
        deadline_s: how long the stage waits for replies before it expires the rest.
        prepare: called on each of the stage's tasks before it is published (what a
            secure-aggregation stage relays to each silo goes into its task here).
    """

    name: str
    kind: TaskKind
    silos: tuple[str, ...]
    deadline_s: float
    prepare: Callable[[TaskRecord], None] | None = None


@dataclass(frozen=True)
class StageResult:
    """How a stage ended: its tasks in their final state (this stage's own copies)."""

    stage: Stage
    tasks: tuple[TaskRecord, ...]
    stopped: bool

    def silos_with(self, status: TaskStatus) -> list[str]:
        """The silos whose task ended in ``status``, in the stage's order."""
        return [t.silo_id for t in self.tasks if t.status is status]

    @property
    def done(self) -> list[str]:
        return self.silos_with(TaskStatus.DONE)

    @property
    def declines(self) -> list[str]:
        """``"silo: reason"`` for each declined task."""
        return [f"{t.silo_id}: {t.decline_reason}" for t in self.tasks if t.decline_reason]


class StageRunner:
    """Runs stages on the task board of one job (from the job thread only)."""

    def __init__(
        self,
        *,
        board: TaskBoard,
        make_tasks: TaskMaker,
        fold_lock: threading.Lock,
        in_flight: InFlightUploads,
        stop: threading.Event,
    ) -> None:
        self._board = board
        self._make_tasks = make_tasks
        self._fold_lock = fold_lock
        self._in_flight = in_flight
        self._stop = stop

    def run(self, stage: Stage) -> StageResult:
        """Publishes the stage's tasks and waits until all are finished, the stage's deadline
        passes, or the job is asked to stop; then expires the open ones and retires them all.

        Expiry takes the fold lock, so an upload overtaken by the deadline is never half
        counted; uploads still streaming for an expired task are ended.
        """
        tasks = self._make_tasks(stage.kind, stage.silos, time.time() + stage.deadline_s)
        if stage.prepare is not None:
            for task in tasks:
                stage.prepare(task)
        log.debug("stage %s: %d tasks, deadline %.0fs", stage.name, len(tasks), stage.deadline_s)
        self._board.publish(tasks)
        deadline = time.monotonic() + stage.deadline_s
        while True:
            self._board.wait_until(
                tasks, min(deadline, time.monotonic() + _STALL_CHECK_S), self._stop
            )
            finished = all(t.status.finished for t in tasks)
            if finished or self._stop.is_set() or time.monotonic() >= deadline:
                break
            self._in_flight.end_stalled()
        with self._fold_lock:
            self._board.expire(tasks)
        self._board.retire(tasks)  # final now: the records are this stage's own copies
        self._in_flight.end_expired(tasks)
        return StageResult(stage, tuple(tasks), stopped=self._stop.is_set())
