"""The Admin gRPC service: submit, watch, stop, download. Callers need the admin role."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc

from coordinator.job_manager import JobManager
from coordinator.silo_registry import SiloRegistry
from gptfl import serde
from gptfl.errors import JobStateError, PermissionDeniedError
from gptfl.identity import caller_identity, require_role
from gptfl.pki import Identity
from gptfl.proto.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from gptfl.rpc import maps_errors, maps_stream_errors
from gptfl.weights import iter_chunks

log = logging.getLogger(__name__)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        *,
        jobs: JobManager,
        registry: SiloRegistry,
        admin_identities: tuple[str, ...],
        insecure: bool,
    ) -> None:
        self._jobs = jobs
        self._registry = registry
        self._admins = frozenset(admin_identities)
        self._insecure = insecure

    def _admin(self, context: grpc.ServicerContext) -> Identity:
        identity = caller_identity(context, insecure=self._insecure)
        require_role(identity, "admin")
        if self._admins and identity.common_name not in self._admins:
            raise PermissionDeniedError(
                f"{identity.common_name!r} is not in this coordinator's admin_identities"
            )
        return identity

    @maps_errors
    def SubmitJob(
        self, request: admin_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> admin_pb2.SubmitJobReply:
        admin = self._admin(context)
        job_id = self._jobs.submit(request.spec_yaml, submitted_by=admin.common_name)
        return admin_pb2.SubmitJobReply(job_id=job_id)

    @maps_errors
    def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.JobStatus:
        self._admin(context)
        view = self._jobs.status()
        reply = admin_pb2.JobStatus(
            job_id=view.job_id,
            phase=view.phase,
            round=view.round,
            total_rounds=view.total_rounds,
            message=view.message,
            silos_connected=len(self._registry.connected()),
            summary_json=json.dumps(view.summary) if view.summary is not None else "",
        )
        if view.state is not None:
            reply.stage = view.state.stage
            reply.stage_silos.extend(view.state.stage_silos)
            reply.stage_dropped.extend(view.state.stage_dropped)
            spent = view.state.silo_level_privacy
            if spent:
                reply.silo_level_epsilon = spent["epsilon"]
                reply.silo_level_delta = spent["delta"]
            for silo_id, silo in sorted(view.state.silos.items()):
                if silo.privacy_epsilon is not None or silo.privacy_flag:
                    reply.privacy.append(
                        admin_pb2.SiloPrivacy(
                            silo_id=silo_id,
                            epsilon=silo.privacy_epsilon or 0.0,
                            delta=silo.privacy_delta or 0.0,
                            accountant=silo.privacy_accountant,
                            flag=silo.privacy_flag,
                        )
                    )
                if silo.tasks_declined:
                    reply.declines.append(
                        admin_pb2.SiloDeclines(
                            silo_id=silo_id,
                            count=silo.tasks_declined,
                            last_kind=silo.last_decline_kind,
                            last_reason=silo.last_decline_reason,
                            last_round=silo.last_decline_round,
                        )
                    )
            for r in view.state.rounds:
                reply.rounds.append(
                    admin_pb2.RoundSummary(
                        round=r.round,
                        silos_selected=r.silos_selected,
                        updates_accepted=r.updates_accepted,
                        updates_rejected=r.updates_rejected,
                        seconds=r.seconds,
                        server_metrics=serde.metrics_to_pb(
                            _present(test_loss=r.test_loss, test_accuracy=r.test_accuracy)
                        ),
                        federated_metrics=serde.metrics_to_pb(
                            _present(loss=r.federated_loss, accuracy=r.federated_accuracy)
                        ),
                    )
                )
        return reply

    @maps_errors
    def ListSilos(
        self, request: admin_pb2.ListSilosRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListSilosReply:
        self._admin(context)
        return admin_pb2.ListSilosReply(
            silos=[
                admin_pb2.SiloInfo(
                    silo_id=s.silo_id,
                    connected=self._registry.is_connected(s),
                    last_seen_unix=s.last_seen_unix,
                    state=s.state,
                    rounds_participated=s.rounds_participated,
                    num_train_examples=s.num_train_examples,
                    device=s.device,
                )
                for s in self._registry.snapshot()
            ]
        )

    @maps_errors
    def StopJob(
        self, request: admin_pb2.StopJobRequest, context: grpc.ServicerContext
    ) -> admin_pb2.StopJobReply:
        admin = self._admin(context)
        log.info("admin %s asked to stop the job: %s", admin.common_name, request.reason)
        return admin_pb2.StopJobReply(phase=self._jobs.stop(request.reason))

    @maps_stream_errors
    def DownloadModel(
        self, request: admin_pb2.AdminDownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.WeightStreamPart]:
        self._admin(context)
        runner = self._jobs.current()
        model = runner.global_model if runner is not None else None
        if model is None:
            raise JobStateError("there is no global model yet")
        yield from serde.weight_stream_to_pb(
            model.manifest, iter_chunks(model.weights, model.manifest, crcs=model.chunk_crcs)
        )


def _present(**values: float | None) -> dict[str, float]:
    return {k: v for k, v in values.items() if v is not None}
