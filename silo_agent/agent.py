"""The silo agent's main loop: connect, register, pull tasks, train or evaluate, report.

The agent only dials out. It keeps its data and the last global model in memory between
rounds, so a round costs one download (skipped when the model is already cached), local
training, and one upload. Each task gets a model of its own, built fresh (a trainer may wrap
it). How it trains is its :class:`~silo_agent.trainer.Trainer`'s business. When the
coordinator is away it reconnects with jittered exponential backoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import grpc
import torch

from gptfl import __version__
from gptfl.errors import GptflError, TaskRefused, ValidationError
from gptfl.fleet_messages import Decline, EvaluationReport, FleetPhase, RegisterAck
from gptfl.identity import insecure_metadata
from gptfl.models import build_model
from gptfl.models.fingerprint import local_fingerprints
from gptfl.pki import Identity
from gptfl.retry import Backoff
from gptfl.rpc import open_channel
from gptfl.task import TaskKind, TaskSpec
from gptfl.training import evaluate, resolve_device
from gptfl.weights import WeightMap
from silo_agent.config import SiloConfig
from silo_agent.fleet_client import FleetApi, FleetClient
from silo_agent.local_data import LocalData, LocalSplits
from silo_agent.metrics import SiloMetrics
from silo_agent.secagg_client import KEY_STAGES, SecAggClient
from silo_agent.trainer import SgdTrainer, Trainer, TrainingOutcome, TrainingRun
from silo_agent.upload_retry import upload_with_retries

log = logging.getLogger(__name__)

_FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class FatalAgentError(Exception):
    """The coordinator refuses this silo for a reason retrying cannot change (its models)."""


#: opens one connection to the coordinator: entered, it gives the client; left, it closes
Connector = Callable[[], AbstractContextManager[FleetApi]]


class SiloAgent:
    def __init__(
        self,
        config: SiloConfig,
        *,
        metrics: SiloMetrics | None = None,
        trainer: Trainer | None = None,
        connect: Connector | None = None,
    ) -> None:
        """Checks the config's data and device; connects nothing yet (see :meth:`run`).

        Args:
            config: the silo's config.
            metrics: where to count; a fresh registry by default.
            trainer: how to train; by default DP-SGD under the config's ``privacy``
                section (:class:`~silo_agent.dp_trainer.DpSgdTrainer`), plain local SGD
                without one.
            connect: opens a connection per session (by default a gRPC channel to
                ``config.coordinator`` with :class:`FleetClient`); tests pass a fake.

        Raises:
            ConfigError: the data is missing or unusable, the device is not available, the
                ``privacy`` section cannot be kept on this data, or the privacy ledger is
                damaged.
        """
        self.config = config
        self.metrics = metrics or SiloMetrics.create()
        self.device = resolve_device(config.device)
        self.data = LocalData(config.data)
        self.trainer: Trainer = trainer if trainer is not None else self._default_trainer()
        #: the silo's side of secure aggregation (its keys are signed with its TLS key)
        self.secagg = SecAggClient.from_tls(config.tls.files() if config.tls else None)
        self._connect: Connector = connect if connect is not None else self._grpc_connection
        # What each architecture name means here, sent at registration: a coordinator where a
        # name means another model refuses this silo instead of failing its uploads later.
        self._fingerprints = local_fingerprints()
        self._cached: tuple[str, WeightMap] | None = None
        self._state = "idle"
        self._jobs_seen_running: set[str] = set()
        self.tasks_completed = 0

    def _default_trainer(self) -> Trainer:
        privacy = self.config.privacy
        if privacy is None:
            return SgdTrainer()
        # Imported here: Opacus is slow to import and only a silo with DP needs it.
        from silo_agent.dp_trainer import DpSgdTrainer

        return DpSgdTrainer.start(
            privacy, state_dir=self.config.state_dir, num_examples=self.data.train_count()
        )

    # ---- main loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Runs until ``stop`` is set (0), a job ends with ``exit_after_job`` (0), or the
        coordinator refuses this silo (1).

        An unreachable coordinator, or a reply this agent cannot read, is tried again after a
        jittered, growing delay (``reconnect``)."""
        backoff = Backoff(
            self.config.reconnect.initial_backoff_s, self.config.reconnect.max_backoff_s
        )
        delays = backoff.delays()
        while not stop.is_set():
            try:
                with self._connect() as client:
                    ack = self._register(client)
                    log.info("registered with %s as %s", self.config.coordinator, ack.silo_id)
                    delays = backoff.delays()  # connected: the next outage starts short
                    connected = threading.Event()
                    beat = threading.Thread(
                        target=self._heartbeat,
                        args=(client, ack.heartbeat_interval_s, stop, connected),
                        daemon=True,
                    )
                    beat.start()
                    try:
                        if self._serve(client, stop):
                            return 0
                    finally:
                        connected.set()  # ends this connection's heartbeat thread
                        beat.join()
            except FatalAgentError as exc:
                log.error("the coordinator refused this silo: %s", exc)
                return 1
            except grpc.RpcError as exc:
                code = exc.code()
                if stop.is_set():
                    break  # stopping: the failed call is no reason to retry or to warn
                if code in _FATAL:
                    log.error("the coordinator refused this silo: %s", exc.details())
                    return 1
                delay = next(delays)
                log.warning(
                    "coordinator %s unreachable (%s: %s); retrying in %.1fs",
                    self.config.coordinator,
                    code.name,
                    exc.details(),
                    delay,
                )
                stop.wait(delay)
            except ValidationError as exc:
                # A reply this agent cannot read (a task or job phase of a newer coordinator):
                # it reconnects later instead of ending; the tasks it held go back.
                delay = next(delays)
                log.error(
                    "the coordinator sent a reply this silo cannot read (%s); retrying in %.1fs",
                    exc,
                    delay,
                )
                stop.wait(delay)
        return 0

    @contextlib.contextmanager
    def _grpc_connection(self) -> Iterator[FleetApi]:
        """The default connection: a channel to the coordinator, closed on the way out."""
        tls = self.config.tls.files() if self.config.tls is not None else None
        channel = open_channel(
            self.config.coordinator, tls=tls, server_name=self.config.server_name
        )
        try:
            yield FleetClient(channel, metadata=self._metadata())
        finally:
            channel.close()

    def _register(self, client: FleetApi) -> RegisterAck:
        """Tells the coordinator who we are, how much data we hold (counted at start: an
        update may not claim more than its silo registered) and which model architectures we
        resolve.

        Raises:
            FatalAgentError: the coordinator refused this silo's models (FAILED_PRECONDITION:
                an architecture differs in provider, version or layout); retrying cannot help.
        """
        num_train, num_eval = self.data.registered_counts
        try:
            return client.register(
                agent_version=__version__,
                device=str(self.device),
                num_train=num_train,
                num_eval=num_eval,
                models=self._fingerprints,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise FatalAgentError(exc.details()) from None
            raise

    def _splits(self, task: TaskSpec) -> LocalSplits:
        # The counts were registered at start (LocalData counts without reading an image),
        # so loading the data for a task never needs a second Register, which would mean
        # "this silo holds no task" to the coordinator.
        return self.data.for_model(task.model_spec)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.config.insecure and self.config.silo_id:
            return insecure_metadata(Identity(self.config.silo_id, "silo"))
        return ()

    def _heartbeat(
        self,
        client: FleetApi,
        interval_s: float,
        stop: threading.Event,
        connection_closed: threading.Event,
    ) -> None:
        while not connection_closed.wait(max(interval_s, 0.5)) and not stop.is_set():
            try:
                client.heartbeat(self._state)
            except grpc.RpcError as exc:
                # gRPC has already retried; a silo that trains through an outage keeps beating
                # (the main loop reconnects if the coordinator is really gone).
                log.debug("heartbeat failed (%s); trying again next interval", exc.code())

    def _serve(self, client: FleetApi, stop: threading.Event) -> bool:
        """Pulls and runs tasks; True when the agent should exit (job over, exit_after_job)."""
        while not stop.is_set():
            pulled = client.pull_task(self.config.poll_wait_s)
            if pulled.task is not None:
                self._jobs_seen_running.add(pulled.job_id)
                self._run_task(client, pulled.task)
                continue
            if pulled.phase.terminal and pulled.job_id in self._jobs_seen_running:
                if self.config.exit_after_job:
                    log.info("job %s has ended; exiting (exit_after_job)", pulled.job_id)
                    return True
            elif pulled.phase is FleetPhase.FEDERATING:
                self._jobs_seen_running.add(pulled.job_id)
            if pulled.retry_after_s:
                stop.wait(pulled.retry_after_s)
        return False

    # ---- tasks --------------------------------------------------------------------------

    def _run_task(self, client: FleetApi, task: TaskSpec) -> None:
        kind = task.kind.value
        try:
            if task.kind is TaskKind.TRAIN:
                self._train(client, task)
            elif task.kind in KEY_STAGES:
                self._secagg_stage(client, task)
            else:
                self._evaluate(client, task)
            self.metrics.tasks.labels(kind=kind, outcome="done").inc()
            self.tasks_completed += 1
        except TaskRefused as exc:
            # The silo will not run this task (its privacy budget, data it lacks): the reason
            # is meant for the coordinator's admin and goes there verbatim.
            log.warning("declined task %s (round %d): %s", task.task_id, task.round, exc)
            self.metrics.tasks.labels(kind=kind, outcome="declined").inc()
            client.decline(Decline(task_id=task.task_id, reason=str(exc), kind=exc.kind))
        except (GptflError, RuntimeError, ValueError, IndexError) as exc:
            # A local problem (data that cannot be read, labels the model cannot take): say
            # so and carry on. Only the kind of error leaves the silo; the details (which may
            # name local files) stay in the local log.
            log.exception("task %s (round %d) failed", task.task_id, task.round)
            self.metrics.tasks.labels(kind=kind, outcome="failed").inc()
            reason = (
                f"the silo could not run this task ({type(exc).__name__}); "
                "details are in the silo's log"
            )
            client.decline(Decline(task_id=task.task_id, reason=reason, kind="failed"))
        except grpc.RpcError as exc:
            if exc.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                log.warning("task %s was not accepted: %s", task.task_id, exc.details())
                self.metrics.tasks.labels(kind=kind, outcome="rejected").inc()
                return
            raise
        finally:
            self._state = "idle"

    def _fresh_model(self, task: TaskSpec) -> torch.nn.Module:
        """A model of the task's architecture for this task alone (a trainer may wrap it)."""
        return build_model(task.model_spec).to(self.device)

    def _global_weights(
        self, client: FleetApi, task: TaskSpec, model: torch.nn.Module
    ) -> WeightMap:
        if self._cached is not None and self._cached[0] == task.model_digest:
            return self._cached[1]
        self._state = "downloading"
        weights = client.download_model(task, expected=model.state_dict())
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        self.metrics.bytes_received.inc(nbytes)
        self._cached = (task.model_digest, weights)
        return weights

    def _train(self, client: FleetApi, task: TaskSpec) -> None:
        splits = self._splits(task)
        self.trainer.check(task, num_examples=len(splits.train))  # before any download
        model = self._fresh_model(task)
        weights = self._global_weights(client, task, model)
        model.load_state_dict(weights)
        self._state = "training"
        outcome = self.trainer.train(
            TrainingRun(
                task=task,
                model=model,
                global_weights=weights,
                data=splits.train,
                device=self.device,
            )
        )
        self.metrics.train_seconds.observe(outcome.seconds)
        self.metrics.examples.inc(outcome.num_examples)
        if task.secagg is not None:
            self._state = "masking"
            masked, advertised = self.secagg.masked_update(task, outcome.weights, weights)
            outcome = dataclasses.replace(outcome, weights=masked, num_examples=advertised)
        self._state = "uploading"
        self._upload(client, task, outcome)
        figures = outcome.metrics
        log.info(
            "round %d: trained on %d examples in %.2fs (%s)",
            task.round,
            outcome.num_examples,
            outcome.seconds,
            ", ".join(f"{key} {value:.4g}" for key, value in sorted(figures.items()))
            or "no training figures reported",
        )

    def _upload(self, client: FleetApi, task: TaskSpec, outcome: TrainingOutcome) -> None:
        _, nbytes = upload_with_retries(
            lambda: client.upload_update(
                task,
                outcome.weights,
                num_examples=outcome.num_examples,
                metrics=outcome.metrics,
                train_seconds=outcome.seconds,
                privacy=outcome.privacy,
            ),
            task_id=task.task_id,
            deadline_unix=task.deadline_unix,
        )
        self.metrics.bytes_sent.inc(nbytes)

    def _secagg_stage(self, client: FleetApi, task: TaskSpec) -> None:
        """Answers a key stage of a secure-aggregation round (:mod:`silo_agent.secagg_client`)."""
        num_examples = len(self._splits(task).train)
        client.submit_secagg(self.secagg.answer(task, num_examples=num_examples))

    def _evaluate(self, client: FleetApi, task: TaskSpec) -> None:
        splits = self._splits(task)
        if len(splits.eval) == 0:
            raise TaskRefused(
                "this silo holds no evaluation data (eval_fraction is 0)", kind="no_data"
            )
        model = self._fresh_model(task)
        model.load_state_dict(self._global_weights(client, task, model))
        self._state = "evaluating"
        result = evaluate(model, splits.eval, device=self.device)
        client.report_evaluation(
            EvaluationReport(
                task_id=task.task_id,
                round=task.round,
                num_examples=result.num_examples,
                metrics={"loss": result.loss, "accuracy": result.accuracy},
            )
        )
