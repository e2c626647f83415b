"""TaskBoard: publishing, long polls, and precise errors for every wrong task reference."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from coordinator.tasks import ModelVersion, TaskBoard, TaskRecord, TaskStatus
from gptfl.errors import (
    DuplicateUpdateError,
    PermissionDeniedError,
    StaleTaskError,
    UnknownTaskError,
)
from gptfl.models.spec import ModelSpec
from gptfl.task import LocalSettings, TaskKind

_WEIGHTS = {"w": torch.zeros(2, 2)}
_MODEL = ModelVersion.of(_WEIGHTS)
_SPEC = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)
_LOCAL = LocalSettings(
    epochs=1, batch_size=8, learning_rate=0.1, momentum=0, weight_decay=0, proximal_mu=0, seed=1
)


def _task(silo: str = "a", round_: int = 1, kind: TaskKind = TaskKind.TRAIN) -> TaskRecord:
    return TaskRecord(
        job_id="job",
        round=round_,
        kind=kind,
        silo_id=silo,
        model=_MODEL,
        model_spec=_SPEC,
        local=_LOCAL,
        deadline_unix=time.time() + 60,
    )


def _take(board: TaskBoard, task: TaskRecord) -> None:
    """The silo names ``task`` in a call (a download, an upload): it holds the task."""
    assert board.lookup(task.silo_id, task.task_id, None) is task


class _Poll:
    """A long poll in a thread, so the test can act while it waits."""

    def __init__(self, board: TaskBoard, silo: str, timeout_s: float) -> None:
        self.result: TaskRecord | None = None
        self.returned = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(board, silo, timeout_s))
        self._thread.start()

    def _run(self, board: TaskBoard, silo: str, timeout_s: float) -> None:
        self.result = board.pull(silo, timeout_s)
        self.returned.set()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the long poll did not return"


def test_a_waiting_poll_gets_a_task_published_later() -> None:
    board = TaskBoard()
    poll = _Poll(board, "a", timeout_s=30)
    assert not poll.returned.wait(0.1)  # nothing published yet: it waits
    task = _task("a")
    board.publish([_task("b"), task])
    poll.join(10)  # far less than its 30 s timeout: woken by the publish
    assert poll.result is task
    assert task.status is TaskStatus.DISPATCHED


def test_poll_times_out_with_none() -> None:
    board = TaskBoard()
    board.publish([_task("b")])
    assert board.pull("a", 0.05) is None


def test_each_task_is_handed_out_once_in_order() -> None:
    board = TaskBoard()
    first, second = _task("a", 1), _task("a", 1, TaskKind.EVALUATE)
    board.publish([first, second])
    assert board.pull("a", 0) is first
    _take(board, first)
    assert board.pull("a", 0) is second
    _take(board, second)
    assert board.pull("a", 0) is None


def test_a_pull_whose_reply_was_lost_gets_the_same_task_again() -> None:
    """gRPC retries a pull whose connection dropped; the task the lost reply carried is sent
    again (the same record, not a copy), then never once the silo has named it."""
    board = TaskBoard()
    first, second = _task("a", 1), _task("a", 1, TaskKind.EVALUATE)
    board.publish([first, second])
    assert board.pull("a", 0) is first
    assert board.pull("a", 0) is first  # the retried pull
    assert first.status is TaskStatus.DISPATCHED
    assert second.status is TaskStatus.PENDING  # not dispatched behind the silo's back
    _take(board, first)
    assert board.pull("a", 0) is second
    _take(board, second)
    assert board.pull("a", 0) is None


def test_a_task_dispatched_to_a_poll_nobody_reads_goes_to_the_retried_poll() -> None:
    """The coordinator's handler of a dropped call keeps waiting; when a task comes, it may
    take it for a caller that is gone, while the caller's retried poll waits beside it."""
    board = TaskBoard()
    orphan, retried = _Poll(board, "a", timeout_s=30), _Poll(board, "a", timeout_s=30)
    assert not retried.returned.wait(0.1)
    task = _task("a")
    board.publish([task])
    orphan.join(10)
    retried.join(10)
    assert orphan.result is task and retried.result is task


def test_a_task_the_silo_named_stays_with_it_even_when_its_report_was_refused() -> None:
    """A refused report (non-finite metrics) leaves the task dispatched; the silo is told why
    and must not be handed the same task again and again until the round's deadline."""
    board = TaskBoard()
    task = _task("a", kind=TaskKind.EVALUATE)
    board.publish([task])
    assert board.pull("a", 0) is task
    _take(board, task)  # the report's lookup, before its values were refused
    assert task.status is TaskStatus.DISPATCHED
    assert board.pull("a", 0) is None


