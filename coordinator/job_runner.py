"""One federated job, round by round, in its own thread.

The runner owns the global model and the job thread. Each round it asks the round planner
for a plan (:mod:`coordinator.round_plan`), opens the plan's fold to the update intake
(:mod:`coordinator.update_intake`, which servicers call from gRPC threads), lets the plan
run its stages (:mod:`coordinator.round_stages`), hands the fold's average to the strategy,
then runs the evaluation stage, checkpoints and exports metrics. A new global model that is
not finite is never applied: the round is recorded as failed, the model and the strategy's
state stay as they were, and the job goes on while ``max_failed_rounds`` allows.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from coordinator.checkpoint import Checkpoint, CheckpointWriter
from coordinator.claims import RoundClaims, pin_counts
from coordinator.evaluation import ServerEvaluator
from coordinator.inflight_uploads import InFlightUploads
from coordinator.job_state import (
    ENDED_FILE,
    JobState,
    Phase,
    RoundRecord,
    finite_or_none,
    percent,
)
from coordinator.job_strategy import strategy_for_job
from coordinator.metrics import CoordinatorMetrics
from coordinator.report import export_job
from coordinator.round_fold import RoundFold
from coordinator.round_plan import (
    RoundPlanner,
    RoundProgress,
    RoundSetup,
    StageStatus,
    plain_round,
)
from coordinator.round_stages import Stage, StageResult, StageRunner
from coordinator.silo_registry import SiloRegistry
from coordinator.strategies import Strategy
from coordinator.tasks import ModelVersion, TaskBoard, TaskRecord
from coordinator.update_intake import UpdateIntake
from coordinator.update_norm import bound_for_round
from coordinator.upload_slots import UploadSlots
from gptfl import atomic_io
from gptfl.errors import BelowThresholdError, GptflError
from gptfl.job_spec import JobSpec
from gptfl.task import LocalSettings, TaskKind
from gptfl.weights import WeightMap

log = logging.getLogger(__name__)

InitialModel = Callable[["JobRunner"], tuple[WeightMap, dict[str, Any]]]


#: values checked per step for finiteness (bounds the boolean temporary)
_FINITE_BLOCK = 1 << 20


def _first_non_finite(weights: WeightMap) -> str | None:
    """The first floating-point tensor holding NaN or infinity, or None."""
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            continue
        values = tensor.reshape(-1)
        for start in range(0, values.numel(), _FINITE_BLOCK):
            if not bool(torch.isfinite(values[start : start + _FINITE_BLOCK]).all()):
                return name
    return None


class JobFailed(Exception):
    """The job cannot go on (quorum missed, initialisation failed); the message says why."""


class JobInterrupted(Exception):
    """The job was stopped (or the coordinator began shutting down) during a long phase."""


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
        round_planner: RoundPlanner = plain_round,
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
        in_flight = InFlightUploads(upload_stall_timeout_s)
        self._keep = checkpoints_to_keep
        self._plan_round = round_planner
        self._on_end = on_end
        self._strategy: Strategy = strategy_for_job(spec)
        self._evaluator = evaluator
        self._lock = threading.Lock()
        # Server-side evaluation runs beside the job thread, checkpoint writes on their own
        # low-priority thread, straight from the tensors (coordinator/checkpoint.py).
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"job-{job_id}")
        self._checkpoints = CheckpointWriter(
            job_dir / "checkpoints", keep=checkpoints_to_keep, name=f"job-{job_id}-checkpoint"
        )
        self._stop = threading.Event()
        self._stop_reason = ""
        self._suspended = False
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
        #: what silos send this job, on gRPC threads (servicers call it directly)
        self.intake = UpdateIntake(
            state=self.state,
            state_lock=self._lock,
            board=board,
            registry=registry,
            metrics=metrics,
            upload_slots=self._upload_slots,
            in_flight=in_flight,
            require_dp=spec.require_dp,
            max_task_rejections=spec.max_task_rejections,
        )
        self._stages = StageRunner(
            board=board,
            make_tasks=self._make_tasks,
            fold_lock=self.intake.fold_lock,
            in_flight=in_flight,
            stop=self._stop,
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

    # ---- the job thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._metrics.total_rounds.set(self.spec.rounds)
            with self._lock:
                epsilons = {
                    silo: summary.privacy_epsilon
                    for silo, summary in self.state.silos.items()
                    if summary.privacy_epsilon is not None
                }
            self._metrics.begin_job(
                current_round=self.state.round,
                silo_last_rounds=self._silo_last_rounds(),
                silo_epsilons=epsilons,
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
        settings = LocalSettings(
            **self.spec.local.model_dump(),
            # crc32, not hash(): str hashes differ per process, and a restarted coordinator
            # must hand out the same seeds.
            seed=zlib.crc32(f"{self.spec.seed}:{number}:{silo_id}".encode()) & 0x7FFFFFFF,
        )
        return self._strategy.configure_local(settings)

    def _make_tasks(
        self, kind: TaskKind, silos: Sequence[str], deadline_unix: float
    ) -> list[TaskRecord]:
        assert self._global is not None
        number = self.state.round
        return [
            TaskRecord(
                job_id=self.job_id,
                round=number,
                kind=kind,
                silo_id=silo,
                model=self._global,
                model_spec=self.spec.model,
                local=self._local_settings(number, silo),
                deadline_unix=deadline_unix,
                rounds=self.spec.rounds,
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
        records = self._registry.records(selected)
        with self._lock:
            claims = RoundClaims.of(
                pin_counts(self.state.silos, records),
                max_weight_fraction=self.spec.max_weight_fraction,
            )
            norm_bound = bound_for_round(self.spec.update_bounds, self.state.rounds)
        setup = RoundSetup(
            number=number,
            silos=tuple(selected),
            connected=len(connected),
            global_model=self._global,
            deadline_s=self.spec.round_deadline_s,
            claims=claims,
            report=self._report_stage,
        )
        plan = self._plan_round(setup, self._strategy.round_fold(setup))
        progress = RoundProgress(number, plan.fold, claims, norm_bound, exchange=plan.exchange)
        # The first upload's receive buffer, allocated (and its pages faulted in) while the
        # silos train rather than when their updates arrive.
        self._upload_slots.prepare(self._global.manifest.total_bytes)
        last_rounds = self._silo_last_rounds()
        with self._lock:
            self.state.round = number
            self.state.message = (
                f"round {number}: training on {len(selected)} silos{self._fallback_note()}"
            )
        self.intake.open_round(progress)
        self._metrics.current_round.set(number)
        for silo in selected:  # a silo that never reports shows as behind, not as missing
            self._metrics.silo_last_round.labels(silo=silo).set(last_rounds.get(silo, 0))
        try:
            try:
                gathered = plan.gather(self._stages)
            except BelowThresholdError as exc:  # secure aggregation lost too many silos
                raise JobFailed(f"round {number}: {exc}; the global model is unchanged") from exc
            self._upload_slots.drop_spares()  # the receive buffers: no use until next round
            if self._stop.is_set():
                return
            self._close_round(number, started, progress, gathered)
        finally:
            self.intake.close_round()

    def _report_stage(self, status: StageStatus) -> None:
        """A plan's stage, for the status: the message and the stage fields."""
        dropped = f", {len(status.dropped)} dropped" if status.dropped else ""
        with self._lock:
            self.state.stage = status.stage
            self.state.stage_silos = list(status.silos)
            self.state.stage_dropped = list(status.dropped)
            self.state.message = (
                f"round {self.state.round}: {status.stage}, {len(status.silos)} silos{dropped}"
            )
        log.info(
            "job %s: %s (%s)%s",
            self.job_id,
            self.state.message,
            ", ".join(status.silos),
            f"; dropped: {', '.join(status.dropped)}" if status.dropped else "",
        )

    def _close_round(
        self, number: int, started: float, progress: RoundProgress, gathered: StageResult
    ) -> None:
        """Applies the strategy to the round's average, evaluates, records, checkpoints."""
        assert self._global is not None
        fold = progress.fold
        accepted = fold.count
        selected = len(gathered.tasks)
        if accepted < self.spec.min_silos:
            declined = gathered.declines
            raise JobFailed(
                f"round {number}: {accepted} of {selected} updates arrived within "
                f"round_deadline_s={self.spec.round_deadline_s:g}; min_silos is "
                f"{self.spec.min_silos}"
                + (f" (declined: {'; '.join(declined)})" if declined else "")
            )
        with self._metrics.aggregation_seconds.time():
            new_weights, failure = self._aggregate(fold)
        if failure:
            self._fail_round(number, started, progress, selected, failure)
            return
        self._set_global(new_weights)
        spent = self._strategy.privacy_spent()
        if spent:
            with self._lock:
                self.state.silo_level_privacy = spent
            self._metrics.job_privacy_epsilon.set(spent["epsilon"])
        # Server-side evaluation runs while the silos evaluate: both sit on the round's path.
        server_eval = (
            self._background.submit(self._evaluator.evaluate, new_weights)
            if self._evaluator
            else None
        )
        fed_loss, fed_acc, fed_n = self._federated_evaluation(progress, gathered.done)
        test = server_eval.result() if server_eval is not None else None
        record = RoundRecord(
            round=number,
            silos_selected=selected,
            updates_accepted=accepted,
            updates_rejected=progress.rejected,
            examples=fold.total_examples,
            seconds=time.monotonic() - started,
            slowest_train_seconds=progress.slowest_train_s,
            train_loss=progress.train_loss,
            test_loss=test.loss if test else None,
            test_accuracy=test.accuracy if test else None,
            federated_loss=fed_loss,
            federated_accuracy=fed_acc,
            federated_examples=fed_n,
            silo_epsilon=dict(sorted(progress.epsilons.items())),
            update_norms=tuple(sorted(progress.norms)),
            updates_clipped=progress.clipped,
        )
        with self._lock:
            self.state.rounds.append(record)
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
            selected,
            percent(record.test_accuracy),
            percent(record.federated_accuracy),
        )

    def _aggregate(self, fold: RoundFold) -> tuple[WeightMap, str]:
        """The strategy's next global model from the fold's average, and "" or, when that
        model is not finite, why it is refused (the strategy's state is then put back)."""
        assert self._global is not None
        saved = {k: v.clone() for k, v in self._strategy.state_dict().items()}
        average = fold.average()
        new_weights = self._strategy.apply(self._global.weights, average)
        del average
        name = _first_non_finite(new_weights)
        if name is not None:
            self._strategy.load_state_dict(saved)
            return {}, f"the new global model holds non-finite values in tensor {name!r}"
        return new_weights, ""

    def _fail_round(
        self,
        number: int,
        started: float,
        progress: RoundProgress,
        selected: int,
        failure: str,
    ) -> None:
        """Records a round whose new model was refused; the job fails once more rounds have
        failed than ``max_failed_rounds`` allows."""
        fold = progress.fold
        record = RoundRecord(
            round=number,
            silos_selected=selected,
            updates_accepted=fold.count,
            updates_rejected=progress.rejected,
            examples=fold.total_examples,
            seconds=time.monotonic() - started,
            slowest_train_seconds=progress.slowest_train_s,
            train_loss=progress.train_loss,
            update_norms=tuple(sorted(progress.norms)),
            updates_clipped=progress.clipped,
            failed=failure,
        )
        with self._lock:
            self.state.rounds.append(record)
            failed = sum(1 for r in self.state.rounds if r.failed)
        self._metrics.rounds_failed.inc()
        log.error(
            "round %d/%d failed: %s; the global model stays as it was (%d of at most %d "
            "failed rounds)",
            number,
            self.spec.rounds,
            failure,
            failed,
            self.spec.max_failed_rounds,
        )
        self._checkpoint()  # a restart goes on after the failed round, not into it again
        if failed > self.spec.max_failed_rounds:
            raise JobFailed(
                f"round {number}: {failure}; {failed} rounds failed and max_failed_rounds is "
                f"{self.spec.max_failed_rounds}"
            )

    def _federated_evaluation(
        self, progress: RoundProgress, silos: list[str]
    ) -> tuple[float | None, float | None, int]:
        if not self.spec.evaluation.federated or not silos:
            return None, None, 0
        result = self._stages.run(
            Stage("evaluate", TaskKind.EVALUATE, tuple(silos), self.spec.round_deadline_s)
        )
        with self._lock:
            reports = [
                progress.evaluations.pop(t.task_id)
                for t in result.tasks
                if t.task_id in progress.evaluations
            ]
        n = sum(r.num_examples for r in reports)
        if n == 0:
            return None, None, 0
        loss = sum(r.metrics["loss"] * r.num_examples for r in reports) / n
        acc = sum(r.metrics["accuracy"] * r.num_examples for r in reports) / n
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

    def _checkpoint(self) -> None:
        """Writes a checkpoint of this moment in the background.

        The job state and the strategy's (small) state are copied now; the model's tensors are
        not (weights are never modified in place).
        The write overlaps the next round. ``LATEST`` moves only once a checkpoint is
        complete, and checkpoints are written one at a time, in order.
        """
        assert self._global is not None
        with self._lock:
            snapshot = JobState.from_json(self.state.to_json())
        self._checkpoints.submit(
            round_=snapshot.round,
            weights=self._global.weights,
            strategy_state={k: v.clone() for k, v in self._strategy.state_dict().items()},
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
