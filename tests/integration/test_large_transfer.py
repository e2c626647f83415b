"""A 300 MB model moves both ways in 1 MiB chunks without raising gRPC's message limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from coordinator.job_runner import JobRunner
from gptfl.admin_client import AdminClient
from gptfl.pki import participant_files
from gptfl.rpc import MAX_MESSAGE_BYTES
from gptfl.weights import WeightMap, build_manifest
from silo_agent.fleet_client import FleetClient
from tests.integration.conftest import StartCoordinator, silo_channel
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MODEL_BYTES = 300 * 1000 * 1000


def _big_model(_runner: JobRunner) -> tuple[WeightMap, dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    half = MODEL_BYTES // 4 // 2
    weights = {
        "encoder.weight": torch.randn(half, generator=generator),
        "decoder.weight": torch.randn(half - 7, generator=generator),
        "decoder.bias": torch.randn(7, generator=generator).half(),
    }
    return weights, {"kind": "test"}


def test_300mb_model_round_trip(start: StartCoordinator, pki_dir: Path) -> None:
    assert MAX_MESSAGE_BYTES == 4 << 20  # the default limit stays in force
    coordinator = start(initial_model=_big_model)
    client = FleetClient(silo_channel(pki_dir, "silo-a", coordinator.fleet.port))
    client.register(agent_version="test", device="cpu", num_train=5, num_eval=0)
    spec = {
        "name": "big",
        "model": {"arch": "cnn-small", "num_classes": 10, "in_channels": 1, "image_size": 8},
        "rounds": 1,
        "min_silos": 1,
        "evaluation": {"federated": False},
    }
    with AdminClient(
        f"127.0.0.1:{coordinator.admin.port}", tls=participant_files(pki_dir, "admin")
    ) as admin:
        admin.submit(yaml.safe_dump(spec))
        task = wait_until(
            lambda: client.pull_task(1.0).task, timeout_s=60, interval_s=0, what="a task"
        )
        expected, _ = _big_model(None)  # type: ignore[arg-type]
        weights = client.download_model(task, expected=expected)
        assert sum(t.numel() * t.element_size() for t in weights.values()) >= MODEL_BYTES - 64
        assert build_manifest(weights).digest == task.model_digest
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
        reply, sent = client.upload_update(
            task, weights, num_examples=5, metrics={"loss": 0.5}, train_seconds=0.1
        )
        assert reply.accepted and sent >= MODEL_BYTES - 64

        def ended() -> bool:
            if admin.status().ended:
                return True
            client.pull_task(0.5)  # the silo stays seen while the job ends
            return False

        wait_until(ended, timeout_s=60, interval_s=0, what="the job to end")
        assert admin.status().phase == "finished"
    received = coordinator.metrics.registry.get_sample_value(
        "gptfl_bytes_received_total", {"silo": "silo-a"}
    )
    assert received is not None and received >= MODEL_BYTES - 64