def test_a_retired_task_is_not_kept_for_sending_again() -> None:
    """Retiring a round frees its tasks (and their model) even if the silo never pulled again."""
    board = TaskBoard()
    task = _task("a")
    board.publish([task])
    assert board.pull("a", 0) is task
    board.expire([task])
    board.retire([task])
    gone = weakref.ref(task)
    del task
    gc.collect()
    assert gone() is None
    assert board.pull("a", 0) is None


def test_tasks_no_longer_pending_are_skipped() -> None:
    board = TaskBoard()
    expired, fresh = _task("a", 1), _task("a", 2)
    board.publish([expired])
    assert board.expire([expired]) == 1
    board.publish([fresh])
    assert board.pull("a", 0) is fresh


def test_wake_all_ends_waiting_polls() -> None:
    board = TaskBoard()
    polls = [_Poll(board, silo, timeout_s=30) for silo in ("a", "b", "c")]
    time.sleep(0.05)
    board.wake_all()
    for poll in polls:
        poll.join(10)
        assert poll.result is None
    # a poll that starts afterwards waits normally again
    board.publish([task := _task("a")])
    assert board.pull("a", 1) is task


# ---- lookups ---------------------------------------------------------------------------------


@pytest.fixture()
def board_and_task() -> tuple[TaskBoard, TaskRecord]:
    board = TaskBoard()
    task = _task("a")
    board.publish([task])
    assert board.pull("a", 0) is task
    return board, task


def test_lookup_returns_the_open_task(board_and_task: tuple[TaskBoard, TaskRecord]) -> None:
    board, task = board_and_task
    assert board.lookup("a", task.task_id, TaskKind.TRAIN) is task


def test_lookup_unknown_id(board_and_task: tuple[TaskBoard, TaskRecord]) -> None:
    board, _ = board_and_task
    with pytest.raises(UnknownTaskError, match="no task 'nope'"):
        board.lookup("a", "nope", TaskKind.TRAIN)


def test_lookup_of_another_silos_task(board_and_task: tuple[TaskBoard, TaskRecord]) -> None:
    board, task = board_and_task
    with pytest.raises(PermissionDeniedError, match="another silo"):
        board.lookup("b", task.task_id, TaskKind.TRAIN)


def test_lookup_with_the_wrong_kind(board_and_task: tuple[TaskBoard, TaskRecord]) -> None:
    board, task = board_and_task
    with pytest.raises(StaleTaskError, match="is a train task"):
        board.lookup("a", task.task_id, TaskKind.EVALUATE)


@pytest.mark.parametrize("status", [TaskStatus.EXPIRED, TaskStatus.DECLINED])
def test_lookup_of_a_finished_task(
    board_and_task: tuple[TaskBoard, TaskRecord], status: TaskStatus
) -> None:
    board, task = board_and_task
    assert board.finish(task, status)
    with pytest.raises(StaleTaskError, match=f"round 1 is {status.value}"):
        board.lookup("a", task.task_id, TaskKind.TRAIN)


def test_lookup_of_a_done_task(board_and_task: tuple[TaskBoard, TaskRecord]) -> None:
    board, task = board_and_task
    assert board.finish(task, TaskStatus.DONE)
    with pytest.raises(DuplicateUpdateError, match="already completed"):
        board.lookup("a", task.task_id, TaskKind.TRAIN)


def test_finish_is_once_only(board_and_task: tuple[TaskBoard, TaskRecord]) -> None:
    board, task = board_and_task
    assert board.finish(task, TaskStatus.DECLINED, "no gpu")
    assert not board.finish(task, TaskStatus.DONE)
    assert task.status is TaskStatus.DECLINED
    assert task.decline_reason == "no gpu"
    assert board.expire([task]) == 0


def test_retired_tasks_still_give_precise_errors() -> None:
    board = TaskBoard()
    done, expired = _task("a"), _task("b")
    board.publish([done, expired])
    board.finish(done, TaskStatus.DONE)
    board.expire([done, expired])
    board.retire([done, expired])
    with pytest.raises(DuplicateUpdateError):
        board.lookup("a", done.task_id, TaskKind.TRAIN)
    with pytest.raises(StaleTaskError, match="round 1, which has closed"):
        board.lookup("b", expired.task_id, TaskKind.TRAIN)
    with pytest.raises(PermissionDeniedError):
        board.lookup("b", done.task_id, TaskKind.TRAIN)
    with pytest.raises(UnknownTaskError):
        board.lookup("a", "never-existed", TaskKind.TRAIN)


# ---- uploads -----------------------------------------------------------------------------------


def test_claim_refuses_a_concurrent_second_upload(
    board_and_task: tuple[TaskBoard, TaskRecord],
) -> None:
    board, task = board_and_task
    board.claim(task)
    assert task.status is TaskStatus.RECEIVING
    with pytest.raises(DuplicateUpdateError, match="in progress"):
        board.claim(task)
    board.release(task)  # the first upload failed: the task is open again
    assert task.status is TaskStatus.PENDING
    board.claim(task)
    board.finish(task, TaskStatus.DONE)
    with pytest.raises(StaleTaskError):
        board.claim(task)
    board.release(task)  # releasing a finished task changes nothing
    assert task.status is TaskStatus.DONE


