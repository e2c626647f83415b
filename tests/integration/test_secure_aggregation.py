"""Secure aggregation over real mutual TLS: a coordinator and five silo agents.

The coordinator is the real server (port 0, mTLS); each silo is a real SiloAgent with its
real fleet client over its own mTLS channel, in a thread of this process, training the
digits on its part of a Dirichlet split. A silo "dies" at a chosen point of the protocol:
its connection is wrapped so that, once the call named completes, the agent is stopped and
sends nothing more (as if its process were killed there).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from coordinator.config import CoordinatorConfig
from coordinator.initial_model import random_initial_model
from coordinator.server import Coordinator, start_coordinator
from gptfl.admin_client import AdminClient, StatusView
from gptfl.cli.admin_cmd import print_status
from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.job_spec import JobSpec
from gptfl.pki import init_pki, participant_files
from gptfl.rpc import open_channel
from gptfl.secagg.messages import SecAggSettings
from gptfl.tls_config import TlsConfig
from gptfl.weights import WeightMap
from silo_agent.agent import SiloAgent
from silo_agent.config import SiloConfig
from silo_agent.fleet_client import FleetApi, FleetClient
from tests.integration.conftest import wait_for_job_end

pytestmark = pytest.mark.slow

PLANS = digits_silos(count=5, alpha=1.0, seed=3)
SILOS = tuple(p.silo_id for p in PLANS)
SECAGG = {"threshold": 3, "clip_range": 2.0, "bits": 32, "max_silos": 10, "stage_deadline_s": 5}
#: float32 rounding of the new global weights (of magnitude below 8), and of FedAvg's float32
#: running sum
_FLOAT32_SLACK = 2e-6


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secagg-pki")
    init_pki(path, coordinator_hosts=["127.0.0.1", "localhost"], silos=list(SILOS))
    return path


#: when a silo dies: once the n-th call of this name to the coordinator has completed
DiesAfter = tuple[str, int]
#: the key answers are advertise (1st SubmitSecAgg), share (2nd), unmask (3rd)
AFTER_SHARING: DiesAfter = ("submit_secagg", 2)
AFTER_MASKED_UPLOAD: DiesAfter = ("upload_update", 1)


class _Dying:
    """A silo's connection that goes silent once a chosen call has completed."""

    def __init__(self, client: FleetApi, after: DiesAfter, stop: threading.Event) -> None:
        self._client = client
        self._name, self._left = after
        self._stop = stop

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._client, name)
        if name != self._name:
            return call

        def then_die(*args: Any, **kwargs: Any) -> Any:
            result = call(*args, **kwargs)
            self._left -= 1
            if self._left == 0:
                self._stop.set()  # the agent sends nothing more; its heartbeats end
            return result

        return then_die


