"""One federated job, round by round, in its own thread.

The runner owns the global model. Servicers call into it from gRPC threads
(:meth:`JobRunner.pull_task`, :meth:`receive_update`, ...); it validates every incoming
message before it touches the aggregate, and folds accepted updates into a running sum as
they arrive. After each round it evaluates, checkpoints and exports metrics.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coordinator.aggregation import RunningSum
from coordinator.checkpoint import Checkpoint, CheckpointWriter
from coordinator.evaluation import ServerEvaluator
from coordinator.inflight_uploads import InFlightUploads, TrackedUpload
from coordinator.job_state import (
    ENDED_FILE,
    JobState,
    Phase,
    RoundRecord,
    SiloSummary,
    finite_or_none,
    percent,
)
from coordinator.metrics import CoordinatorMetrics
from coordinator.report import export_job
from coordinator.silo_registry import SiloRegistry
from coordinator.strategies import Strategy, build_strategy
from coordinator.tasks import ModelVersion, TaskBoard, TaskRecord, TaskStatus
from coordinator.upload_slots import UploadSlots
from gptfl import atomic_io
from gptfl.errors import GptflError, StaleTaskError, StalledUploadError, ValidationError
from gptfl.job_spec import JobSpec
from gptfl.task import LocalSettings, TaskKind
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

InitialModel = Callable[["JobRunner"], tuple[WeightMap, dict[str, Any]]]


class JobFailed(Exception):
    """The job cannot go on (quorum missed, initialisation failed); the message says why."""


class JobInterrupted(Exception):
    """The job was stopped (or the coordinator began shutting down) during a long phase."""


@dataclass(frozen=True)
class UpdateHeader:
    task_id: str
    round: int
    num_examples: int
    train_metrics: Mapping[str, float]
    train_seconds: float


@dataclass(frozen=True)
class EvaluationResult:
    task_id: str
    round: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass
class _RoundProgress:
    """Accepted updates of the round in progress."""

    number: int
    total: RunningSum
    loss_sum: float = 0.0
    slowest_train_s: float = 0.0
    rejected: int = 0


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


class JobRunner:
    """Runs one job from its first round (or a checkpoint) to the end."""

    def __init__(
        self,
        *,
        job_id: str,
        spec: JobSpec,
        job_dir: Path,
        runs_dir: Path,
        registry: SiloRegistry,
        board: TaskBoard,
        metrics: CoordinatorMetrics,
        initial_model: InitialModel,
        max_concurrent_uploads: int = 1,
        upload_stall_timeout_s: float = 60.0,
        checkpoints_to_keep: int = 3,
        resume_from: Checkpoint | None = None,
        evaluator: ServerEvaluator | None = None,
        on_end: Callable[[JobRunner], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.job_dir = job_dir
        self.runs_dir = runs_dir
        self._registry = registry
        self._board = board
        self._metrics = metrics
        self._initial_model = initial_model
        self._upload_slots = UploadSlots(max_concurrent_uploads)
        self._in_flight = InFlightUploads(upload_stall_timeout_s)
        self._on_end = on_end
        self._strategy: Strategy = build_strategy(spec.strategy)
        self._evaluator = evaluator
        self._lock = threading.Lock()
        self._fold_lock = threading.Lock()
        # Server-side evaluation runs beside the job thread, checkpoint writes on their own.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"job-{job_id}")
        self._checkpoints = CheckpointWriter(
            job_dir / "checkpoints", keep=checkpoints_to_keep, name=f"job-{job_id}-checkpoint"
        )
        self._stop = threading.Event()
        self._stop_reason = ""
        self._suspended = False
        self._round: _RoundProgress | None = None
        self._eval_results: dict[str, EvaluationResult] = {}
        self._global: ModelVersion | None = None
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id}", daemon=True)
        if resume_from is not None:
            self.state = resume_from.state
            self.state.phase = Phase.FEDERATING
            self.state.message = f"resumed after round {resume_from.round}"
            self._strategy.load_state_dict(resume_from.strategy_state)
            self._set_global(resume_from.weights)
        else:
            self.state = JobState(
                job_id=job_id, spec=spec.model_dump(mode="json"), created_unix=time.time()
            )

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def request_stop(self, reason: str) -> None:
        """Ends the job after the current step; the job ends as ``stopped``."""
        self._stop_reason = reason
        self._stop.set()
        self._board.notify()

    def suspend(self) -> None:
        """Leaves the job thread without ending the job (coordinator shutdown).

        The round in progress is abandoned; the last checkpoint stays the latest, so a
        restarted coordinator resumes from it and no update is counted twice.
        """
        self._suspended = True
        self.request_stop("coordinator shutting down")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    @property
    def global_model(self) -> ModelVersion | None:
        return self._global

    @property
    def stop_requested(self) -> bool:
        """True once the job was asked to stop or the coordinator is shutting down."""
        return self._stop.is_set()

    def report_pretrain(self, message: str) -> None:
        """Status of the pretrain phase (see :mod:`coordinator.pretrain_phase`), also logged:
        the status shows only the latest line, the log keeps them all."""
        self._set_phase(Phase.PRETRAIN, message)
        log.info("job %s: %s", self.job_id, message)

    # ---- called from gRPC threads -----------------------------------------------------

    def pull_task(self, silo_id: str, wait_s: float) -> TaskRecord | None:
        return self._board.pull(silo_id, wait_s)

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

    def receive_update(
        self, silo_id: str, header: UpdateHeader, manifest: Manifest, chunks: Iterator[Chunk]
    ) -> None:
        """Admits, verifies and folds a silo's update in one call (see :meth:`admit_update`)."""
        with self.admit_update(silo_id, header) as receive:
            receive(manifest, chunks)

    @contextmanager
    def admit_update(
        self, silo_id: str, header: UpdateHeader, *, cancel: Callable[[], object] | None = None
    ) -> Iterator[Callable[[Manifest, Iterator[Chunk]], None]]:
        """Admits a silo's update: checks its header, claims its task, waits for an upload slot.

        The block then receives the weights by calling the yielded function once with their
        manifest and chunks: they are verified and folded into the round's running sum. The
        Fleet servicer tells the silo to send its weights between the two steps, so a silo
        that waits for a slot has nothing in flight. Every check happens before the aggregate
        is touched; any failure, in the block too, is counted by reason and leaves the global
        model and the sum as they were. ``cancel`` ends the upload's call: the round calls it
        if it closes while the upload holds a slot, so a stalled silo cannot keep the slot.
        """
        try:
            task = self._board.lookup(silo_id, header.task_id, TaskKind.TRAIN)
            progress = self._round
            if progress is None or task.round != progress.number or header.round != task.round:
                raise StaleTaskError(
                    f"task {task.task_id} is for round {task.round} but the upload says round "
                    f"{header.round}; the round in progress is "
                    f"{progress.number if progress else None}"
                )
            if header.num_examples <= 0:
                raise ValidationError(f"num_examples must be positive, got {header.num_examples}")
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
                    with self._in_flight.track(task, cancel or _nothing) as tracked:
                        upload = tracked

                        def receive(manifest: Manifest, chunks: Iterator[Chunk]) -> None:
                            # the manifest is checked before its size decides a buffer's
                            check_manifest(manifest, expected=task.model.manifest.specs)
                            buffer = slot_buffer(manifest.total_bytes)
                            weights = self._verified_update(
                                silo_id, task, manifest, chunks, buffer, upload.touch
                            )
                            outcome.append(self._fold(task, progress, weights, header))

                        yield receive
                if not outcome:
                    raise ValidationError(f"the upload of task {task.task_id} sent no weights")
            except BaseException as exc:
                self._board.release(task)
                if isinstance(exc, GptflError) and tracked is not None and tracked.ended_for:
                    raise _ended_error(tracked, self._in_flight.stall_timeout_s) from exc
                raise
            if not outcome[0]:
                raise StaleTaskError(
                    f"round {task.round} closed (deadline) before the upload of task "
                    f"{task.task_id} completed"
                )
            self._registry.record_participation(silo_id, header.num_examples)
            self._metrics.updates_accepted.inc()
            self._metrics.silo_last_round.labels(silo=silo_id).set(task.round)
            log.info(
                "round %d: accepted update from %s (%d examples)",
                task.round,
                silo_id,
                header.num_examples,
            )
        except GptflError as exc:
            self._count_rejection(silo_id, exc)
            raise

    def _verified_update(
        self,
        silo_id: str,
        task: TaskRecord,
        manifest: Manifest,
        chunks: Iterator[Chunk],
        buffer: PayloadBuffer,
        on_chunk: Callable[[], None],
    ) -> WeightMap:
        """Receives an update into ``buffer`` and verifies it (names, shapes, sums, values)."""
        receiver = PayloadReceiver(manifest, expected=task.model.manifest.specs, buffer=buffer)
        received = self._metrics.bytes_received.labels(silo=silo_id)
        for chunk in chunks:
            receiver.add(chunk)
            received.inc(len(chunk.data))
            on_chunk()
        return receiver.finish()

    def _fold(
        self, task: TaskRecord, progress: _RoundProgress, weights: WeightMap, header: UpdateHeader
    ) -> bool:
        """Closes the task and folds its update and its training figures; False when the round
        expired the task first.

        All of it happens under the lock the round takes to expire its tasks: an upload
        overtaken by the deadline is never half counted, and a round that closes as soon as
        its last task is done sees that task's loss and example count.
        """
        with self._fold_lock:
            if not self._board.finish(task, TaskStatus.DONE):
                return False
            progress.total.add(weights, header.num_examples)
            with self._lock:
                progress.loss_sum += (
                    header.train_metrics.get("loss", math.nan) * header.num_examples
                )
                progress.slowest_train_s = max(progress.slowest_train_s, header.train_seconds)
                summary = self.state.silos.setdefault(task.silo_id, SiloSummary())
                summary.rounds_participated += 1
                summary.examples += header.num_examples
                summary.last_round = task.round
            return True

    def receive_evaluation(self, silo_id: str, result: EvaluationResult) -> None:
        try:
            task = self._board.lookup(silo_id, result.task_id, TaskKind.EVALUATE)
            for key in ("loss", "accuracy"):
                value = result.metrics.get(key)
                if value is None or not math.isfinite(value):
                    raise ValidationError(f"evaluation report lacks a finite {key!r}")
            if result.num_examples <= 0:
                raise ValidationError("evaluation report has no examples")
            with self._fold_lock:
                if not self._board.finish(task, TaskStatus.DONE):
                    raise StaleTaskError(f"the evaluation of round {task.round} has closed")
                with self._lock:
                    self._eval_results[task.task_id] = result
        except GptflError as exc:
            self._count_rejection(silo_id, exc)
            raise

    def decline(self, silo_id: str, task_id: str, reason: str) -> None:
        task = self._board.lookup(silo_id, task_id, None)
        self._board.finish(task, TaskStatus.DECLINED, reason[:500])
        log.warning(
            "silo %s declined task %s (round %d): %s", silo_id, task_id, task.round, reason[:500]
        )

    # ---- the job thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._metrics.total_rounds.set(self.spec.rounds)
            self._metrics.begin_job(
                current_round=self.state.round, silo_last_rounds=self._silo_last_rounds()
            )
            if self._global is None:
                self._initialise()
            self._set_phase(Phase.FEDERATING, self.state.message or "waiting for silos")
            for number in range(self.state.round + 1, self.spec.rounds + 1):
                if self._stop.is_set():
                    break
                self._run_round(number)
            if self._suspended or self._stop.is_set():
                self._leave_interrupted()
            else:
                self._end(
                    Phase.FINISHED, f"finished {self.spec.rounds} rounds{self._fallback_note()}"
                )
        except JobInterrupted:
            # Stopped before round 0 was checkpointed: a suspended job starts over on restart.
            self._leave_interrupted()
        except JobFailed as exc:
            log.error("job %s failed: %s", self.job_id, exc)
            self._end(Phase.FAILED, str(exc))
        except Exception as exc:  # the thread must always leave a final state behind
            log.exception("job %s crashed", self.job_id)
            self._end(Phase.FAILED, f"internal error: {type(exc).__name__}: {exc}")

    def _silo_last_rounds(self) -> dict[str, int]:
        with self._lock:
            return {silo: summary.last_round for silo, summary in self.state.silos.items()}

    def _leave_interrupted(self) -> None:
        """A stop: suspended (the coordinator is shutting down; a restart resumes the job) or
        stopped for good."""
        if self._suspended:
            self._leave_suspended()
        else:
            self._end(Phase.STOPPED, f"stopped: {self._stop_reason}")

    def _leave_suspended(self) -> None:
        self._checkpoints.close()
        self._background.shutdown(wait=True)
        self._board.wake_all()
        log.info(
            "job %s suspended after round %d; a restart resumes it",
            self.job_id,
            len(self.state.rounds),
        )

    def _initialise(self) -> None:
        try:
            weights, provenance = self._initial_model(self)
        except GptflError as exc:
            raise JobFailed(f"initial model: {exc}") from exc
        provenance = dict(provenance)
        if self._evaluator is not None:
            # Round 0: how good the starting point is (for a pretrained model, the
            # synthetic-only accuracy on the real validation set).
            started = time.monotonic()
            result = self._evaluator.evaluate(weights)
            provenance["evaluation"] = {
                "test_accuracy": finite_or_none(result.accuracy),
                "test_loss": finite_or_none(result.loss),
                "examples": result.num_examples,
            }
            log.info(
                "job %s: initial model (%s): test accuracy %s (%.2fs)",
                self.job_id,
                provenance.get("kind", "?"),
                percent(result.accuracy),
                time.monotonic() - started,
            )
        with self._lock:
            self.state.initialisation = provenance
        self._set_global(weights)
        self._checkpoint()  # round 0: a restart never repeats the initialisation

    def _fallback_note(self) -> str:
        fallback = self.state.initialisation.get("fallback")
        if not isinstance(fallback, dict):
            return ""
        return f" (from a random initialisation: {fallback.get('from', 'initial model')} failed)"

    def _set_global(self, weights: WeightMap) -> None:
        self._global = ModelVersion.of(weights)

    def _set_phase(self, phase: Phase, message: str) -> None:
        with self._lock:
            self.state.phase = phase
            self.state.message = message
        for p in Phase:
            self._metrics.job_phase.labels(phase=p.value).set(1 if p is phase else 0)

    def _wait_for_silos(self) -> list[str]:
        deadline = time.monotonic() + self.spec.wait_for_silos_s
        announced = -1
        while not self._stop.is_set():
            connected = self._registry.connected()
            if len(connected) >= self.spec.min_silos:
                return connected
            if len(connected) != announced:
                announced = len(connected)
                log.info(
                    "waiting for silos: %d connected, min_silos is %d",
                    announced,
                    self.spec.min_silos,
                )
                self.state.message = f"waiting for silos ({announced}/{self.spec.min_silos})"
            if time.monotonic() > deadline:
                raise JobFailed(
                    f"only {len(connected)} silos connected within wait_for_silos_s="
                    f"{self.spec.wait_for_silos_s:g}; min_silos is {self.spec.min_silos}"
                )
            self._stop.wait(0.2)
        return []

    def _select(self, number: int, connected: list[str]) -> list[str]:
        fraction = self.spec.silo_fraction()
        if fraction >= 1.0:
            return connected
        count = max(self.spec.min_silos, math.ceil(fraction * len(connected)))
        rng = random.Random(f"{self.spec.seed}:{number}")
        return sorted(rng.sample(connected, min(count, len(connected))))

    def _local_settings(self, number: int, silo_id: str) -> LocalSettings:
        local = self.spec.local
        overrides = self._strategy.local_overrides()
        return LocalSettings(
            epochs=local.epochs,
            batch_size=local.batch_size,
            learning_rate=local.learning_rate,
            momentum=local.momentum,
            weight_decay=local.weight_decay,
            proximal_mu=overrides.get("proximal_mu", 0.0),
            # crc32, not hash(): str hashes differ per process, and a restarted coordinator
            # must hand out the same seeds.
            seed=zlib.crc32(f"{self.spec.seed}:{number}:{silo_id}".encode()) & 0x7FFFFFFF,
        )

    def _make_tasks(self, number: int, kind: TaskKind, silos: list[str]) -> list[TaskRecord]:
        assert self._global is not None
        deadline = time.time() + self.spec.round_deadline_s
        return [
            TaskRecord(
                job_id=self.job_id,
                round=number,
                kind=kind,
                silo_id=silo,
                model=self._global,
                model_spec=self.spec.model,
                local=self._local_settings(number, silo),
                deadline_unix=deadline,
            )
            for silo in silos
        ]

    def _run_round(self, number: int) -> None:
        started = time.monotonic()
        connected = self._wait_for_silos()
        if self._stop.is_set():
            return
        selected = self._select(number, connected)
        assert self._global is not None
        tasks = self._make_tasks(number, TaskKind.TRAIN, selected)
        progress = _RoundProgress(number, RunningSum(self._global.weights))
        # The first upload's receive buffer, allocated (and its pages faulted in) while the
        # silos train rather than when their updates arrive.
        self._upload_slots.prepare(self._global.manifest.total_bytes)
        last_rounds = self._silo_last_rounds()
        with self._lock:
            self._round = progress
            self.state.round = number
            self.state.message = (
                f"round {number}: training on {len(selected)} silos{self._fallback_note()}"
            )
        self._metrics.current_round.set(number)
        for silo in selected:  # a silo that never reports shows as behind, not as missing
            self._metrics.silo_last_round.labels(silo=silo).set(last_rounds.get(silo, 0))
        self._board.publish(tasks)
        deadline = time.monotonic() + self.spec.round_deadline_s
        while True:  # wake every second to end uploads that stall
            self._board.wait_until(tasks, min(deadline, time.monotonic() + 1.0), self._stop)
            done = all(t.status.finished for t in tasks)
            if done or self._stop.is_set() or time.monotonic() >= deadline:
                break
            self._in_flight.end_stalled()
        with self._fold_lock:
            self._board.expire(tasks)
        self._board.retire(tasks)  # final now; the records below are this round's own copies
        self._in_flight.end_expired(tasks)
        self._upload_slots.drop_spares()  # the round's receive buffers: no use until the next
        if self._stop.is_set():
            return
        accepted = progress.total.count
        if accepted < self.spec.min_silos:
            declined = [f"{t.silo_id}: {t.decline_reason}" for t in tasks if t.decline_reason]
            raise JobFailed(
                f"round {number}: {accepted} of {len(tasks)} updates arrived within "
                f"round_deadline_s={self.spec.round_deadline_s:g}; min_silos is "
                f"{self.spec.min_silos}"
                + (f" (declined: {'; '.join(declined)})" if declined else "")
            )
        with self._metrics.aggregation_seconds.time():
            average = progress.total.mean(in_place=True)  # the round takes no more updates
            if self._strategy.state_dict():  # the last checkpoint reads what apply() updates
                self._checkpoints.flush()
            new_weights = self._strategy.apply(self._global.weights, average)
            del average
            self._set_global(new_weights)
        # Server-side evaluation runs while the silos evaluate: both sit on the round's path.
        server_eval = (
            self._background.submit(self._evaluator.evaluate, new_weights)
            if self._evaluator
            else None
        )
        fed_loss, fed_acc, fed_n = self._federated_evaluation(
            number, [t.silo_id for t in tasks if t.status is TaskStatus.DONE]
        )
        test = server_eval.result() if server_eval is not None else None
        record = RoundRecord(
            round=number,
            silos_selected=len(tasks),
            updates_accepted=accepted,
            updates_rejected=progress.rejected,
            examples=progress.total.total_examples,
            seconds=time.monotonic() - started,
            slowest_train_seconds=progress.slowest_train_s,
            train_loss=progress.loss_sum / progress.total.total_examples,
            test_loss=test.loss if test else None,
            test_accuracy=test.accuracy if test else None,
            federated_loss=fed_loss,
            federated_accuracy=fed_acc,
            federated_examples=fed_n,
        )
        with self._lock:
            self.state.rounds.append(record)
            self._round = None
        self._checkpoint()
        record = replace(record, seconds=time.monotonic() - started)
        with self._lock:
            self.state.rounds[-1] = record
        self._export_round_metrics(record)
        log.info(
            "round %d/%d done in %.2fs: %d/%d updates, test acc %s, federated acc %s",
            number,
            self.spec.rounds,
            record.seconds,
            accepted,
            len(tasks),
            percent(record.test_accuracy),
            percent(record.federated_accuracy),
        )

    def _federated_evaluation(
        self, number: int, silos: list[str]
    ) -> tuple[float | None, float | None, int]:
        if not self.spec.evaluation.federated or not silos:
            return None, None, 0
        tasks = self._make_tasks(number, TaskKind.EVALUATE, silos)
        self._board.publish(tasks)
        self._board.wait_until(tasks, time.monotonic() + self.spec.round_deadline_s, self._stop)
        with self._fold_lock:
            self._board.expire(tasks)
        self._board.retire(tasks)
        with self._lock:
            results = [
                self._eval_results.pop(t.task_id) for t in tasks if t.task_id in self._eval_results
            ]
        n = sum(r.num_examples for r in results)
        if n == 0:
            return None, None, 0
        loss = sum(r.metrics["loss"] * r.num_examples for r in results) / n
        acc = sum(r.metrics["accuracy"] * r.num_examples for r in results) / n
        return loss, acc, n

    def _export_round_metrics(self, record: RoundRecord) -> None:
        m = self._metrics
        m.rounds_completed.inc()
        m.round_duration.observe(record.seconds)
        for source, acc, loss in (
            ("server", record.test_accuracy, record.test_loss),
            ("federated", record.federated_accuracy, record.federated_loss),
        ):
            if acc is not None and loss is not None:
                m.model_accuracy.labels(source=source).set(acc)
                m.model_loss.labels(source=source).set(loss)

    def _count_rejection(self, silo_id: str, exc: GptflError) -> None:
        self._metrics.updates_rejected.labels(reason=exc.reason).inc()
        with self._lock:
            self.state.silos.setdefault(silo_id, SiloSummary()).updates_rejected += 1
            if self._round is not None:
                self._round.rejected += 1
        log.warning("rejected %s from %s: %s", exc.reason, silo_id, exc)

    def _checkpoint(self) -> None:
        """Writes a checkpoint of this moment in the background.

        The job state is copied now; the tensors are not (weights are never modified in
        place, and the round flushes the checkpoint before the strategy updates its state).
        The write overlaps the next round. ``LATEST`` moves only once a checkpoint is
        complete, and checkpoints are written one at a time, in order.
        """
        assert self._global is not None
        with self._lock:
            snapshot = JobState.from_json(self.state.to_json())
        self._checkpoints.submit(
            round_=snapshot.round,
            weights=self._global.weights,
            strategy_state=self._strategy.state_dict(),
            state=snapshot,
        )

    def _end(self, phase: Phase, message: str) -> None:
        try:
            self._checkpoints.close()
        except Exception:
            log.exception("job %s: writing the last checkpoint failed", self.job_id)
        self._background.shutdown(wait=True)
        self.state.finished_unix = time.time()
        with self._lock:
            final = JobState.from_json(self.state.to_json())
        final.phase, final.message = phase, message
        try:
            atomic_io.write_json(self.job_dir / ENDED_FILE, final.to_json())
            export_job(final, self._global, self.runs_dir / self.job_id)
        except Exception:
            log.exception("job %s: exporting the final model and report failed", self.job_id)
        # Only now does the status turn terminal: whoever sees it finds the report written.
        self._set_phase(phase, message)
        self._board.wake_all()
        log.info("job %s %s: %s", self.job_id, phase.value, message)
        if self._on_end is not None:
            self._on_end(self)
