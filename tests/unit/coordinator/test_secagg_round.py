"""Secure-aggregation rounds in a real JobRunner: four stages, the masked sum, bad input.

The silos are the test thread (tests/unit/coordinator/in_process_job.py), each running the
real silo side of the protocol (silo_agent.secagg_client) with an identity from a real PKI.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.job_runner import JobRunner
from coordinator.job_state import Phase
from coordinator.round_plan import RoundPlanner
from coordinator.secagg_round import secure_round_planner
from gptfl import pki
from gptfl.errors import (
    ExcessClaimError,
    GptflError,
    ManifestMismatchError,
    PeerKeyError,
    SecureAggregationError,
    StaleTaskError,
)
from gptfl.fleet_messages import SecAggSubmission
from gptfl.job_spec import JobSpec
from gptfl.secagg.authentication import PeerVerifier
from gptfl.secagg.layout import MASKED_TENSOR
from gptfl.secagg.messages import SecAggSettings
from gptfl.task import TaskKind
from gptfl.weights import WeightMap
from silo_agent.secagg_client import SecAggClient
from tests.unit.coordinator.in_process_job import WAIT_S, InProcessJob, tiny_spec

FIVE = ("a", "b", "c", "d", "e")
EXAMPLES = {"a": 40, "b": 10, "c": 25, "d": 30, "e": 20}
SECAGG = {"threshold": 3, "clip_range": 1.0, "bits": 32, "max_silos": 10, "stage_deadline_s": 2}


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("secagg-round-pki")
    pki.init_pki(folder, coordinator_hosts=["localhost"], silos=FIVE)
    return folder


@dataclasses.dataclass
class Federation:
    """A job with secure aggregation and its five silos, each with its own protocol client."""

    job: InProcessJob
    runner: JobRunner
    clients: dict[str, SecAggClient]

    def answer(self, silo: str, kind: TaskKind) -> None:
        task = self.job.pull(self.runner, silo, kind)
        submission = self.clients[silo].answer(task.spec(), num_examples=EXAMPLES[silo])
        self.runner.intake.receive_secagg(silo, submission)

    def train(self, silo: str, shift: float) -> WeightMap:
        """Pulls the masked-input task, 'trains' (shifts every float weight), uploads masked."""
        task = self.job.pull(self.runner, silo, TaskKind.TRAIN)
        base = self.job.download(self.runner, silo, task)
        trained = {k: v + shift if v.is_floating_point() else v for k, v in base.items()}
        masked, n = self.clients[silo].masked_update(task.spec(), trained, base)
        self.job.upload(self.runner, silo, task, masked, n)
        return base


def _start(
    job: InProcessJob, pki_dir: Path, *, secagg: dict[str, Any] | None = None, **spec: Any
) -> Federation:
    for silo in FIVE:
        job.registry.register(
            silo,
            agent_version="test",
            device="cpu",
            num_train_examples=EXAMPLES[silo],
            num_eval_examples=0,
        )
    job_spec = tiny_spec(
        min_silos=2,
        round_deadline_s=5,
        secure_aggregation={**SECAGG, **(secagg or {})},
        **spec,
    )
    runner = job.start(job_spec, round_planner=_planner(job_spec, pki_dir, len(job.runners) + 1))
    clients = {
        silo: SecAggClient.from_tls(pki.participant_files(pki_dir, "silo", silo)) for silo in FIVE
    }
    return Federation(job, runner, clients)


def _planner(spec: JobSpec, pki_dir: Path, number: int) -> RoundPlanner:
    secagg = spec.secagg_enabled()
    assert secagg is not None
    verifier = PeerVerifier.from_ca_file(pki_dir / pki.CA_DIR / pki.CA_CERT_FILE)
    return secure_round_planner(f"job-{number}", secagg, verifier)


def _key_stages(fed: Federation, silos: tuple[str, ...], kind: TaskKind) -> None:
    for silo in silos:
        fed.answer(silo, kind)


def _weighted_shift(shifts: dict[str, float]) -> float:
    total = sum(EXAMPLES[s] for s in shifts)
    return sum(EXAMPLES[s] * shift for s, shift in shifts.items()) / total


#: float32 rounding of the new global weights (of magnitude below 8)
_FLOAT32_SLACK = 1e-6


def _assert_moved_by(fed: Federation, base: WeightMap, shift: float, tolerance: float) -> None:
    """The job finished and every float weight moved by ``shift``, within ``tolerance``."""
    fed.runner.join(WAIT_S)
    assert fed.runner.state.phase is Phase.FINISHED, fed.runner.state.message
    final = fed.runner.global_model
    assert final is not None
    for name, tensor in final.weights.items():
        if tensor.is_floating_point():
            error = (tensor.double() - base[name].double() - shift).abs().max().item()
            assert error <= tolerance + _FLOAT32_SLACK, (name, error)


def test_five_silos_give_the_sample_weighted_average_within_the_quantization_error(
    job: InProcessJob, pki_dir: Path
) -> None:
    fed = _start(job, pki_dir)
    _key_stages(fed, FIVE, TaskKind.SECAGG_ADVERTISE)
    assert fed.runner.state.stage == "secure aggregation: advertise keys"
    _key_stages(fed, FIVE, TaskKind.SECAGG_SHARE)
    shifts = {"a": 0.1, "b": -0.3, "c": 0.05, "d": 0.2, "e": -0.1}
    base = {}
    for silo, shift in shifts.items():
        base = fed.train(silo, shift)
    _key_stages(fed, FIVE, TaskKind.SECAGG_UNMASK)
    settings = SecAggSettings(threshold=3, bits=32, clip_range=1.0, max_silos=10)
    bound = settings.quantizer().error_bound(5)  # of the sum; the average's is smaller
    _assert_moved_by(fed, base, _weighted_shift(shifts), bound)
    state = fed.runner.state
    assert state.stage == "secure aggregation: unmasked"
    assert state.stage_silos == list(FIVE) and state.stage_dropped == []
    assert state.rounds[0].updates_accepted == 5
    assert state.rounds[0].examples == sum(EXAMPLES.values())


def test_a_silo_that_drops_after_sharing_keys_is_left_out_of_an_exact_sum(
    job: InProcessJob, pki_dir: Path
) -> None:
    fed = _start(job, pki_dir)
    _key_stages(fed, FIVE, TaskKind.SECAGG_ADVERTISE)
    _key_stages(fed, FIVE, TaskKind.SECAGG_SHARE)
    shifts = {"a": 0.1, "b": -0.3, "c": 0.05, "e": -0.1}  # d never uploads
    base = {}
    for silo, shift in shifts.items():
        base = fed.train(silo, shift)
    job.pull(fed.runner, "d", TaskKind.TRAIN)  # it took its task and went away
    # The masked-input stage ends at the round's deadline; the survivors are asked to unmask
    # (d's mask key among what they reveal).
    survivors = ("a", "b", "c", "e")
    _key_stages(fed, survivors, TaskKind.SECAGG_UNMASK)
    assert fed.runner.pull_task("d", 0.2) is None  # d is asked nothing more
    _assert_moved_by(fed, base, _weighted_shift(shifts), 1e-6)
    assert fed.runner.state.stage_dropped == ["d"]


def test_below_the_threshold_the_round_fails_and_the_model_is_unchanged(
    job: InProcessJob, pki_dir: Path
) -> None:
    fed = _start(job, pki_dir)
    _key_stages(fed, FIVE, TaskKind.SECAGG_ADVERTISE)
    _key_stages(fed, FIVE, TaskKind.SECAGG_SHARE)
    start = {k: v.clone() for k, v in (fed.runner.global_model.weights.items())}  # type: ignore[union-attr]
    for silo in ("a", "b"):  # c, d and e die before uploading: 2 of threshold 3 remain
        fed.train(silo, 0.5)
    fed.runner.join(WAIT_S)
    state = fed.runner.state
    assert state.phase is Phase.FAILED
    assert "2 masked inputs arrived, threshold 3" in state.message, state.message
    assert "the global model is unchanged" in state.message
    final = fed.runner.global_model
    assert final is not None
    assert all(torch.equal(final.weights[k], v) for k, v in start.items())
    assert state.rounds == []


def test_bad_input_is_refused_counted_and_the_round_goes_on_with_the_honest(
    job: InProcessJob, pki_dir: Path
) -> None:
    fed = _start(job, pki_dir)
    runner, intake = fed.runner, fed.runner.intake

    def refused(
        silo: str, submission: SecAggSubmission, error: type[GptflError], match: str
    ) -> None:
        with pytest.raises(error, match=match):
            intake.receive_secagg(silo, submission)

    # advertise: keys of a previous round (a replay), keys signed by another silo
    tasks = {silo: job.pull(runner, silo, TaskKind.SECAGG_ADVERTISE) for silo in FIVE}
    answers = {
        silo: fed.clients[silo].answer(task.spec(), num_examples=EXAMPLES[silo])
        for silo, task in tasks.items()
    }
    keys_a = answers["a"].payload
    assert not isinstance(keys_a, tuple)
    replay = dataclasses.replace(answers["a"], payload=dataclasses.replace(keys_a, round=0))
    refused("a", replay, SecureAggregationError, "is for round 0, this is round 1")
    forged = dataclasses.replace(
        answers["a"], payload=dataclasses.replace(keys_a, mask_public=b"\x07" * 32)
    )
    refused("a", forged, PeerKeyError, "not signed by its certificate")
    before = job.rejected("secagg_protocol")
    for silo in FIVE:
        intake.receive_secagg(silo, answers[silo])
    intake.receive_secagg("a", answers["a"])  # a retried call whose first attempt arrived
    assert job.rejected("secagg_protocol") == before  # the repeat was no rejection
    assert job.rejected("secagg_auth") == 1

    # share: shares for an unknown peer, answering the wrong kind of task
    tasks = {silo: job.pull(runner, silo, TaskKind.SECAGG_SHARE) for silo in FIVE}
    answers = {
        silo: fed.clients[silo].answer(task.spec(), num_examples=EXAMPLES[silo])
        for silo, task in tasks.items()
    }
    envelopes = answers["b"].payload
    assert isinstance(envelopes, tuple)
    stranger = (*envelopes[:-1], dataclasses.replace(envelopes[-1], receiver="zed"))
    refused(
        "b",
        dataclasses.replace(answers["b"], payload=stranger),
        SecureAggregationError,
        "shares for zed, which is not in this round",
    )
    refused(
        "b",
        dataclasses.replace(answers["b"], payload=keys_a),
        StaleTaskError,
        "is a secagg_share task",
    )
    for silo in FIVE:
        intake.receive_secagg(silo, answers[silo])

    # masked input: the wrong length, the wrong dtype, the wrong sample count
    task = job.pull(runner, "c", TaskKind.TRAIN)
    base = job.download(runner, "c", task)
    trained = {k: v + 0.1 if v.is_floating_point() else v for k, v in base.items()}
    masked, n = fed.clients["c"].masked_update(task.spec(), trained, base)
    wire = masked[MASKED_TENSOR]
    with pytest.raises(ManifestMismatchError):
        job.upload(runner, "c", task, {MASKED_TENSOR: wire[:-1]}, n)
    with pytest.raises(ManifestMismatchError):
        job.upload(runner, "c", task, {MASKED_TENSOR: wire.to(torch.int64)}, n)
    # a claim above what the silo registered is refused by the claims check (issue 12) ...
    with pytest.raises(ExcessClaimError, match="num_examples 26 exceeds the 25"):
        job.upload(runner, "c", task, masked, n + 1)
    # ... and one below it but unlike the count its signed keys advertised by the round's fold
    with pytest.raises(SecureAggregationError, match="claims 24 examples; its keys advertised 25"):
        job.upload(runner, "c", task, masked, n - 1)
    assert job.rejected("manifest_mismatch") == 2
    job.upload(runner, "c", task, masked, n)  # the honest upload still goes through
    shifts = {"c": 0.1}
    for silo, shift in {"a": 0.2, "b": -0.2, "d": 0.0, "e": 0.3}.items():
        fed.train(silo, shift)
        shifts[silo] = shift

    # unmask: a silo asks the coordinator to take both kinds of share of one peer
    tasks = {silo: job.pull(runner, silo, TaskKind.SECAGG_UNMASK) for silo in FIVE}
    answers = {
        silo: fed.clients[silo].answer(task.spec(), num_examples=EXAMPLES[silo])
        for silo, task in tasks.items()
    }
    reply = answers["e"].payload
    assert not isinstance(reply, tuple) and hasattr(reply, "self_mask_shares")
    both = dataclasses.replace(
        reply,
        mask_key_shares={"a": reply.self_mask_shares["a"]},  # type: ignore[union-attr]
    )
    refused(
        "e",
        dataclasses.replace(answers["e"], payload=both),
        SecureAggregationError,
        "both kinds of share of a",
    )
    for silo in ("a", "b", "c", "d"):  # e's honest reply never comes: four are enough
        intake.receive_secagg(silo, answers[silo])
    _assert_moved_by(fed, base, _weighted_shift(shifts), 1e-6)
    assert job.rejected("secagg_protocol") == before + 3
    assert runner.state.rounds[0].updates_rejected >= 1
