"""Tasks for silos and the long poll that hands them out.

A task is one silo's part in a round: train on the global model, or evaluate it. The
coordinator publishes a round's tasks at once; each silo's ``PullTask`` long poll wakes as
soon as its task is there, so silos that stay connected start a round within milliseconds.

A pull is idempotent, so gRPC may retry it (``gptfl.rpc``'s retry policy): a silo pulls only
when it holds no task, so a task dispatched to it that it has not named in any call since
(no download, upload, report or decline) never reached it, and its next pull sends that same
task again. The task is re-sent, not duplicated: one record, still ``DISPATCHED``.
"""

from __future__ import annotations

import enum
import logging
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
from gptfl.secagg.messages import SecAggTask
from gptfl.task import LocalSettings, TaskKind, TaskSpec
from gptfl.weights import Manifest, WeightMap, manifest_and_crcs

log = logging.getLogger(__name__)


class TaskStatus(enum.Enum):
    PENDING = "pending"  # published, not yet pulled
    DISPATCHED = "dispatched"  # pulled by its silo
    RECEIVING = "receiving"  # an upload for it is being received
    DONE = "done"
    DECLINED = "declined"
    EXPIRED = "expired"
    REJECTED = "rejected"  # refused too often for one reason (TaskBoard.refuse)

    @property
    def finished(self) -> bool:
        return self in (
            TaskStatus.DONE,
            TaskStatus.DECLINED,
            TaskStatus.EXPIRED,
            TaskStatus.REJECTED,
        )


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
    #: the job's planned rounds (a DP silo calibrates its noise for all of them)
    rounds: int = 0
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: TaskStatus = TaskStatus.PENDING
    decline_reason: str = ""
    #: the silo named this task in a call since it was last dispatched, so it holds it
    taken: bool = False
    #: how often the silo's replies to this task were refused, by reason
    refusals: dict[str, int] = field(default_factory=dict)
    #: its part in a secure-aggregation round (set by the stage before it is published)
    secagg: SecAggTask | None = None

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
            rounds=self.rounds,
            secagg=self.secagg,
        )