def test_claim_from_many_threads_lets_exactly_one_through(
    board_and_task: tuple[TaskBoard, TaskRecord],
) -> None:
    board, task = board_and_task
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def upload() -> None:
        start.wait()
        try:
            board.claim(task)
            outcomes.append("claimed")
        except DuplicateUpdateError:
            outcomes.append("refused")

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(outcomes) == ["claimed"] + ["refused"] * 7


# ---- waiting for a round -----------------------------------------------------------------------


def test_wait_until_returns_once_every_task_is_finished() -> None:
    board = TaskBoard()
    tasks = [_task("a"), _task("b")]
    board.publish(tasks)
    stop = threading.Event()
    done = threading.Event()

    def waiter() -> None:
        board.wait_until(tasks, time.monotonic() + 30, stop)
        done.set()

    threading.Thread(target=waiter, daemon=True).start()
    board.finish(tasks[0], TaskStatus.DONE)
    assert not done.wait(0.1)  # one still open
    board.finish(tasks[1], TaskStatus.DECLINED)
    assert done.wait(10)


def test_wait_until_ends_at_the_deadline_or_on_stop() -> None:
    board = TaskBoard()
    tasks = [_task("a")]
    board.publish(tasks)
    board.wait_until(tasks, time.monotonic() + 0.05, threading.Event())
    assert tasks[0].status is TaskStatus.PENDING
    stop = threading.Event()
    done = threading.Event()

    def waiter() -> None:
        board.wait_until(tasks, time.monotonic() + 30, stop)
        done.set()

    threading.Thread(target=waiter, daemon=True).start()
    stop.set()
    board.notify()
    assert done.wait(10)


def test_a_restarted_silo_gets_its_open_task_again() -> None:
    """Its old process pulled the task and died; the round need not wait for its deadline."""
    board = TaskBoard()
    mine, other = _task("a"), _task("b")
    board.publish([mine, other])
    assert board.pull("a", 0) is mine
    assert board.pull("b", 0) is other
    _take(board, mine)  # the old process downloaded its model, then died
    assert board.pull("a", 0) is None  # handed out once
    assert board.hand_back("a") == 1
    assert board.pull("a", 0) is mine  # the new process pulls it again
    assert mine.status is TaskStatus.DISPATCHED
    assert other.status is TaskStatus.DISPATCHED  # another silo's task stays with it


def test_finished_tasks_are_not_handed_back() -> None:
    board = TaskBoard()
    task = _task("a")
    board.publish([task])
    board.pull("a", 0)
    board.finish(task, TaskStatus.DONE)
    assert board.hand_back("a") == 0
    assert board.pull("a", 0) is None


def test_a_failed_upload_can_be_sent_again_or_the_task_pulled_again() -> None:
    board = TaskBoard()
    task = _task("a")
    board.publish([task])
    board.pull("a", 0)
    board.claim(task)
    board.release(task)  # the upload failed
    assert board.lookup("a", task.task_id, None) is task  # the same update may come again
    assert board.pull("a", 0) is task  # or a silo that lost it runs the task again
    board.claim(task)
    board.release(task)
    board.claim(task)  # a retried upload, straight after the failure
    board.finish(task, TaskStatus.DONE)
    assert board.pull("a", 0) is None  # the re-queued entry of a finished task is skipped


def test_a_task_refused_too_often_for_one_reason_is_closed() -> None:
    board = TaskBoard()
    task = _task("a")
    board.publish([task])
    board.pull("a", 0)
    for _ in range(2):
        board.claim(task)
        assert not board.refuse(task, "non_finite", "NaN in w", limit=3)
        assert board.pull("a", 0) is task  # released: pulled (or uploaded) again
    assert not board.refuse(task, "excess_claim", "too many", limit=3)  # another reason
    board.claim(task)
    assert board.refuse(task, "non_finite", "NaN in w", limit=3)
    assert task.status is TaskStatus.REJECTED and task.status.finished
    assert task.decline_reason == "refused 3 times (non_finite): NaN in w"
    assert board.pull("a", 0) is None
    with pytest.raises(StaleTaskError, match="is rejected"):
        board.lookup("a", task.task_id, None)
    assert not board.refuse(task, "non_finite", "NaN in w", limit=3)  # already closed
    assert task.refusals == {"non_finite": 4, "excess_claim": 1}
    board.retire([task])
    with pytest.raises(StaleTaskError, match="is rejected"):
        board.lookup("a", task.task_id, None)
