"""A secure-aggregation round: advertise keys, share keys, masked input, unmask.

Each stage goes through the one :class:`~coordinator.round_stages.StageRunner`, with its own
deadline (``secure_aggregation.stage_deadline_s`` for the key stages, the round's for the
masked inputs, which the silos train for). The protocol's state is a
:class:`gptfl.secagg.server_session.ServerSession`; the silos' answers to the key stages
reach it through :meth:`SecureRound.receive` (the update intake calls it), their masked inputs
through :class:`MaskedSumFold`, which the intake asks what to expect (one integer tensor in
the ring's wire type) and folds into the session's running sum modulo the ring.

The strategy never sees a single update: :meth:`MaskedSumFold.average` is the global model
plus the unmasked, dequantized sum of the survivors' weighted updates divided by their
weights, i.e. FedAvg's sample-weighted average of the silo models, to within the
quantization error. Below the threshold at any stage the round raises
:class:`gptfl.errors.BelowThresholdError`, and the job runner leaves the global model as it was.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

import torch

from coordinator.round_fold import RoundFold
from coordinator.round_plan import RoundPlan, RoundPlanner, RoundSetup, StageStatus
from coordinator.round_stages import Stage, StageResult, StageRunner
from coordinator.tasks import TaskRecord
from gptfl.errors import SecureAggregationError, ValidationError
from gptfl.fleet_messages import SecAggSubmission, UpdateHeader
from gptfl.job_spec import SecureAggregationSpec
from gptfl.secagg.authentication import PeerVerifier
from gptfl.secagg.layout import MASKED_TENSOR, UpdateLayout
from gptfl.secagg.messages import (
    KeyAdvertisement,
    RoundContext,
    SecAggSettings,
    SecAggTask,
    UnmaskReply,
    UnmaskRequest,
)
from gptfl.secagg.quantization import FixedPoint, sample_weights
from gptfl.secagg.ring import RingVector
from gptfl.secagg.server_session import ServerSession
from gptfl.task import TaskKind
from gptfl.weights import TensorSpec, WeightMap

log = logging.getLogger(__name__)


class MaskedSumFold(RoundFold):
    """Folds masked inputs into the session's sum; unmasks it once the round has its replies.

    Folds happen under the intake's fold lock; :meth:`unmask` and :meth:`average` are called
    by the job thread once the stages that feed them have ended.
    """

    def __init__(
        self,
        *,
        global_weights: Mapping[str, torch.Tensor],
        layout: UpdateLayout,
        session: ServerSession,
        quantizer: FixedPoint,
    ) -> None:
        self._global = global_weights
        self._layout = layout
        self._session = session
        self._quantizer = quantizer
        self._expected = (layout.masked_spec(quantizer.ring),)
        #: the masked-input stage's tasks: which silo each answers for
        self._silo_of_task: dict[str, str] = {}
        self._examples: dict[str, int] = {}
        self._average: WeightMap | None = None

    @property
    def expected(self) -> tuple[TensorSpec, ...]:
        return self._expected

    @property
    def integer_payload(self) -> bool:
        return True

    def expect_task(self, task: TaskRecord) -> None:
        """Notes that ``task`` carries its silo's masked input (before it is published)."""
        self._silo_of_task[task.task_id] = task.silo_id

    def check(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        silo = self._silo_of(header)
        self._session.check_masked(silo, self._vector(weights))
        advertised = self._session.advertised[silo].num_examples
        if header.num_examples != advertised:
            raise SecureAggregationError(
                f"the masked input of {silo} claims {header.num_examples} examples; its keys "
                f"advertised {advertised} (its weight in the sum)"
            )

    def fold(self, weights: Mapping[str, torch.Tensor], header: UpdateHeader) -> None:
        silo = self._silo_of(header)
        self._session.receive_masked(silo, self._vector(weights))
        self._examples[silo] = header.num_examples

    @property
    def count(self) -> int:
        return len(self._examples)

    @property
    def total_examples(self) -> int:
        return sum(self._examples.values())

    def unmask(self) -> None:
        """Removes the masks and computes the round's average (see the module docstring).

        Raises:
            BelowThresholdError: too few unmask replies or shares (the round fails).
        """
        total = self._session.finish()
        survivors = self._session.survivors
        weights = sample_weights(
            {silo: a.num_examples for silo, a in self._session.advertised.items()}
        )
        weight_sum = sum(weights[silo] for silo in survivors)
        update = self._quantizer.dequantize_sum(total, count=len(survivors))
        update /= weight_sum
        self._average = self._layout.add_to(self._global, update)

    def average(self) -> WeightMap:
        if self._average is None:
            raise SecureAggregationError("the round's sum has not been unmasked")
        return self._average

    def _silo_of(self, header: UpdateHeader) -> str:
        silo = self._silo_of_task.get(header.task_id)
        if silo is None:
            raise SecureAggregationError(
                f"task {header.task_id} is not a masked-input task of this round"
            )
        return silo

    def _vector(self, weights: Mapping[str, torch.Tensor]) -> RingVector:
        # The wire's signed integers hold the ring's bits; a view, not a copy (the intake's
        # buffer is reused, and the session copies the values into its sum).
        wire = weights[MASKED_TENSOR].numpy()
        return wire.view(self._quantizer.ring.dtype)


class SecureRound(RoundPlan):
    """One secure-aggregation round (see the module docstring)."""

    def __init__(
        self,
        setup: RoundSetup,
        *,
        job_id: str,
        settings: SecAggSettings,
        stage_deadline_s: float,
        verifier: PeerVerifier | None,
    ) -> None:
        self._setup = setup
        self._settings = settings
        self._stage_deadline_s = stage_deadline_s
        self.silos = _at_most(setup.silos, settings.max_silos, seed=f"{job_id}:{setup.number}")
        self.context = RoundContext(job_id, setup.number)
        layout = UpdateLayout.of(setup.global_model.manifest.specs)
        quantizer = settings.quantizer()
        self.session = ServerSession(
            context=self.context,
            settings=settings.protocol(),
            ring=quantizer.ring,
            length=layout.length,
            silos=self.silos,
            verifier=verifier,
        )
        self._fold = MaskedSumFold(
            global_weights=setup.global_model.weights,
            layout=layout,
            session=self.session,
            quantizer=quantizer,
        )
        super().__init__(self._fold, exchange=self)

    # ---- the silos' answers to the key stages (intake, under its fold lock) --------------

    def receive(self, task: TaskRecord, submission: SecAggSubmission) -> None:
        """Hands a key stage's answer to the session.

        Raises:
            ValidationError: the answer is for another kind of task.
            SecureAggregationError, PeerKeyError: the session refuses it.
        """
        if submission.kind is not task.kind:
            raise ValidationError(
                f"task {task.task_id} is a {task.kind.value} task, not {submission.kind.value}"
            )
        payload = submission.payload
        silo = task.silo_id
        if isinstance(payload, KeyAdvertisement):
            self.session.receive_advertisement(silo, payload)
        elif isinstance(payload, UnmaskReply):
            self.session.receive_unmask(silo, payload)
        else:
            self.session.receive_shares(silo, payload)

    # ---- the stages (job thread) ---------------------------------------------------------

    def gather(self, stages: StageRunner) -> StageResult:
        session, setup = self.session, self._setup
        self._report("advertise keys", self.silos)
        result = stages.run(
            self._key_stage("advertise keys", TaskKind.SECAGG_ADVERTISE, self.silos)
        )
        if result.stopped:
            return result
        advertisements = session.close_advertising()
        members = tuple(a.silo_id for a in advertisements)
        self._report("share keys", members)
        result = stages.run(
            self._key_stage(
                "share keys", TaskKind.SECAGG_SHARE, members, advertisements=advertisements
            )
        )
        if result.stopped:
            return result
        sharing = session.close_sharing()
        self._report("masked input", sharing)

        def masked_input_task(task: TaskRecord) -> None:
            self._fold.expect_task(task)
            task.secagg = SecAggTask(self._settings, envelopes=session.envelopes_for(task.silo_id))

        trained = stages.run(
            Stage("masked input", TaskKind.TRAIN, sharing, setup.deadline_s, masked_input_task)
        )
        if trained.stopped:
            return trained
        request = session.close_masking()
        self._report("unmask", request.survivors)
        result = stages.run(
            self._key_stage("unmask", TaskKind.SECAGG_UNMASK, request.survivors, unmask=request)
        )
        if result.stopped:
            return result
        self._fold.unmask()
        self._report("unmasked", request.survivors)
        log.info(
            "round %d: secure aggregation of %d silos (%d dropped after sharing keys)",
            setup.number,
            len(request.survivors),
            len(request.dropped),
        )
        return trained

    def _key_stage(
        self,
        name: str,
        kind: TaskKind,
        silos: tuple[str, ...],
        *,
        advertisements: tuple[KeyAdvertisement, ...] = (),
        unmask: UnmaskRequest | None = None,
    ) -> Stage:
        """A key stage whose every task relays the same thing."""
        task = SecAggTask(self._settings, advertisements=advertisements, unmask=unmask)

        def prepare(record: TaskRecord) -> None:
            record.secagg = task

        return Stage(name, kind, silos, self._stage_deadline_s, prepare)

    def _report(self, stage: str, silos: tuple[str, ...]) -> None:
        dropped = tuple(s for s in self.silos if s not in silos)
        self._setup.report(StageStatus(f"secure aggregation: {stage}", silos, dropped))


def _at_most(silos: tuple[str, ...], limit: int, *, seed: str) -> tuple[str, ...]:
    """``silos``, or ``limit`` of them drawn with a seeded generator when there are more."""
    if len(silos) <= limit:
        return silos
    return tuple(sorted(random.Random(seed).sample(list(silos), limit)))


def secure_round_planner(
    job_id: str, spec: SecureAggregationSpec, verifier: PeerVerifier | None
) -> RoundPlanner:
    """The planner of a job with secure aggregation: every round is a :class:`SecureRound`.

    The strategy's own fold is not used: the strategy sees only the unmasked average, so
    FedAvg, FedProx and the FedOpt family work unchanged; a strategy that needs each update
    (silo-level DP's per-update clipping) is refused with the job spec.
    """
    settings = spec.settings()

    def plan(setup: RoundSetup, fold: RoundFold) -> RoundPlan:
        del fold  # replaced by the masked sum
        return SecureRound(
            setup,
            job_id=job_id,
            settings=settings,
            stage_deadline_s=spec.stage_deadline_s,
            verifier=verifier,
        )

    return plan
