"""A real federation: coordinator and silo agents as separate processes over mutual TLS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from coordinator.initial_model import random_initial_model
from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.data.sources import SklearnDigitsSource, load_source
from gptfl.job_spec import JobSpec
from gptfl.local_cluster import LocalCluster
from gptfl.models import build_model
from gptfl.pki import participant_files
from gptfl.proto.v1 import admin_pb2, admin_pb2_grpc, fleet_pb2, fleet_pb2_grpc
from gptfl.rpc import open_channel
from gptfl.training import evaluate
from tests.integration.conftest import start_and_submit

pytestmark = pytest.mark.slow


def _random_init_accuracy(spec: JobSpec) -> float:
    weights, _ = random_initial_model(spec)
    model = build_model(spec.model)
    model.load_state_dict(weights)
    test = load_source(
        SklearnDigitsSource(kind="sklearn-digits", split="test"), in_channels=1, image_size=8
    )
    return evaluate(model, test, device=torch.device("cpu")).accuracy


def test_three_silos_two_rounds_learn_over_mtls(tmp_path: Path) -> None:
    spec_dict = digits_job_spec(name="itest", rounds=2, silos=3, strategy="fedavg", seed=0)
    spec = JobSpec.model_validate(spec_dict)
    plans = digits_silos(count=3, alpha=0.5, seed=0)
    cluster = LocalCluster(tmp_path / "work", silos=plans, runs_dir=tmp_path / "runs")
    try:
        job_id = start_and_submit(cluster, spec_dict)
        with cluster.admin() as admin:
            deadline = time.monotonic() + 240
            status = admin.status()
            while not status.ended and time.monotonic() < deadline:
                time.sleep(0.5)
                status = admin.status()
            assert status.phase == "finished", (status.message, cluster.log_tail("coordinator"))
            silos = {s.silo_id: s for s in admin.silos()}
        exits = cluster.wait_silos(timeout_s=60)
    finally:
        cluster.stop()
    assert exits == {p.silo_id: 0 for p in plans}, exits
    assert set(silos) == {p.silo_id for p in plans}
    assert all(s.rounds_participated == 2 for s in silos.values())
    # Each silo re-registers once its data is loaded: the coordinator knows its size.
    assert all(s.num_train_examples > 0 for s in silos.values()), silos

    summary = json.loads((tmp_path / "runs" / job_id / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert {"round", "test_accuracy", "test_loss", "seconds"} <= r.keys()
        assert r["updates_accepted"] == 3
    baseline = _random_init_accuracy(spec)
    assert rounds[-1]["test_accuracy"] > baseline + 0.2, (rounds, baseline)
    report = (tmp_path / "runs" / job_id / "report.md").read_text().splitlines()
    assert [
        line.split("|")[1].strip()
        for line in report
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ] == ["1", "2"]
    assert (tmp_path / "runs" / job_id / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _status_code(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError)
    code: grpc.StatusCode = call.code()
    return code


def test_foreign_ca_and_wrong_roles_are_refused(
    start: object, pki_dir: Path, foreign_pki_dir: Path
) -> None:
    coordinator = start()  # type: ignore[operator]
    fleet = f"127.0.0.1:{coordinator.fleet.port}"
    admin = f"127.0.0.1:{coordinator.admin.port}"
    # A silo certificate from another CA: the TLS handshake fails.
    foreign = participant_files(foreign_pki_dir, "silo", "silo-a")
    own_ca = participant_files(pki_dir, "silo", "silo-a")
    mixed = type(foreign)(ca=own_ca.ca, cert=foreign.cert, key=foreign.key)
    stub = fleet_pb2_grpc.FleetStub(open_channel(fleet, tls=mixed))
    with pytest.raises(grpc.RpcError) as refused:
        stub.Register(fleet_pb2.RegisterRequest(), timeout=5)
    assert _status_code(refused.value) == grpc.StatusCode.UNAVAILABLE
    # Right CA, wrong role: a silo cannot use the admin API, an admin is no silo.
    silo_admin = admin_pb2_grpc.AdminStub(open_channel(admin, tls=own_ca))
    with pytest.raises(grpc.RpcError) as denied:
        silo_admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
    assert _status_code(denied.value) == grpc.StatusCode.PERMISSION_DENIED
    admin_fleet = fleet_pb2_grpc.FleetStub(
        open_channel(fleet, tls=participant_files(pki_dir, "admin"))
    )
    with pytest.raises(grpc.RpcError) as not_silo:
        admin_fleet.Register(fleet_pb2.RegisterRequest(), timeout=5)
    assert _status_code(not_silo.value) == grpc.StatusCode.PERMISSION_DENIED
    # The right silo certificate works.
    ok = fleet_pb2_grpc.FleetStub(open_channel(fleet, tls=own_ca))
    assert ok.Register(fleet_pb2.RegisterRequest(), timeout=5).silo_id == "silo-a"


@pytest.mark.parametrize(
    ("entry", "text", "key"),
    [
        ("coordinator.main", "fleet_adress: 1\ninsecure: true\n", "fleet_adress"),
        ("coordinator.main", "insecure: true\nheartbeat_interval_s: -1\n", "heartbeat_interval_s"),
        (
            "silo_agent.main",
            "coordinator: x:1\ninsecure: true\nsilo_id: a\ndata: {train: "
            "{kind: npz, path: x.npz, colour: red}}\n",
            "data.train.colour",
        ),
        (  # the data is checked at start, not at the first task
            "silo_agent.main",
            "coordinator: x:1\ninsecure: true\nsilo_id: a\n"
            "data: {train: {kind: npz, path: missing.npz}}\n",
            "data.train",
        ),
        ("silo_agent.main", "coordinator: x\ninsecure: true\nsilo_id: a\n", "coordinator"),
    ],
)
def test_bad_config_fails_at_start_with_one_line(
    tmp_path: Path, entry: str, text: str, key: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", entry, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0], lines[0]


def test_an_unwritable_runs_dir_fails_the_coordinator_at_start(tmp_path: Path) -> None:
    """Not at the end of the first job, when the report is written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made below a file, even by root
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        "insecure: true\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"runs_dir: {blocker / 'runs'}\n"
        "fleet_address: 127.0.0.1:0\nadmin_address: 127.0.0.1:0\n"
        "health_address: ''\nmetrics_address: ''\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.main", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "runs_dir" in lines[0] and str(blocker) in lines[0], result.stderr
