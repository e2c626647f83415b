"""Accepts, runs, stops and resumes jobs; the coordinator runs one job at a time.

Job folders live under ``state_dir/jobs/<job_id>/`` (``job.json`` with the spec, then the
checkpoints). ``state_dir/ACTIVE`` names the job that has not ended yet: a coordinator that
restarts (after a crash or a SIGTERM) resumes that job from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.checkpoint import Checkpoint, load_latest
from coordinator.evaluation import ServerEvaluator
from coordinator.initial_model import file_initial_model, random_initial_model
from coordinator.job_runner import InitialModel, JobRunner
from coordinator.job_state import ENDED_FILE, JobState, Phase
from coordinator.metrics import CoordinatorMetrics
from coordinator.pretrain_phase import SynthAccess, run_pretrain_phase
from coordinator.report import build_summary, export_job
from coordinator.round_plan import RoundPlanner, plain_round
from coordinator.secagg_round import secure_round_planner
from coordinator.silo_registry import SiloRegistry
from coordinator.tasks import ModelVersion, TaskBoard
from gptfl import atomic_io
from gptfl.errors import ConfigError, GptflError, JobStateError
from gptfl.job_spec import JobSpec, parse_job_spec
from gptfl.models import build_model
from gptfl.secagg.authentication import PeerVerifier
from gptfl.weights import WeightMap

log = logging.getLogger(__name__)

ACTIVE = "ACTIVE"


@dataclass(frozen=True)
class JobStatusView:
    job_id: str
    phase: str
    round: int
    total_rounds: int
    message: str
    state: JobState | None
    summary: dict[str, Any] | None


def default_initial_model(runner: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
    """Initial weights from the spec's file, or a seeded random initialisation."""
    if runner.spec.initial_model is not None:
        return file_initial_model(runner.spec, runner.spec.initial_model)
    return random_initial_model(runner.spec)


