"""The Fleet gRPC service: a thin adapter from the wire to :class:`JobManager`.

The caller's silo id always comes from its certificate, never from a request field.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc

from coordinator.job_manager import JobManager
from coordinator.job_state import Phase
from coordinator.silo_registry import SiloRegistry
from gptfl import __version__, serde
from gptfl.errors import GptflError, StaleTaskError, ValidationError
from gptfl.fleet_messages import FleetPhase, PullReply, RegisterAck, UploadResult
from gptfl.identity import caller_identity, require_role
from gptfl.models.fingerprint import check_silo_models, local_fingerprints
from gptfl.proto.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from gptfl.rpc import maps_errors, maps_stream_errors
from gptfl.weights import Chunk

log = logging.getLogger(__name__)

MAX_WAIT_MS = 60_000

#: what silos are told of a job's phase (a pending job is about to pretrain)
_PHASES = {
    Phase.NO_JOB: FleetPhase.NO_JOB,
    Phase.PENDING: FleetPhase.PRETRAIN,
    Phase.PRETRAIN: FleetPhase.PRETRAIN,
    Phase.FEDERATING: FleetPhase.FEDERATING,
    Phase.FINISHED: FleetPhase.FINISHED,
    Phase.FAILED: FleetPhase.FAILED,
    Phase.STOPPED: FleetPhase.STOPPED,
}


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self,
        *,
        jobs: JobManager,
        registry: SiloRegistry,
        heartbeat_interval_s: float,
        insecure: bool,
    ) -> None:
        self._jobs = jobs
        self._registry = registry
        self._heartbeat_s = heartbeat_interval_s
        self._insecure = insecure
        # What each architecture name means here; a silo where a name means another model is
        # refused at registration. Computed once: the installed packages do not change.
        self._models = local_fingerprints()

    def _silo(self, context: grpc.ServicerContext, state: str | None = None) -> str:
        identity = caller_identity(context, insecure=self._insecure)
        require_role(identity, "silo")
        self._registry.touch(identity.common_name, state)
        return identity.common_name

    @maps_errors
    def Register(
        self, request: fleet_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.RegisterReply:
        identity = caller_identity(context, insecure=self._insecure)
        require_role(identity, "silo")
        self._registry.check_allowed(identity.common_name)
        registration = serde.registration_from_pb(request)
        try:
            check_silo_models(self._models, registration.models)
        except GptflError as exc:
            log.warning("silo %s refused: %s", identity.common_name, exc)
            raise
        self._registry.register(
            identity.common_name,
            agent_version=registration.agent_version,
            device=registration.device,
            num_train_examples=registration.num_train_examples,
            num_eval_examples=registration.num_eval_examples,
        )
        log.info(
            "silo %s registered (%s, %d training examples)",
            identity.common_name,
            registration.device or "?",
            registration.num_train_examples,
        )
        self._jobs.silo_registered(identity.common_name)
        return serde.register_ack_to_pb(
            RegisterAck(
                silo_id=identity.common_name,
                heartbeat_interval_s=self._heartbeat_s,
                coordinator_version=__version__,
            )
        )

    @maps_errors
    def Heartbeat(
        self, request: fleet_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.HeartbeatReply:
        self._silo(context, request.state or None)
        return fleet_pb2.HeartbeatReply()

    @maps_errors
    def PullTask(
        self, request: fleet_pb2.PullTaskRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.PullTaskReply:
        silo = self._silo(context)
        runner = self._jobs.current()
        if runner is None:
            return serde.pull_reply_to_pb(
                PullReply(phase=FleetPhase.NO_JOB, job_id="", task=None, retry_after_s=1.0)
            )
        wait_s = min(request.wait_ms, MAX_WAIT_MS) / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = max(0.0, min(wait_s, remaining - 1.0))  # answer before the caller gives up
        task = runner.pull_task(silo, wait_s) if not runner.state.phase.terminal else None
        self._registry.touch(silo)
        return serde.pull_reply_to_pb(
            PullReply(
                phase=_PHASES[runner.state.phase],
                job_id=runner.job_id,
                task=task.spec() if task is not None else None,
                retry_after_s=0.0,
            )
        )

    @maps_stream_errors
    def DownloadModel(
        self, request: fleet_pb2.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.WeightStreamPart | bytes]:
        silo = self._silo(context)
        manifest, chunks = self._jobs.active().intake.task_model(silo, request.task_id)
        yield from serde.weight_stream_to_wire(manifest, chunks)

    @maps_stream_errors
    def UploadUpdate(
        self, request_iterator: Iterator[serde.UploadPart], context: grpc.ServicerContext
    ) -> Iterator[fleet_pb2.UploadReply]:
        silo = self._silo(context)
        runner = self._jobs.active()
        first = next(request_iterator, None)
        if first is None or isinstance(first, Chunk) or first.WhichOneof("part") != "header":
            raise ValidationError("an upload must start with its header")
        header = serde.update_header_from_pb(first.header)
        # Waits for an upload slot; the round ends the call if it closes while the slot is held.
        with runner.intake.admit_update(silo, header, cancel=context.cancel) as receive:
            yield fleet_pb2.UploadReply(ready=True)
            try:
                receive(*serde.split_weight_stream(request_iterator, stream="an upload"))
            except grpc.RpcError:  # the call ended: the silo went away or the round closed
                raise StaleTaskError(
                    f"the upload of task {header.task_id} ended before it was complete"
                ) from None
        yield serde.upload_result_to_pb(UploadResult(accepted=True, message="update accepted"))

    @maps_errors
    def ReportEvaluation(
        self, request: fleet_pb2.EvaluationReport, context: grpc.ServicerContext
    ) -> fleet_pb2.Ack:
        silo = self._silo(context)
        self._jobs.active().intake.receive_evaluation(
            silo, serde.evaluation_report_from_pb(request)
        )
        return fleet_pb2.Ack()

    @maps_errors
    def SubmitSecAgg(
        self, request: fleet_pb2.SecAggSubmission, context: grpc.ServicerContext
    ) -> fleet_pb2.Ack:
        silo = self._silo(context)
        self._jobs.active().intake.receive_secagg(silo, serde.secagg_submission_from_pb(request))
        return fleet_pb2.Ack()

    @maps_errors
    def DeclineTask(
        self, request: fleet_pb2.DeclineTaskRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.Ack:
        silo = self._silo(context)
        self._jobs.active().intake.decline(silo, serde.decline_from_pb(request))
        return fleet_pb2.Ack()


def add_fleet_servicer(servicer: FleetServicer, server: grpc.Server) -> None:
    """Registers the Fleet service, its two weight streams with the copy-free chunk codec.

    The method table is the generated one (caught from ``add_FleetServicer_to_server``); only
    DownloadModel's response serializer and UploadUpdate's request deserializer are swapped
    for the :mod:`gptfl.serde` functions around :mod:`gptfl.chunk_wire`.
    """
    table = _generated_fleet_handlers(servicer)
    table["DownloadModel"] = table["DownloadModel"]._replace(
        response_serializer=serde.serialize_part
    )
    table["UploadUpdate"] = table["UploadUpdate"]._replace(
        request_deserializer=serde.deserialize_upload_part
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_FLEET, table),))
    server.add_registered_method_handlers(_FLEET, table)


_FLEET = "gptfl.v1.Fleet"


def _generated_fleet_handlers(servicer: FleetServicer) -> dict[str, Any]:
    class _Catch:
        table: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, _handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, name: str, table: dict[str, Any]) -> None:
            assert name == _FLEET
            self.table = dict(table)

    catch = _Catch()
    fleet_pb2_grpc.add_FleetServicer_to_server(servicer, catch)
    return catch.table