@dataclass
class Federation:
    """One coordinator and its silo agents (threads); everything stops at the end."""

    pki_dir: Path
    work: Path
    coordinator: Coordinator | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    stops: dict[str, threading.Event] = field(default_factory=dict)

    def start(
        self,
        *,
        silos: tuple[str, ...] = SILOS,
        dying: Mapping[str, DiesAfter] | None = None,
        privacy: Mapping[str, Any] | None = None,
    ) -> None:
        files = participant_files(self.pki_dir, "coordinator")
        self.coordinator = start_coordinator(
            CoordinatorConfig(
                fleet_address="127.0.0.1:0",
                admin_address="127.0.0.1:0",
                tls=TlsConfig(ca=files.ca, cert=files.cert, key=files.key),
                state_dir=self.work / "state",
                heartbeat_interval_s=1.0,
            )
        )
        for plan in PLANS:
            if plan.silo_id in silos:
                dies_after = (dying or {}).get(plan.silo_id)
                self._start_silo(plan.silo_id, plan.data, dies_after, privacy)

    def _start_silo(
        self,
        silo: str,
        data: Mapping[str, Any],
        dies_after: DiesAfter | None,
        privacy: Mapping[str, Any] | None,
    ) -> None:
        assert self.coordinator is not None
        files = participant_files(self.pki_dir, "silo", silo)
        address = f"127.0.0.1:{self.coordinator.fleet.port}"
        config = SiloConfig(
            coordinator=address,
            tls=TlsConfig(ca=files.ca, cert=files.cert, key=files.key),
            state_dir=self.work / silo,
            data=data,  # type: ignore[arg-type]
            device="cpu",
            poll_wait_s=1.0,
            privacy=privacy,  # type: ignore[arg-type]
        )
        stop = threading.Event()

        @contextlib.contextmanager
        def connect() -> Iterator[FleetApi]:
            channel = open_channel(address, tls=files)
            try:
                client = FleetClient(channel)
                yield _Dying(client, dies_after, stop) if dies_after else client
            finally:
                channel.close()

        agent = SiloAgent(config, connect=connect)
        thread = threading.Thread(target=agent.run, args=(stop,), name=silo, daemon=True)
        self.stops[silo] = stop
        self.threads.append(thread)
        thread.start()

    def admin(self) -> AdminClient:
        assert self.coordinator is not None
        return AdminClient(
            f"127.0.0.1:{self.coordinator.admin.port}",
            tls=participant_files(self.pki_dir, "admin"),
        )

    def run_job(self, spec: dict[str, Any]) -> tuple[StatusView, WeightMap]:
        with self.admin() as admin:
            admin.status(wait_for_ready=True)
            admin.submit(yaml.safe_dump(spec))
            status = wait_for_job_end(admin, timeout_s=240, interval_s=0.3)
            return status, admin.download_model()

    def stop(self) -> None:
        for stop in self.stops.values():
            stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        if self.coordinator is not None:
            self.coordinator.stop(grace_s=1)
        assert not any(t.is_alive() for t in self.threads), "a silo agent outlived its test"