def initial_model_with_pretrain(synth: SynthAccess) -> InitialModel:
    """Like :func:`default_initial_model`, plus the GPT-FL pretrain phase for jobs with a
    ``pretrain`` section (through ``synth``)."""

    def initial_model(runner: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
        if runner.spec.pretrain is not None:
            return run_pretrain_phase(runner, synth)
        return default_initial_model(runner)

    return initial_model


class JobManager:
    def __init__(
        self,
        *,
        state_dir: Path,
        runs_dir: Path,
        registry: SiloRegistry,
        board: TaskBoard,
        metrics: CoordinatorMetrics,
        max_concurrent_uploads: int = 1,
        upload_stall_timeout_s: float = 60.0,
        checkpoints_to_keep: int = 3,
        initial_model: InitialModel | None = None,
        synth: SynthAccess | None = None,
        silo_ca: Path | None = None,
    ) -> None:
        """Args (beyond the shared state): ``initial_model`` overrides where every job's
        first model comes from (tests, benchmarks); by default it is the spec's file, the
        pretrain phase through ``synth`` (None: jobs with a ``pretrain`` section are refused),
        or a random initialisation. ``silo_ca`` is the CA the silos' certificates chain to
        (the fleet's mutual TLS); secure-aggregation jobs need it, and the coordinator checks
        the silos' signed keys against it (None: such jobs are refused)."""
        if initial_model is None:
            initial_model = (
                initial_model_with_pretrain(synth) if synth is not None else default_initial_model
            )
        self._synth = synth
        self._state_dir = state_dir
        self._runs_dir = runs_dir
        self._registry = registry
        self._board = board
        self._metrics = metrics
        self._uploads = max_concurrent_uploads
        self._stall_timeout_s = upload_stall_timeout_s
        self._keep = checkpoints_to_keep
        self._initial_model = initial_model
        self._silo_ca = silo_ca
        self._lock = threading.Lock()
        self._runner: JobRunner | None = None
        self._last: JobRunner | None = None
        atomic_io.ensure_writable_dir(state_dir, key="state_dir")
        atomic_io.ensure_writable_dir(runs_dir, key="runs_dir")  # written when a job ends

    # ---- admin operations ---------------------------------------------------------------

    def submit(self, spec_text: str, *, submitted_by: str) -> str:
        spec = parse_job_spec(spec_text, source="job spec")
        # Problems the spec can only show against this coordinator (an unknown architecture, a
        # validation set that is not there) fail the submission, not the job later.
        build_model(spec.model)
        self._check_quorum(spec)
        self._check_pretrain(spec)
        self._check_secure_aggregation(spec)
        evaluator = _evaluator_for(spec)
        ending = self._runner
        if ending is not None and ending.state.phase.terminal:
            ending.join(timeout=60)  # it is writing its final report; let it finish
        with self._lock:
            if self._runner is not None and self._runner.is_running:
                raise JobStateError(
                    f"job {self._runner.job_id} is still running; stop it first "
                    "(gptfl admin stop) or wait for it to end"
                )
            job_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            job_dir = self._state_dir / "jobs" / job_id
            if job_dir.exists():
                job_id = f"{job_id}-{int(time.time() * 1000) % 1000:03d}"
                job_dir = self._state_dir / "jobs" / job_id
            job_dir.mkdir(parents=True)
            atomic_io.write_json(
                job_dir / "job.json",
                {
                    "job_id": job_id,
                    "submitted_by": submitted_by,
                    "spec": spec.model_dump(mode="json"),
                },
            )
            atomic_io.write_text(self._state_dir / ACTIVE, job_id + "\n")
            self._start(job_id, spec, job_dir, checkpoint=None, evaluator=evaluator)
        log.info(
            "job %s submitted by %s: %d rounds of %s",
            job_id,
            submitted_by,
            spec.rounds,
            spec.strategy.name,
        )
        return job_id

    def _check_quorum(self, spec: JobSpec) -> None:
        # Only the allowed silos can ever connect, so no round could reach a larger quorum:
        # the job would wait wait_for_silos_s and then fail.
        allowed = sorted(self._registry.allowed)
        if allowed and spec.min_silos > len(allowed):
            raise ConfigError(
                f"min_silos is {spec.min_silos} but this coordinator's allowed_silos names "
                f"only {len(allowed)} ({', '.join(allowed)}); no round could reach the quorum"
            )

    def _check_pretrain(self, spec: JobSpec) -> None:
        if spec.pretrain is None:
            return
        if self._synth is None:
            raise ConfigError("this coordinator cannot run jobs with a pretrain section")
        self._synth.target(spec.pretrain)  # raises when no synth service is named anywhere

    def _check_secure_aggregation(self, spec: JobSpec) -> None:
        if spec.secagg_enabled() is not None and self._silo_ca is None:
            raise ConfigError(
                "secure_aggregation needs mutual TLS (silos sign their keys with their "
                "certificates); this coordinator runs without it"
            )

    def _round_planner(self, job_id: str, spec: JobSpec) -> RoundPlanner:
        secagg = spec.secagg_enabled()
        if secagg is None:
            return plain_round
        verifier = PeerVerifier.from_ca_file(self._silo_ca) if self._silo_ca else None
        return secure_round_planner(job_id, secagg, verifier)

    def stop(self, reason: str) -> str:
        with self._lock:
            runner = self._runner
        if runner is None or not runner.is_running:
            raise JobStateError("no job is running")
        runner.request_stop(reason or "stopped by admin")
        runner.join(timeout=30)
        return runner.state.phase.value

    def status(self) -> JobStatusView:
        runner = self.current()
        if runner is None:
            return JobStatusView("", Phase.NO_JOB.value, 0, 0, "no job submitted", None, None)
        state = runner.state
        summary = None
        if state.phase.terminal:
            model = runner.global_model
            summary = build_summary(state, model_digest=model.manifest.digest if model else None)
        return JobStatusView(
            state.job_id,
            state.phase.value,
            state.round,
            runner.spec.rounds,
            state.message,
            state,
            summary,
        )

    def active(self) -> JobRunner:
        with self._lock:
            runner = self._runner
        if runner is None:
            raise JobStateError("no job is running")
        return runner

    def silo_registered(self, silo_id: str) -> None:
        """A silo registers when its agent (re)connects, holding no task: the tasks it had
        pulled and not finished (its process died, its connection broke) are handed back so
        that it can pull them again, instead of the round waiting for its deadline."""
        handed_back = self._board.hand_back(silo_id)
        if handed_back:
            log.info(
                "silo %s reconnected without its %d open task(s); they can be pulled again",
                silo_id,
                handed_back,
            )

    def current(self) -> JobRunner | None:
        """The running job or, once it ended, the last one."""
        with self._lock:
            return self._runner or self._last

    # ---- lifecycle ----------------------------------------------------------------------

    def resume_if_any(self) -> str | None:
        """Resumes the job ``ACTIVE`` names, from its latest checkpoint."""
        pointer = self._state_dir / ACTIVE
        if not pointer.exists():
            return None
        job_id = pointer.read_text().strip()
        job_dir = self._state_dir / "jobs" / job_id
        try:
            record = json.loads((job_dir / "job.json").read_text())
            spec = JobSpec.model_validate(record["spec"])
        except (OSError, ValueError, KeyError) as exc:  # pydantic's errors are ValueErrors
            log.error("cannot resume job %s (%s); clearing it", job_id, exc)
            pointer.unlink()
            return None
        if (job_dir / ENDED_FILE).exists():
            try:
                self._finish_ended(job_id, job_dir)
            except (GptflError, OSError, ValueError, KeyError) as exc:
                log.error("job %s had ended, but its report cannot be rewritten: %s", job_id, exc)
            pointer.unlink(missing_ok=True)
            return None
        try:
            evaluator = _evaluator_for(spec)
            checkpoint = load_latest(job_dir / "checkpoints")
        except (GptflError, OSError, ValueError, KeyError) as exc:
            log.error(
                "cannot resume job %s: %s; it stays in %s (remove %s to start afresh)",
                job_id,
                exc,
                job_dir,
                pointer,
            )
            return None
        with self._lock:
            self._start(job_id, spec, job_dir, checkpoint=checkpoint, evaluator=evaluator)
        return job_id

    def _finish_ended(self, job_id: str, job_dir: Path) -> None:
        """The job had ended but the coordinator stopped before it could say so for good:
        its final state is known, so the report is written again, and nothing resumes."""
        final = JobState.from_json(json.loads((job_dir / ENDED_FILE).read_text()))
        checkpoint = load_latest(job_dir / "checkpoints")
        model = ModelVersion.of(checkpoint.weights) if checkpoint is not None else None
        export_job(final, model, self._runs_dir / job_id)
        log.info(
            "job %s had already ended (%s); its report was written again, nothing resumed",
            job_id,
            final.phase.value,
        )

    def shutdown(self, grace_s: float) -> None:
        """Stops the job thread without ending the job: a restart resumes it."""
        with self._lock:
            runner = self._runner
        if runner is not None and runner.is_running:
            runner.suspend()
            runner.join(timeout=grace_s)

    def _start(
        self,
        job_id: str,
        spec: JobSpec,
        job_dir: Path,
        *,
        checkpoint: Checkpoint | None,
        evaluator: ServerEvaluator | None,
    ) -> None:
        if checkpoint is not None:
            log.info("resuming job %s after round %d", job_id, checkpoint.round)
        runner = JobRunner(
            job_id=job_id,
            spec=spec,
            job_dir=job_dir,
            runs_dir=self._runs_dir,
            registry=self._registry,
            board=self._board,
            metrics=self._metrics,
            initial_model=self._initial_model,
            max_concurrent_uploads=self._uploads,
            upload_stall_timeout_s=self._stall_timeout_s,
            checkpoints_to_keep=self._keep,
            resume_from=checkpoint,
            evaluator=evaluator,
            on_end=self._ended,
            round_planner=self._round_planner(job_id, spec),
        )
        self._runner = runner
        self._last = None  # the ended job's global model: unreachable now, free it
        runner.start()

    def _ended(self, runner: JobRunner) -> None:
        (self._state_dir / ACTIVE).unlink(missing_ok=True)
        with self._lock:
            if self._runner is runner:
                self._last = runner
                self._runner = None


def _evaluator_for(spec: JobSpec) -> ServerEvaluator | None:
    if spec.evaluation.server is None:
        return None
    return ServerEvaluator(spec.evaluation.server, spec.model)
