"""The uploads that hold a slot, so the round can end those that stall or outlive it.

An admitted upload holds one of the few upload slots (``coordinator/upload_slots.py``) while
its weights stream in. A silo whose link stalls would keep that slot, and every silo queued
behind it, until the round's deadline; one whose round closes can no longer count. The round
ends both kinds through the call's cancel function, and the upload's error then says why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from coordinator.tasks import TaskRecord, TaskStatus

log = logging.getLogger(__name__)


@dataclass
class TrackedUpload:
    """One upload holding a slot. ``touch`` on every chunk; ``ended_for`` once it was ended."""

    task: TaskRecord
    cancel: Callable[[], object]
    last_progress: float = field(default_factory=time.monotonic)
    ended_for: str | None = None  # "stalled" or "expired"

    def touch(self) -> None:
        self.last_progress = time.monotonic()


class InFlightUploads:
    """Thread-safe registry of :class:`TrackedUpload`, keyed by task id."""

    def __init__(self, stall_timeout_s: float) -> None:
        if not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        self._lock = threading.Lock()
        self._uploads: dict[str, TrackedUpload] = {}

    @contextmanager
    def track(self, task: TaskRecord, cancel: Callable[[], object]) -> Iterator[TrackedUpload]:
        upload = TrackedUpload(task, cancel)
        with self._lock:
            self._uploads[task.task_id] = upload
        try:
            yield upload
        finally:
            with self._lock:
                self._uploads.pop(task.task_id, None)

    def end_stalled(self) -> None:
        """Ends the uploads that have sent nothing for longer than the stall timeout."""
        now = time.monotonic()
        self._end(
            lambda u: now - u.last_progress > self.stall_timeout_s,
            "stalled",
            lambda u: (
                f"sent nothing for {now - u.last_progress:.0f} s "
                f"(upload_stall_timeout_s={self.stall_timeout_s:g}); ending it to free its slot"
            ),
        )

    def end_expired(self, tasks: Iterable[TaskRecord]) -> None:
        """Ends the uploads of ``tasks`` that the round expired (not those that finished)."""
        ids = {t.task_id for t in tasks}
        self._end(
            lambda u: u.task.task_id in ids and u.task.status is TaskStatus.EXPIRED,
            "expired",
            lambda u: f"round {u.task.round} closed during it; ending it",
        )

    def _end(
        self,
        which: Callable[[TrackedUpload], bool],
        why: str,
        describe: Callable[[TrackedUpload], str],
    ) -> None:
        with self._lock:
            ended = [u for u in self._uploads.values() if u.ended_for is None and which(u)]
            for upload in ended:
                upload.ended_for = why
        for upload in ended:
            log.warning(
                "upload of task %s from %s: %s",
                upload.task.task_id,
                upload.task.silo_id,
                describe(upload),
            )
            upload.cancel()