@pytest.fixture
def federation(pki_dir: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[Federation] = []

    def make(name: str) -> Federation:
        started.append(Federation(pki_dir, tmp_path / name))
        return started[-1]

    yield make
    for fed in started:
        fed.stop()


def _spec(secagg: bool, **overrides: Any) -> dict[str, Any]:
    spec = digits_job_spec(name="secagg", rounds=1, silos=5, strategy="fedavg", seed=3)
    spec.update(
        min_silos=2,
        round_deadline_s=30,
        wait_for_silos_s=60,
        evaluation={"federated": False},
    )
    if secagg:
        spec["secure_aggregation"] = dict(SECAGG)
    spec.update(overrides)
    return spec


def _largest_difference(a: WeightMap, b: WeightMap) -> float:
    return max(
        (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()
    )


def _quantization_bound(count: int) -> float:
    settings = SecAggSettings(
        threshold=3, bits=32, clip_range=SECAGG["clip_range"], max_silos=SECAGG["max_silos"]
    )
    # the sum's bound; the average divides it by the survivors' weights (at least 1)
    return settings.quantizer().error_bound(count)


def _initial_model() -> WeightMap:
    weights, _ = random_initial_model(JobSpec.model_validate(_spec(secagg=False)))
    return weights


def _plain_fedavg(federation: Any, name: str, silos: tuple[str, ...]) -> WeightMap:
    """The model a plain FedAvg round of ``silos`` gives (the same training, seeds, data)."""
    fed = federation(name)
    fed.start(silos=silos)
    status, model = fed.run_job(_spec(secagg=False, min_silos=len(silos)))
    assert status.phase == "finished", status.message
    assert status.rounds[0].updates_accepted == len(silos)
    return model  # type: ignore[no-any-return]


def test_five_silos_with_secure_aggregation_match_plain_fedavg(federation: Any) -> None:
    plain_model = _plain_fedavg(federation, "plain", SILOS)
    secure = federation("secure")
    secure.start()
    status, secure_model = secure.run_job(_spec(secagg=True))
    assert status.phase == "finished", status.message
    assert status.stage == "secure aggregation: unmasked"
    assert status.stage_silos == SILOS and status.stage_dropped == ()
    assert status.rounds[0].updates_accepted == 5
    difference = _largest_difference(secure_model, plain_model)
    assert difference <= _quantization_bound(5) + _FLOAT32_SLACK, difference
    # The round did move the model: matching FedAvg is not a model left where it started.
    assert _largest_difference(secure_model, _initial_model()) > 1e-3


def test_a_silo_killed_after_sharing_keys_leaves_the_exact_sum_of_the_four_survivors(
    federation: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = SILOS[1]
    survivors = tuple(s for s in SILOS if s != victim)
    plain_model = _plain_fedavg(federation, "plain-four", survivors)
    # The victim advertises and shares its keys, then dies before its masked upload: the
    # survivors reveal its mask key, so its pairwise masks come out of their inputs.
    secure = federation("secure-four")
    secure.start(dying={victim: AFTER_SHARING})
    status, secure_model = secure.run_job(_spec(secagg=True))
    assert status.phase == "finished", status.message
    assert status.rounds[0].updates_accepted == 4
    assert status.stage_silos == survivors and status.stage_dropped == (victim,)
    difference = _largest_difference(secure_model, plain_model)
    assert difference <= _quantization_bound(4) + _FLOAT32_SLACK, difference
    print_status(status)
    shown = capsys.readouterr().out
    assert f"stage: secure aggregation: unmasked; silos: {', '.join(survivors)}" in shown
    assert f"dropped: {victim}" in shown


def test_a_silo_killed_after_its_masked_upload_still_counts_in_the_exact_sum(
    federation: Any,
) -> None:
    """Its masked input is in the coordinator's sum; the other four reveal its self-mask
    seed (never its mask key), so the sum of all five comes out (Bonawitz et al.'s U3)."""
    victim = SILOS[3]
    plain_model = _plain_fedavg(federation, "plain-five", SILOS)
    secure = federation("secure-late")
    secure.start(dying={victim: AFTER_MASKED_UPLOAD})
    status, secure_model = secure.run_job(_spec(secagg=True))
    assert status.phase == "finished", status.message
    assert status.rounds[0].updates_accepted == 5
    difference = _largest_difference(secure_model, plain_model)
    assert difference <= _quantization_bound(5) + _FLOAT32_SLACK, difference


def test_three_of_five_killed_below_the_threshold_fail_the_round_and_keep_the_model(
    federation: Any,
) -> None:
    victims = SILOS[:3]
    secure = federation("secure-three-dead")
    secure.start(dying=dict.fromkeys(victims, AFTER_SHARING))
    status, model = secure.run_job(_spec(secagg=True))
    assert status.phase == "failed"
    assert "round 1: 2 masked inputs arrived, threshold 3" in status.message, status.message
    assert "the global model is unchanged" in status.message
    assert status.rounds == []
    start = _initial_model()
    assert all(torch.equal(model[k], start[k]) for k in start)


def test_dp_sgd_at_the_silos_composes_with_secure_aggregation(federation: Any) -> None:
    """Each silo clips and noises its training (DP-SGD, its own ledger), then masks the
    private model's update: the round unmasks, and every silo's spend is reported."""
    secure = federation("secure-dp")
    secure.start(privacy={"target_epsilon": 8.0, "target_delta": 1e-5, "max_grad_norm": 1.0})
    status, model = secure.run_job(_spec(secagg=True, rounds=2))
    assert status.phase == "finished", status.message
    assert status.stage == "secure aggregation: unmasked" and status.stage_silos == SILOS
    assert [r.updates_accepted for r in status.rounds] == [5, 5]
    spent = {p.silo_id: p for p in status.privacy}
    assert set(spent) == set(SILOS)
    assert all(0 < p.epsilon <= 8.0 and p.accountant == "rdp" for p in spent.values())
    assert _largest_difference(model, _initial_model()) > 1e-3
