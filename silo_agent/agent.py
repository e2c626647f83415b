"""The silo agent's main loop: connect, register, pull tasks, train or evaluate, report.

The agent only dials out. It keeps its data, model and the last global model in memory
between rounds, so a round costs one download (skipped when the model is already cached),
local training, and one upload. When the coordinator is away it reconnects with jittered
exponential backoff.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import grpc
import torch

from gptfl import __version__
from gptfl.errors import GptflError
from gptfl.identity import insecure_metadata
from gptfl.models import build_model
from gptfl.models.spec import ModelSpec
from gptfl.pki import Identity
from gptfl.proto.v1 import fleet_pb2
from gptfl.retry import Backoff
from gptfl.rpc import open_channel
from gptfl.task import TaskKind, TaskSpec
from gptfl.training import TrainSettings, evaluate, resolve_device, train_local
from gptfl.weights import WeightMap
from silo_agent.config import SiloConfig
from silo_agent.fleet_client import FleetClient
from silo_agent.local_data import LocalData, LocalSplits
from silo_agent.metrics import SiloMetrics
from silo_agent.upload_retry import upload_with_retries

log = logging.getLogger(__name__)

_TERMINAL = {
    fleet_pb2.JOB_PHASE_FINISHED,
    fleet_pb2.JOB_PHASE_FAILED,
    fleet_pb2.JOB_PHASE_STOPPED,
}
_FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class FatalAgentError(Exception):
    """The coordinator refuses this silo; retrying cannot help."""


class SiloAgent:
    def __init__(self, config: SiloConfig, *, metrics: SiloMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or SiloMetrics.create()
        self.device = resolve_device(config.device)
        self.data = LocalData(config.data)
        self._models: dict[ModelSpec, torch.nn.Module] = {}
        self._cached: tuple[str, WeightMap] | None = None
        self._state = "idle"
        self._counts_changed = False
        self._jobs_seen_running: set[str] = set()
        self.tasks_completed = 0

    # ---- main loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Runs until ``stop`` is set (0), a job ends with ``exit_after_job`` (0), or the
        coordinator refuses this silo (1)."""
        backoff = Backoff(
            self.config.reconnect.initial_backoff_s, self.config.reconnect.max_backoff_s
        )
        delays = backoff.delays()
        while not stop.is_set():
            channel = self._open()
            try:
                client = FleetClient(channel, metadata=self._metadata())
                reply = self._register(client)
                log.info("registered with %s as %s", self.config.coordinator, reply.silo_id)
                delays = backoff.delays()  # connected: the next outage starts from a short delay
                connected = threading.Event()
                beat = threading.Thread(
                    target=self._heartbeat,
                    args=(client, reply.heartbeat_interval_ms / 1000, stop, connected),
                    daemon=True,
                )
                beat.start()
                try:
                    if self._serve(client, stop):
                        return 0
                finally:
                    connected.set()  # ends this connection's heartbeat thread
                    beat.join()
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
            finally:
                channel.close()
        return 0

    def _register(self, client: FleetClient) -> fleet_pb2.RegisterReply:
        """Tells the coordinator who we are and how much data we hold (known once loaded)."""
        self._counts_changed = False  # the counts sent now are the current ones
        num_train, num_eval = self.data.counts()
        return client.register(
            agent_version=__version__,
            device=str(self.device),
            num_train=num_train,
            num_eval=num_eval,
        )

    def _splits(self, task: TaskSpec) -> LocalSplits:
        before = self.data.counts()
        splits = self.data.for_model(task.model_spec)
        if self.data.counts() != before:
            # Registered again once the task is over, so the coordinator's silo list shows
            # the counts: a Register means "this silo holds no task" (the coordinator hands
            # back any task it had given this silo), so never send one mid-task.
            self._counts_changed = True
        return splits

    def _open(self) -> grpc.Channel:
        tls = self.config.tls.files() if self.config.tls is not None else None
        return open_channel(self.config.coordinator, tls=tls, server_name=self.config.server_name)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.config.insecure and self.config.silo_id:
            return insecure_metadata(Identity(self.config.silo_id, "silo"))
        return ()

    def _heartbeat(
        self,
        client: FleetClient,
        interval_s: float,
        stop: threading.Event,
        connection_closed: threading.Event,
    ) -> None:
        while not connection_closed.wait(max(interval_s, 0.5)) and not stop.is_set():
            try:
                client.heartbeat(self._state)
            except grpc.RpcError:
                return  # the main loop notices and reconnects

    def _serve(self, client: FleetClient, stop: threading.Event) -> bool:
        """Pulls and runs tasks; True when the agent should exit (job over, exit_after_job)."""
        while not stop.is_set():
            if self._counts_changed:
                self._register(client)
            pulled = client.pull_task(self.config.poll_wait_s)
            if pulled.task is not None:
                self._jobs_seen_running.add(pulled.job_id)
                self._run_task(client, pulled.task)
                continue
            if pulled.phase in _TERMINAL and pulled.job_id in self._jobs_seen_running:
                if self.config.exit_after_job:
                    log.info("job %s has ended; exiting (exit_after_job)", pulled.job_id)
                    return True
            elif pulled.phase == fleet_pb2.JOB_PHASE_FEDERATING:
                self._jobs_seen_running.add(pulled.job_id)
            if pulled.retry_after_s:
                stop.wait(pulled.retry_after_s)
        return False

    # ---- tasks --------------------------------------------------------------------------

    def _run_task(self, client: FleetClient, task: TaskSpec) -> None:
        kind = task.kind.value
        try:
            if task.kind is TaskKind.TRAIN:
                self._train(client, task)
            else:
                self._evaluate(client, task)
            self.metrics.tasks.labels(kind=kind, outcome="done").inc()
            self.tasks_completed += 1
        except (GptflError, RuntimeError, ValueError, IndexError) as exc:
            # A local problem (data that cannot be read, labels the model cannot take): say
            # so and carry on. Only the kind of error leaves the silo; the details (which may
            # name local files) stay in the local log.
            log.exception("task %s (round %d) failed", task.task_id, task.round)
            self.metrics.tasks.labels(kind=kind, outcome="failed").inc()
            client.decline(
                task,
                f"the silo could not run this task ({type(exc).__name__}); "
                "details are in the silo's log",
            )
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

    def _model(self, spec: ModelSpec) -> torch.nn.Module:
        if spec not in self._models:
            self._models[spec] = build_model(spec).to(self.device)
        return self._models[spec]

    def _global_weights(
        self, client: FleetClient, task: TaskSpec, model: torch.nn.Module
    ) -> WeightMap:
        if self._cached is not None and self._cached[0] == task.model_digest:
            return self._cached[1]
        self._state = "downloading"
        weights = client.download_model(task, expected=model.state_dict())
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        self.metrics.bytes_received.inc(nbytes)
        self._cached = (task.model_digest, weights)
        return weights

    def _train(self, client: FleetClient, task: TaskSpec) -> None:
        splits = self._splits(task)
        model = self._model(task.model_spec)
        weights = self._global_weights(client, task, model)
        model.load_state_dict(weights)
        self._state = "training"
        local = task.local
        settings = TrainSettings(
            epochs=local.epochs,
            batch_size=local.batch_size,
            learning_rate=local.learning_rate,
            momentum=local.momentum,
            weight_decay=local.weight_decay,
            proximal_mu=local.proximal_mu,
            seed=local.seed,
        )
        global_params = (
            {k: v.to(self.device) for k, v in weights.items()} if local.proximal_mu else None
        )
        result = train_local(
            model, splits.train, settings, device=self.device, global_params=global_params
        )
        self.metrics.train_seconds.observe(result.seconds)
        self.metrics.examples.inc(result.num_examples)
        trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self._state = "uploading"
        self._upload(
            client,
            task,
            trained,
            result.num_examples,
            {"loss": result.loss, "accuracy": result.accuracy},
            result.seconds,
        )
        log.info(
            "round %d: trained on %d examples in %.2fs (loss %.4f, accuracy %.3f)",
            task.round,
            result.num_examples,
            result.seconds,
            result.loss,
            result.accuracy,
        )

    def _upload(
        self,
        client: FleetClient,
        task: TaskSpec,
        weights: Mapping[str, torch.Tensor],
        num_examples: int,
        metrics: Mapping[str, float],
        seconds: float,
    ) -> None:
        _, nbytes = upload_with_retries(
            lambda: client.upload_update(
                task, weights, num_examples=num_examples, metrics=metrics, train_seconds=seconds
            ),
            task_id=task.task_id,
            deadline_unix=task.deadline_unix,
        )
        self.metrics.bytes_sent.inc(nbytes)

    def _evaluate(self, client: FleetClient, task: TaskSpec) -> None:
        splits = self._splits(task)
        if len(splits.eval) == 0:
            client.decline(task, "this silo holds no evaluation data (eval_fraction is 0)")
            return
        model = self._model(task.model_spec)
        model.load_state_dict(self._global_weights(client, task, model))
        self._state = "evaluating"
        result = evaluate(model, splits.eval, device=self.device)
        client.report_evaluation(
            task,
            num_examples=result.num_examples,
            metrics={"loss": result.loss, "accuracy": result.accuracy},
        )