class TaskBoard:
    """Thread-safe: tasks by id, a queue per silo, and a condition for long polls."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tasks: dict[str, TaskRecord] = {}
        self._queues: dict[str, deque[TaskRecord]] = {}
        # Per silo, the tasks dispatched to it, oldest first, until it is seen to hold them.
        self._sent: dict[str, deque[TaskRecord]] = {}
        self._generation = 0
        # Tasks of past rounds, without their models: (silo, round, final status).
        self._retired: dict[str, tuple[str, int, TaskStatus, TaskKind]] = {}

    def publish(self, tasks: Iterable[TaskRecord]) -> None:
        with self._cond:
            for task in tasks:
                self._tasks[task.task_id] = task
                self._queues.setdefault(task.silo_id, deque()).append(task)
            self._cond.notify_all()

    def pull(self, silo_id: str, timeout_s: float) -> TaskRecord | None:
        """The silo's next task, waiting up to ``timeout_s`` for one.

        A task already dispatched to the silo and not taken since (see the module docstring)
        comes first, sent again; then the silo's pending tasks in the order published.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            generation = self._generation
            while True:
                lost = self._sent_not_taken(silo_id)
                if lost is not None:
                    log.info(
                        "task %s (round %d) sent to silo %s again: it was dispatched and "
                        "not taken (a pull whose reply was lost)",
                        lost.task_id,
                        lost.round,
                        silo_id,
                    )
                    return lost
                queue = self._queues.get(silo_id)
                while queue:
                    task = queue.popleft()
                    if task.status is TaskStatus.PENDING:
                        task.status = TaskStatus.DISPATCHED
                        task.taken = False
                        self._sent.setdefault(silo_id, deque()).append(task)
                        return task
                remaining = deadline - time.monotonic()
                if remaining <= 0 or generation != self._generation:
                    return None
                self._cond.wait(remaining)

    def _sent_not_taken(self, silo_id: str) -> TaskRecord | None:
        """The oldest task dispatched to ``silo_id`` and not taken (with the lock held);
        drops the entries before it that are taken, reopened or finished."""
        sent = self._sent.get(silo_id)
        while sent:
            task = sent[0]
            if task.status is TaskStatus.DISPATCHED and not task.taken:
                return task
            sent.popleft()
        return None

    def wake_all(self) -> None:
        """Ends every waiting long poll now (job ended, shutdown)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def lookup(self, silo_id: str, task_id: str, kind: TaskKind | None) -> TaskRecord:
        """The task ``task_id`` if it is ``silo_id``'s, of ``kind`` (None: any) and still
        open, else a precise error.

        Every call a silo makes about a task looks it up here, so this is also where the
        board learns that the silo holds the task: its pulls no longer send it again.
        """
        with self._cond:
            task = self._tasks.get(task_id)
            if task is None:
                self._raise_for_retired(silo_id, task_id)
                raise UnknownTaskError(f"no task {task_id!r}")
            if task.silo_id != silo_id:
                raise PermissionDeniedError(f"task {task_id} belongs to another silo")
            task.taken = True
            if kind is not None and task.kind is not kind:
                raise StaleTaskError(f"task {task_id} is a {task.kind.value} task")
            if task.status is TaskStatus.DONE:
                raise DuplicateUpdateError(f"task {task_id} was already completed")
            if task.status.finished:
                raise StaleTaskError(f"task {task_id} of round {task.round} is {task.status.value}")
            return task

    def ended_as(self, silo_id: str, task_id: str) -> tuple[TaskKind, TaskStatus] | None:
        """The kind and final status of ``silo_id``'s task ``task_id`` once it has ended (in
        its round or retired since); None while it is open, or if it is not that silo's.

        What a retried call needs: a decline or report whose first attempt arrived (and only
        the reply was lost) is answered as done instead of refused.
        """
        with self._cond:
            task = self._tasks.get(task_id)
            if task is not None:
                if task.silo_id != silo_id or not task.status.finished:
                    return None
                return task.kind, task.status
            retired = self._retired.get(task_id)
            if retired is None or retired[0] != silo_id:
                return None
            return retired[3], retired[2]

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

    def refuse(self, task: TaskRecord, reason: str, message: str, *, limit: int) -> bool:
        """A reply to ``task`` was refused for ``reason``: the task is closed as REJECTED
        once that reason has come ``limit`` times (returns True), else an upload in progress
        releases it as :meth:`release` does. A silo that sends the same bad update again and
        again thus stops getting its task back."""
        with self._cond:
            count = task.refusals[reason] = task.refusals.get(reason, 0) + 1
            if count >= limit and not task.status.finished:
                task.status = TaskStatus.REJECTED
                task.decline_reason = f"refused {count} times ({reason}): {message}"
                self._cond.notify_all()
                return True
            if task.status is TaskStatus.RECEIVING:
                self._reopen(task)
            return False

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
                self._retired[task.task_id] = (task.silo_id, task.round, task.status, task.kind)
                sent = self._sent.get(task.silo_id)
                if sent is not None and any(t is task for t in sent):
                    self._sent[task.silo_id] = deque(t for t in sent if t is not task)

    def _raise_for_retired(self, silo_id: str, task_id: str) -> None:
        retired = self._retired.get(task_id)
        if retired is None:
            return
        owner, round_, status, _kind = retired
        if owner != silo_id:
            raise PermissionDeniedError(f"task {task_id} belongs to another silo")
        if status is TaskStatus.DONE:
            raise DuplicateUpdateError(f"task {task_id} was already completed")
        if status is TaskStatus.REJECTED:
            raise StaleTaskError(
                f"task {task_id} of round {round_} is rejected (refused too often)"
            )
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
