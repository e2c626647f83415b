"""The silo's side of secure aggregation as the agent uses it: refusals with a reason,
repeats answered alike, and the update it masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gptfl import pki
from gptfl.errors import TaskRefused
from gptfl.models.spec import ModelSpec
from gptfl.secagg.layout import MASKED_TENSOR
from gptfl.secagg.messages import KeyAdvertisement, RoundContext, SecAggSettings, SecAggTask
from gptfl.secagg.server_session import ServerSession
from gptfl.task import LocalSettings, TaskKind, TaskSpec
from silo_agent.secagg_client import SecAggClient

SETTINGS = SecAggSettings(threshold=2, bits=32, clip_range=0.5, max_silos=4)


def _task(kind: TaskKind, task_id: str, secagg: SecAggTask | None, round_: int = 1) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        job_id="job",
        round=round_,
        kind=kind,
        model_spec=ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8),
        model_digest="0" * 64,
        local=LocalSettings(epochs=1, batch_size=8, learning_rate=0.1),
        deadline_unix=0.0,
        secagg=secagg,
    )


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("secagg-client-pki")
    pki.init_pki(folder, coordinator_hosts=["localhost"], silos=["s1", "s2"])
    return folder


def _client(pki_dir: Path, silo: str) -> SecAggClient:
    return SecAggClient.from_tls(pki.participant_files(pki_dir, "silo", silo))


def test_a_silo_without_tls_refuses_with_the_reason() -> None:
    task = _task(TaskKind.SECAGG_ADVERTISE, "t1", SecAggTask(SETTINGS))
    with pytest.raises(TaskRefused, match="runs without TLS") as refused:
        SecAggClient.from_tls(None).answer(task, num_examples=5)
    assert refused.value.kind == "secure_aggregation"


def test_the_same_advertise_task_again_gets_the_same_keys_a_new_round_new_ones(
    pki_dir: Path,
) -> None:
    client = _client(pki_dir, "s1")
    task = _task(TaskKind.SECAGG_ADVERTISE, "t1", SecAggTask(SETTINGS))
    first = client.answer(task, num_examples=5).payload
    assert client.answer(task, num_examples=5).payload == first
    later = client.answer(
        _task(TaskKind.SECAGG_ADVERTISE, "t2", SecAggTask(SETTINGS), 2), num_examples=5
    )
    assert isinstance(first, KeyAdvertisement) and isinstance(later.payload, KeyAdvertisement)
    assert later.payload.mask_public != first.mask_public and later.payload.round == 2


def test_a_silo_without_keys_for_the_round_refuses_its_later_stages(pki_dir: Path) -> None:
    client = _client(pki_dir, "s1")  # as if restarted after advertising
    share = _task(TaskKind.SECAGG_SHARE, "t3", SecAggTask(SETTINGS))
    with pytest.raises(TaskRefused, match="holds no keys for round 1"):
        client.answer(share, num_examples=5)


def test_the_masked_update_unmasks_to_the_clipped_weighted_update(pki_dir: Path) -> None:
    """Two silos' uploads through a real server session: what comes out is each update
    clipped to clip_range, weighted by its count over the largest, in the model's float
    tensors only (the integer step counter stays out)."""
    silos = ("s1", "s2")
    clients = {s: _client(pki_dir, s) for s in silos}
    counts = {"s1": 30, "s2": 10}
    server = ServerSession(
        context=RoundContext("job", 1),
        settings=SETTINGS.protocol(),
        ring=SETTINGS.ring(),
        length=6,
        silos=silos,
    )

    def answer(kind: TaskKind, silo: str, secagg: SecAggTask) -> object:
        task = _task(kind, f"{kind.value}-{silo}", secagg)
        return clients[silo].answer(task, num_examples=counts[silo]).payload

    for silo in silos:
        server.receive_advertisement(
            silo, answer(TaskKind.SECAGG_ADVERTISE, silo, SecAggTask(SETTINGS))
        )  # type: ignore[arg-type]
    keys = server.close_advertising()
    for silo in silos:
        server.receive_shares(
            silo, answer(TaskKind.SECAGG_SHARE, silo, SecAggTask(SETTINGS, advertisements=keys))
        )  # type: ignore[arg-type]
    server.close_sharing()
    base = {"steps": torch.tensor(3), "w": torch.zeros(2, 3)}
    trained = {
        "s1": {"steps": torch.tensor(4), "w": torch.tensor([[0.1, -0.2, 0.7], [-0.9, 0.0, 0.25]])},
        "s2": {"steps": torch.tensor(4), "w": torch.tensor([[0.3, 0.3, 0.3], [-0.3, 0.4, -0.25]])},
    }
    for silo in silos:
        secagg = SecAggTask(SETTINGS, envelopes=server.envelopes_for(silo))
        upload, n = clients[silo].masked_update(
            _task(TaskKind.TRAIN, f"m-{silo}", secagg), trained[silo], base
        )
        assert n == counts[silo] and list(upload) == [MASKED_TENSOR]
        assert upload[MASKED_TENSOR].dtype == torch.int32  # integer tensors on the wire
        server.receive_masked(silo, upload[MASKED_TENSOR].numpy().view(np.uint32))
    request = server.close_masking()
    for silo in silos:
        reply = answer(TaskKind.SECAGG_UNMASK, silo, SecAggTask(SETTINGS, unmask=request))
        server.receive_unmask(silo, reply)  # type: ignore[arg-type]
    total = SETTINGS.quantizer().dequantize_sum(server.finish(), count=2)
    clipped = {s: trained[s]["w"].double().numpy().ravel().clip(-0.5, 0.5) for s in silos}
    expected = clipped["s1"] * 1.0 + clipped["s2"] * (10 / 30)
    np.testing.assert_allclose(total, expected, atol=SETTINGS.quantizer().error_bound(2))
