"""What silos send a running job, received on gRPC threads: updates, evaluations, declines.

The intake validates every message before it touches the round: the task must be the
caller's, open and of the right kind and round; the header's figures must be finite and its
example count within what the silo registered (:mod:`coordinator.claims`); the weights must
match what the round's fold expects (:class:`coordinator.round_fold.RoundFold`), arrive in
order with their checksums, be finite, lie within the job's norm bound from the global model
(measured while they stream in, :mod:`coordinator.update_norm`) and pass the fold's own
check. Only then does the fold take them. Any failure is counted by reason and leaves the
global model and the round's fold as they were; a task refused ``max_task_rejections`` times
for one reason is closed instead of reopened. The job thread (:mod:`coordinator.job_runner`)
opens and closes rounds on it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from coordinator.inflight_uploads import InFlightUploads, TrackedUpload
from coordinator.job_state import JobState, SiloSummary
from coordinator.metrics import CoordinatorMetrics
from coordinator.privacy_policy import check_requirement, ledger_flag, record_spend
from coordinator.round_fold import RoundFold
from coordinator.round_plan import RoundProgress
from coordinator.silo_registry import SiloRegistry
from coordinator.tasks import TaskBoard, TaskRecord, TaskStatus
from coordinator.update_norm import StreamingDistance, clip_in_place
from coordinator.upload_slots import UploadSlots
from gptfl.errors import (
    ChecksumError,
    GptflError,
    PrivacyPolicyError,
    ResourceLimitError,
    StaleTaskError,
    StalledUploadError,
    UpdateNormError,
    ValidationError,
)
from gptfl.fleet_messages import Decline, EvaluationReport, SecAggSubmission, UpdateHeader
from gptfl.job_spec import RequireDpSpec
from gptfl.task import TaskKind
from gptfl.weights import (
    Chunk,
    Manifest,
    PayloadBuffer,
    PayloadReceiver,
    WeightMap,
    check_manifest,
    iter_chunks,
)

log = logging.getLogger(__name__)

#: the longest decline reason kept (the rest of a longer one is cut)
MAX_DECLINE_REASON = 500

Receive = Callable[[Manifest, Iterator[Chunk]], None]

#: refusals of what a silo sent (as opposed to a round that closed, a call that went away):
#: counted per task and reason, and a task refused too often for one is closed
_REFUSALS = (ValidationError, ChecksumError, PrivacyPolicyError, ResourceLimitError)


def _nothing() -> None:
    """The cancel function of an upload that has no call to end (in-process callers)."""


def _ended_error(upload: TrackedUpload, stall_timeout_s: float) -> GptflError:
    """Why the coordinator ended an upload: what the silo and the metrics are told."""
    task = upload.task
    if upload.ended_for == "stalled":
        return StalledUploadError(
            f"the upload of task {task.task_id} sent nothing for more than "
            f"{stall_timeout_s:g} s and was ended"
        )
    return StaleTaskError(f"round {task.round} closed during the upload of task {task.task_id}")


class UpdateIntake:
    """Receives one job's uploads, evaluation reports and declines (thread-safe)."""

    def __init__(
        self,
        *,
        state: JobState,
        state_lock: threading.Lock,
        board: TaskBoard,
        registry: SiloRegistry,
        metrics: CoordinatorMetrics,
        upload_slots: UploadSlots,
        in_flight: InFlightUploads,
        require_dp: RequireDpSpec | None = None,
        max_task_rejections: int = 3,
    ) -> None:
        self._state = state
        self._require_dp = require_dp
        self._max_rejections = max_task_rejections
        self._lock = state_lock
        self._board = board
        self._registry = registry
        self._metrics = metrics
        self._upload_slots = upload_slots
        self._in_flight = in_flight
        #: taken while a task closes and its update folds, and while a stage expires its
        #: tasks: an upload overtaken by the deadline is never half counted
        self.fold_lock = threading.Lock()
        self._round: RoundProgress | None = None

    # ---- the job thread opens and closes rounds ----------------------------------------

    def open_round(self, progress: RoundProgress) -> None:
        with self._lock:
            self._round = progress

    def close_round(self) -> None:
        with self._lock:
            self._round = None

    # ---- downloads ---------------------------------------------------------------------

    def task_model(self, silo_id: str, task_id: str) -> tuple[Manifest, Iterator[Chunk]]:
        """The model a silo's open task runs on, as a manifest and its chunks."""
        task = self._board.lookup(silo_id, task_id, None)
        version = task.model
        sent = self._metrics.bytes_sent.labels(silo=silo_id)

        def counted() -> Iterator[Chunk]:
            for chunk in iter_chunks(version.weights, version.manifest, crcs=version.chunk_crcs):
                sent.inc(len(chunk.data))
                yield chunk

        return version.manifest, counted()

    # ---- uploads -----------------------------------------------------------------------

    def receive_update(
        self, silo_id: str, header: UpdateHeader, manifest: Manifest, chunks: Iterator[Chunk]
    ) -> None:
        """Admits, verifies and folds a silo's update in one call (see :meth:`admit_update`)."""
        with self.admit_update(silo_id, header) as receive:
            receive(manifest, chunks)

    @contextmanager
    def admit_update(
        self, silo_id: str, header: UpdateHeader, *, cancel: Callable[[], object] | None = None
    ) -> Iterator[Receive]:
        """Admits a silo's update: checks its header, claims its task, waits for an upload slot.

        The block then receives the weights by calling the yielded function once with their
        manifest and chunks: they are verified against the round's fold and folded in. The
        Fleet servicer tells the silo to send its weights between the two steps, so a silo
        that waits for a slot has nothing in flight. Every check happens before the fold is
        touched; any failure, in the block too, is counted by reason and leaves the global
        model and the fold as they were. ``cancel`` ends the upload's call: the round calls
        it if it closes while the upload holds a slot, so a stalled silo cannot keep the slot.
        """
        task: TaskRecord | None = None
        try:
            task = self._board.lookup(silo_id, header.task_id, TaskKind.TRAIN)
            progress = self._round
            if progress is None or task.round != progress.number or header.round != task.round:
                raise StaleTaskError(
                    f"task {task.task_id} is for round {task.round} but the upload says round "
                    f"{header.round}; the round in progress is "
                    f"{progress.number if progress else None}"
                )
            header.check()
            weight = progress.claims.update_weight(silo_id, header.num_examples)
            self._check_privacy(silo_id, header, task.round)
            self._board.claim(task)
            outcome: list[bool] = []  # whether the update was folded, once received
            tracked: TrackedUpload | None = None
            try:
                with self._upload_slots.slot(task.deadline_unix - time.time()) as lend:
                    if lend is None:
                        raise StaleTaskError(
                            f"round {task.round} reached its deadline before an upload slot "
                            f"freed up for task {task.task_id}"
                        )
                    slot_buffer = lend
                    claimed = task
                    with self._in_flight.track(task, cancel or _nothing) as tracked:
                        upload = tracked

                        def receive(manifest: Manifest, chunks: Iterator[Chunk]) -> None:
                            # the manifest is checked before its size decides a buffer's
                            fold = progress.fold
                            check_manifest(manifest, expected=fold.expected)
                            buffer = slot_buffer(manifest.total_bytes)
                            weights, norm = self._verified_update(
                                silo_id, claimed, fold, manifest, chunks, buffer, upload.touch
                            )
                            folded = dataclasses.replace(header, num_examples=weight)
                            clipped = self._bound(claimed, progress, weights, norm)
                            fold.check(weights, folded)
                            outcome.append(
                                self._fold(claimed, progress, weights, folded, norm, clipped)
                            )

                        yield receive
                if not outcome:
                    raise ValidationError(f"the upload of task {task.task_id} sent no weights")
            except BaseException as exc:
                ended = isinstance(exc, GptflError) and tracked is not None and tracked.ended_for
                if ended or not isinstance(exc, _REFUSALS):
                    self._board.release(task)  # a refusal is released (or closed) below
                if ended and tracked is not None:
                    raise _ended_error(tracked, self._in_flight.stall_timeout_s) from exc
                raise
            if not outcome[0]:
                raise StaleTaskError(
                    f"round {task.round} closed (deadline) before the upload of task "
                    f"{task.task_id} completed"
                )
            self._registry.record_participation(silo_id, weight)
            self._metrics.updates_accepted.inc()
            self._metrics.silo_last_round.labels(silo=silo_id).set(task.round)
            log.info(
                "round %d: accepted update from %s (%d examples, weight %d)",
                task.round,
                silo_id,
                header.num_examples,
                weight,
            )
        except GptflError as exc:
            self._count_rejection(silo_id, exc, task)
            raise

    def _check_privacy(self, silo_id: str, header: UpdateHeader, round_: int) -> None:
        """Flags a privacy ledger that went backwards (once, in the state and the log) and
        holds the update to the job's ``require_dp``."""
        with self._lock:
            previous = self._state.silos.get(silo_id)
            flag = ledger_flag(previous, header.privacy, round_)
            if flag and previous is not None and previous.privacy_flag != flag:
                previous.privacy_flag = flag
                log.warning("silo %s %s", silo_id, flag)
        check_requirement(self._require_dp, header.privacy, flag)

    def _verified_update(
        self,
        silo_id: str,
        task: TaskRecord,
        fold: RoundFold,
        manifest: Manifest,
        chunks: Iterator[Chunk],
        buffer: PayloadBuffer,
        on_chunk: Callable[[], None],
    ) -> tuple[WeightMap, float | None]:
        """Receives an update into ``buffer`` and verifies it (layout, sums, values); returns
        it with its distance from the task's model, measured as the chunks arrive (None for
        integer payloads, which are not model weights)."""
        receiver = PayloadReceiver(manifest, expected=fold.expected, buffer=buffer)
        distance = (
            None
            if fold.integer_payload
            else StreamingDistance(manifest, task.model.weights, buffer)
        )
        received = self._metrics.bytes_received.labels(silo=silo_id)
        position = 0
        for chunk in chunks:
            receiver.add(chunk)
            position += len(chunk.data)
            if distance is not None:
                distance.advance(position)
            received.inc(len(chunk.data))
            on_chunk()
        weights = receiver.finish(require_finite=not fold.integer_payload)
        return weights, distance.norm() if distance is not None else None

    def _bound(
        self,
        task: TaskRecord,
        progress: RoundProgress,
        weights: Mapping[str, torch.Tensor],
        norm: float | None,
    ) -> bool:
        """Holds the update to the round's norm bound: refuses it or clips it in place
        (returns True when clipped).

        Raises:
            UpdateNormError: the update lies beyond the bound and the action is ``reject``.
        """
        bound = progress.norm_bound
        if bound is None or norm is None or norm <= bound.limit:
            return False
        if bound.action == "reject":
            raise UpdateNormError(
                f"the update of task {task.task_id} lies {norm:.6g} from the global model "
                f"(L2), beyond the round's bound {bound.limit:.6g} ({bound.source})"
            )
        clip_in_place(weights, task.model.weights, bound.limit / norm)
        log.info(
            "round %d: clipped the update of %s from norm %.6g to %.6g (%s)",
            task.round,
            task.silo_id,
            norm,
            bound.limit,
            bound.source,
        )
        return True

    def _fold(
        self,
        task: TaskRecord,
        progress: RoundProgress,
        weights: WeightMap,
        header: UpdateHeader,
        norm: float | None,
        clipped: bool,
    ) -> bool:
        """Closes the task and folds its update (with weight ``header.num_examples``) and its
        training figures; False when the round expired the task first.

        All of it happens under the fold lock the stage takes to expire its tasks: an upload
        overtaken by the deadline is never half counted, and a round that closes as soon as
        its last task is done sees that task's loss and example count.
        """
        with self.fold_lock:
            if task.status.finished:
                return False
            progress.fold.check(weights, header)  # a refusal leaves the task open
            if not self._board.finish(task, TaskStatus.DONE):
                return False
            progress.fold.fold(weights, header)
            with self._lock:
                if "loss" in header.train_metrics:  # a DP silo sends no training figures
                    progress.loss_sum += header.train_metrics["loss"] * header.num_examples
                    progress.loss_examples += header.num_examples
                progress.slowest_train_s = max(progress.slowest_train_s, header.train_seconds)
                if norm is not None:
                    progress.norms.append(norm)
                progress.clipped += clipped
                summary = self._state.silos.setdefault(task.silo_id, SiloSummary())
                summary.rounds_participated += 1
                summary.examples += header.num_examples
                summary.last_round = task.round
                record_spend(summary, header.privacy)
                if header.privacy is not None:
                    progress.epsilons[task.silo_id] = header.privacy.epsilon
            if clipped:
                self._metrics.updates_clipped.inc()
            if header.privacy is not None:
                self._metrics.silo_privacy_epsilon.labels(silo=task.silo_id).set(
                    header.privacy.epsilon
                )
            return True

    # ---- evaluations and declines --------------------------------------------------------

    def receive_evaluation(self, silo_id: str, report: EvaluationReport) -> None:
        """Records a silo's evaluation of the round's new model once it passes the checks of
        :meth:`coordinator.claims.RoundClaims.check_evaluation` (examples within what the
        silo registered, accuracy in [0, 1], a finite loss >= 0).

        A report for an evaluation task that is already done is a retry whose first attempt
        arrived: it is answered as done and changes nothing.
        """
        if self._board.ended_as(silo_id, report.task_id) == (TaskKind.EVALUATE, TaskStatus.DONE):
            log.info("silo %s sent its evaluation of task %s again", silo_id, report.task_id)
            return
        task: TaskRecord | None = None
        try:
            task = self._board.lookup(silo_id, report.task_id, TaskKind.EVALUATE)
            progress = self._round
            if progress is None or progress.number != task.round:
                raise StaleTaskError(f"the evaluation of round {task.round} has closed")
            progress.claims.check_evaluation(silo_id, report)
            with self.fold_lock:
                if not self._board.finish(task, TaskStatus.DONE):
                    raise StaleTaskError(f"the evaluation of round {task.round} has closed")
                with self._lock:
                    progress.evaluations[task.task_id] = report
        except GptflError as exc:
            self._count_rejection(silo_id, exc, task)
            raise

    def receive_secagg(self, silo_id: str, submission: SecAggSubmission) -> None:
        """Hands a silo's answer to a secure-aggregation key stage to the round's protocol.

        The task must be the silo's, open, of the kind the answer is for, and of the round in
        progress; the protocol then checks the answer itself (a replay, a peer outside the
        round, shares it may not hold, ...). A refused answer is counted by reason and leaves
        the round as it was. A repeat of an answer that was taken is answered as done.
        """
        ended = self._board.ended_as(silo_id, submission.task_id)
        if ended == (submission.kind, TaskStatus.DONE):
            log.info("silo %s sent its answer to task %s again", silo_id, submission.task_id)
            return
        task: TaskRecord | None = None
        try:
            task = self._board.lookup(silo_id, submission.task_id, submission.kind)
            progress = self._round
            if progress is None or progress.exchange is None or task.round != progress.number:
                raise StaleTaskError(
                    f"task {task.task_id} is not part of a secure-aggregation round in progress"
                )
            with self.fold_lock:  # the stage expires its tasks under it
                if task.status.finished:
                    raise StaleTaskError(f"the stage of task {task.task_id} has closed")
                progress.exchange.receive(task, submission)
                self._board.finish(task, TaskStatus.DONE)  # False only after a decline
        except GptflError as exc:
            self._count_rejection(silo_id, exc, task)
            raise

    def decline(self, silo_id: str, decline: Decline) -> None:
        """A silo declines one of its open tasks: recorded with its reason (verbatim, cut to
        :data:`MAX_DECLINE_REASON` characters), counted by kind, and shown by
        ``gptfl admin status``. A decline of a task this silo already declined is a retry
        whose first attempt arrived: answered as done, counted once."""
        ended = self._board.ended_as(silo_id, decline.task_id)
        if ended is not None and ended[1] is TaskStatus.DECLINED:
            return
        task = self._board.lookup(silo_id, decline.task_id, None)
        reason = decline.reason[:MAX_DECLINE_REASON]
        if not self._board.finish(task, TaskStatus.DECLINED, reason):
            return
        self._metrics.tasks_declined.labels(kind=decline.kind).inc()
        with self._lock:
            summary = self._state.silos.setdefault(silo_id, SiloSummary())
            summary.tasks_declined += 1
            summary.last_decline_kind = decline.kind
            summary.last_decline_reason = reason
            summary.last_decline_round = task.round
        log.warning(
            "silo %s declined task %s (round %d, %s): %s",
            silo_id,
            decline.task_id,
            task.round,
            decline.kind,
            reason,
        )

    def _count_rejection(self, silo_id: str, exc: GptflError, task: TaskRecord | None) -> None:
        self._metrics.updates_rejected.labels(reason=exc.reason).inc()
        with self._lock:
            self._state.silos.setdefault(silo_id, SiloSummary()).updates_rejected += 1
            if self._round is not None:
                self._round.rejected += 1
        log.warning("rejected %s from %s: %s", exc.reason, silo_id, exc)
        if task is not None and isinstance(exc, _REFUSALS):
            limit = self._max_rejections
            if self._board.refuse(task, exc.reason, str(exc), limit=limit):
                log.warning(
                    "round %d: task %s of %s refused %d times (%s); it is closed, not reopened",
                    task.round,
                    task.task_id,
                    silo_id,
                    limit,
                    exc.reason,
                )
