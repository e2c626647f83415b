"""A silo's part in secure-aggregation rounds (docs/secure-aggregation.md).

The agent hands this client each task of a secure-aggregation round: the key stages
(:meth:`SecAggClient.answer`) and, after training, the update to mask
(:meth:`SecAggClient.masked_update`). The round's secrets live in one
:class:`gptfl.secagg.silo_session.SiloSession` per round, kept between the round's tasks
and dropped when the next round begins; they never leave the process except as the protocol
allows. The silo's keys are signed with its TLS key, so secure aggregation needs the silo's
TLS identity.

The silo enforces its clipping range: every value of its update (its model minus the
global model) is clipped to ``clip_range`` before it is quantized and masked, since the
coordinator can no longer bound a single update. With DP-SGD, the trainer's clipping and
noise come first: what is masked is the private model's update.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch

from gptfl.errors import (
    BelowThresholdError,
    PeerKeyError,
    PkiError,
    SecureAggregationError,
    TaskRefused,
)
from gptfl.fleet_messages import SecAggPayload, SecAggSubmission
from gptfl.pki import TlsFiles
from gptfl.secagg.authentication import PeerVerifier, SiloCredentials
from gptfl.secagg.layout import MASKED_TENSOR, UpdateLayout
from gptfl.secagg.messages import RoundContext, SecAggTask
from gptfl.secagg.silo_session import SiloSession
from gptfl.task import TaskKind, TaskSpec
from gptfl.weights import WeightMap, specs_of

log = logging.getLogger(__name__)

#: the kinds of task that are key stages (the masked input is a training task)
KEY_STAGES = (TaskKind.SECAGG_ADVERTISE, TaskKind.SECAGG_SHARE, TaskKind.SECAGG_UNMASK)

_REFUSED = (SecureAggregationError, PeerKeyError, BelowThresholdError)


@dataclasses.dataclass(frozen=True)
class _Identity:
    credentials: SiloCredentials
    verifier: PeerVerifier


class SecAggClient:
    """Runs the silo's side of the protocol for the agent (one task at a time)."""

    def __init__(self, identity: _Identity | None, *, missing: str = "") -> None:
        self._identity = identity
        self._missing = missing
        self._sessions: dict[tuple[str, int], tuple[str, SiloSession]] = {}

    @classmethod
    def from_tls(cls, files: TlsFiles | None) -> SecAggClient:
        """The client of a silo with these TLS files (None: an insecure silo, which refuses
        secure-aggregation tasks with a reason)."""
        if files is None:
            return cls(None, missing="this silo runs without TLS, and its keys are signed with it")
        try:
            identity = _Identity(
                SiloCredentials.from_files(files), PeerVerifier.from_ca_file(files.ca)
            )
        except PkiError as exc:
            return cls(None, missing=f"this silo's TLS identity cannot sign keys: {exc}")
        return cls(identity)

    def answer(self, task: TaskSpec, *, num_examples: int) -> SecAggSubmission:
        """The answer to a key-stage task.

        Args:
            task: an advertise, share or unmask task.
            num_examples: the silo's training examples (advertised as its weight).

        Raises:
            TaskRefused: what the task relays breaks the protocol, or this silo cannot take
                part (no TLS identity, no keys for the round after a restart); the reason
                says which.
        """
        secagg = self._secagg_of(task)
        try:
            payload: SecAggPayload
            if task.kind is TaskKind.SECAGG_ADVERTISE:
                session = self._start_session(task, secagg, num_examples)
                payload = session.advertisement or session.advertise()
            elif task.kind is TaskKind.SECAGG_SHARE:
                payload = tuple(self._session(task).share_keys(secagg.advertisements))
            elif task.kind is TaskKind.SECAGG_UNMASK:
                if secagg.unmask is None:
                    raise SecureAggregationError("the unmask task carries no request")
                payload = self._session(task).unmask(secagg.unmask)
            else:
                raise SecureAggregationError(f"a {task.kind.value} task is no key stage")
        except _REFUSED as exc:
            raise TaskRefused(str(exc), kind="secure_aggregation") from None
        return SecAggSubmission(task_id=task.task_id, payload=payload)

    def masked_update(
        self,
        task: TaskSpec,
        weights: Mapping[str, torch.Tensor],
        global_weights: Mapping[str, torch.Tensor],
    ) -> tuple[WeightMap, int]:
        """The trained model's update, clipped, quantized, weighted and masked.

        Returns:
            The upload (one integer tensor, :data:`MASKED_TENSOR`) and the sample count
            the silo advertised, which the upload's header must carry.

        Raises:
            TaskRefused: the shares relayed for the round break the protocol, or too few
                neighbours shared keys.
        """
        secagg = self._secagg_of(task)
        session = self._session(task)
        quantizer = secagg.settings.quantizer()
        layout = UpdateLayout.of(specs_of(global_weights))
        try:
            values = layout.flatten_update(weights, global_weights)
            quantized = quantizer.quantize(values, weight=session.weight)
            masked = session.mask(secagg.envelopes, quantized)
        except _REFUSED as exc:
            raise TaskRefused(str(exc), kind="secure_aggregation") from None
        wire = torch.from_numpy(quantizer.ring.to_wire(masked))
        return {MASKED_TENSOR: wire}, session.num_examples

    # ---- sessions ------------------------------------------------------------------------

    def _secagg_of(self, task: TaskSpec) -> SecAggTask:
        if task.secagg is None:
            raise TaskRefused(
                f"task {task.task_id} is a secure-aggregation task without its settings",
                kind="secure_aggregation",
            )
        if self._identity is None:
            raise TaskRefused(
                f"this silo cannot take part in secure aggregation: {self._missing}",
                kind="secure_aggregation",
            )
        return task.secagg

    def _start_session(self, task: TaskSpec, secagg: SecAggTask, num_examples: int) -> SiloSession:
        assert self._identity is not None
        key = (task.job_id, task.round)
        known = self._sessions.get(key)
        if known is not None and known[0] == task.task_id:
            return known[1]  # the same task sent again (a lost reply): the same keys
        # A new round: earlier rounds' secrets are of no more use.
        self._sessions.clear()
        session = SiloSession(
            credentials=self._identity.credentials,
            verifier=self._identity.verifier,
            context=RoundContext(task.job_id, task.round),
            settings=secagg.settings.protocol(),
            ring=secagg.settings.ring(),
            num_examples=num_examples,
        )
        self._sessions[key] = (task.task_id, session)
        log.info("round %d: secure aggregation keys made", task.round)
        return session

    def _session(self, task: TaskSpec) -> SiloSession:
        known = self._sessions.get((task.job_id, task.round))
        if known is None:
            raise SecureAggregationError(
                f"this silo holds no keys for round {task.round} of job {task.job_id} "
                "(it did not advertise any, or it restarted since)"
            )
        return known[1]
