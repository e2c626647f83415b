"""Tasks for silos and the long poll that hands them out.

A task is one silo's part in a round: train on the global model, or evaluate it. The
coordinator publishes a round's tasks at once; each silo's ``PullTask`` long poll wakes as
soon as its task is there, so silos that stay connected start a round within milliseconds.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from gptfl.errors import (
    DuplicateUpdateError,
    PermissionDeniedError,
    StaleTaskError,
    UnknownTaskError,
)
from gptfl.models.spec import ModelSpec
from gptfl.task import LocalSettings, TaskKind, TaskSpec
from gptfl.weights import Manifest, WeightMap, manifest_and_crcs


class TaskStatus(enum.Enum):
    PENDING = "pending"  # published, not yet pulled
    DISPATCHED = "dispatched"  # pulled by its silo
    RECEIVING = "receiving"  # an upload for it is being received
    DONE = "done"
    DECLINED = "declined"
    EXPIRED = "expired"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.DONE, TaskStatus.DECLINED, TaskStatus.EXPIRED)


@dataclass(frozen=True)
class ModelVersion:
    """A global model with its manifest and chunk checksums (computed once, sent to every silo)."""

    weights: WeightMap
    manifest: Manifest
    chunk_crcs: tuple[int, ...]

    @classmethod
    def of(cls, weights: WeightMap) -> ModelVersion:
        manifest, crcs = manifest_and_crcs(weights)
        return cls(weights, manifest, crcs)


@dataclass
class TaskRecord:
    job_id: str
    round: int
    kind: TaskKind
    silo_id: str
    model: ModelVersion
    model_spec: ModelSpec
    local: LocalSettings
    deadline_unix: float
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: TaskStatus = TaskStatus.PENDING
    decline_reason: str = ""

    def spec(self) -> TaskSpec:
        """What the silo is told about this task."""
        return TaskSpec(
            task_id=self.task_id,
            job_id=self.job_id,
            round=self.round,
            kind=self.kind,
            model_spec=self.model_spec,
            model_digest=self.model.manifest.digest,
            local=self.local,
            deadline_unix=self.deadline_unix,
        )


class TaskBoard:
    """Thread-safe: tasks by id, a queue per silo, and a condition for long polls."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tasks: dict[str, TaskRecord] = {}
        self._queues: dict[str, deque[TaskRecord]] = {}
        self._generation = 0
        # Tasks of past rounds, without their models: (silo, round, final status).
        self._retired: dict[str, tuple[str, int, TaskStatus]] = {}

    def publish(self, tasks: Iterable[TaskRecord]) -> None:
        with self._cond:
            for task in tasks:
                self._tasks[task.task_id] = task
                self._queues.setdefault(task.silo_id, deque()).append(task)
            self._cond.notify_all()

    def pull(self, silo_id: str, timeout_s: float) -> TaskRecord | None:
        """The silo's next pending task, waiting up to ``timeout_s`` for one."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            generation = self._generation
            while True:
                queue = self._queues.get(silo_id)
                while queue:
                    task = queue.popleft()
                    if task.status is TaskStatus.PENDING:
                        task.status = TaskStatus.DISPATCHED
                        return task
                remaining = deadline - time.monotonic()
                if remaining <= 0 or generation != self._generation:
                    return None
                self._cond.wait(remaining)

    def wake_all(self) -> None:
        """Ends every waiting long poll now (job ended, shutdown)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def lookup(self, silo_id: str, task_id: str, kind: TaskKind | None) -> TaskRecord:
        """The task ``task_id`` if it is ``silo_id``'s, of ``kind`` (None: any) and still
        open, else a precise error."""
        with self._cond:
            task = self._tasks.get(task_id)
            if task is None:
                self._raise_for_retired(silo_id, task_id)
                raise UnknownTaskError(f"no task {task_id!r}")
            if task.silo_id != silo_id:
                raise PermissionDeniedError(f"task {task_id} belongs to another silo")
            if kind is not None and task.kind is not kind:
                raise StaleTaskError(f"task {task_id} is a {task.kind.value} task")
            if task.status is TaskStatus.DONE:
                raise DuplicateUpdateError(f"task {task_id} was already completed")
            if task.status.finished:
                raise StaleTaskError(f"task {task_id} of round {task.round} is {task.status.value}")
            return task

    def claim(self, task: TaskRecord) -> None:
        """Marks an upload for ``task`` as in progress; a second concurrent one is refused."""
        with self._cond:
            if task.status is TaskStatus.RECEIVING:
                raise DuplicateUpdateError(f"an upload for task {task.task_id} is in progress")
            if task.status.finished:
                raise StaleTaskError(f"task {task.task_id} is {task.status.value}")
            task.status = TaskStatus.RECEIVING

    def release(self, task: TaskRecord) -> None:
        """A failed upload: the task is open again, for another upload of the same update or,
        if the silo lost it (its process died mid-upload), to be pulled and run again."""
        with self._cond:
            if task.status is TaskStatus.RECEIVING:
                self._reopen(task)

    def hand_back(self, silo_id: str) -> int:
        """The silo (re)started and holds no task: its dispatched, unfinished tasks can be
        pulled again, instead of waiting for their round's deadline. Returns how many."""
        with self._cond:
            open_tasks = [
                t
                for t in self._tasks.values()
                if t.silo_id == silo_id and t.status is TaskStatus.DISPATCHED
            ]
            for task in open_tasks:
                self._reopen(task)
            return len(open_tasks)

    def _reopen(self, task: TaskRecord) -> None:
        """Back to PENDING at the end of its silo's queue (with the lock held)."""
        task.status = TaskStatus.PENDING
        queue = self._queues.setdefault(task.silo_id, deque())
        if not any(queued is task for queued in queue):
            queue.append(task)
        self._cond.notify_all()

    def finish(self, task: TaskRecord, status: TaskStatus, reason: str = "") -> bool:
        """Moves ``task`` to a final status; False if it was already final."""
        with self._cond:
            if task.status.finished:
                return False
            task.status = status
            task.decline_reason = reason
            self._cond.notify_all()
            return True

    def expire(self, tasks: Iterable[TaskRecord]) -> int:
        """Expires the given tasks that are still open; returns how many."""
        count = 0
        for task in tasks:
            if self.finish(task, TaskStatus.EXPIRED):
                count += 1
        return count

    def retire(self, tasks: Iterable[TaskRecord]) -> None:
        """Drops finished tasks of a past round, keeping only what precise errors need.

        The task records hold that round's model; dropping them lets it be freed.
        """
        with self._cond:
            for task in tasks:
                self._tasks.pop(task.task_id, None)
                self._retired[task.task_id] = (task.silo_id, task.round, task.status)

    def _raise_for_retired(self, silo_id: str, task_id: str) -> None:
        retired = self._retired.get(task_id)
        if retired is None:
            return
        owner, round_, status = retired
        if owner != silo_id:
            raise PermissionDeniedError(f"task {task_id} belongs to another silo")
        if status is TaskStatus.DONE:
            raise DuplicateUpdateError(f"task {task_id} was already completed")
        raise StaleTaskError(f"task {task_id} belongs to round {round_}, which has closed")

    def wait_until(
        self, tasks: list[TaskRecord], deadline_monotonic: float, stop: threading.Event
    ) -> None:
        """Blocks until every task is finished, the deadline passes, or ``stop`` is set."""
        with self._cond:
            while not all(t.status.finished for t in tasks) and not stop.is_set():
                remaining = deadline_monotonic - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(min(remaining, 0.5))

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
