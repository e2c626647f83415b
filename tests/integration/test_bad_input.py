"""Every kind of bad upload is refused with a precise status, counted, and changes nothing.

A real coordinator (mutual TLS, port 0) runs a job; a silo client then sends hand-made
upload streams over gRPC.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from coordinator.server import Coordinator
from gptfl.task import TaskSpec
from gptfl.weights import Chunk, Manifest
from tests.integration.conftest import StartCoordinator
from tests.integration.raw_silo import Silo, global_sha, plain, rejected, submit

SPEC = {
    "name": "bad-input",
    "model": {"arch": "cnn-small", "num_classes": 10, "in_channels": 1, "image_size": 8},
    "rounds": 2,
    "min_silos": 1,
    "round_deadline_s": 60,
    "evaluation": {"federated": False},
}


def _flip(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    for chunk in chunks:
        if chunk.index == 0:
            data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
            chunk = dataclasses.replace(chunk, data=data)  # crc32 no longer matches
        yield chunk


def _swap_first_two(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    items = list(chunks)
    items[0], items[1] = items[1], items[0]
    yield from items


Mutation = Callable[[dict[str, torch.Tensor]], tuple[Manifest, Iterator[Chunk]]]


def _renamed(w: dict[str, torch.Tensor]) -> tuple[Manifest, Iterator[Chunk]]:
    first = next(iter(w))
    return plain({("evil." + k if k == first else k): v for k, v in w.items()})


def _reshaped(w: dict[str, torch.Tensor]) -> tuple[Manifest, Iterator[Chunk]]:
    first = next(iter(w))
    return plain({k: (v.reshape(-1) if k == first else v) for k, v in w.items()})


def _retyped(w: dict[str, torch.Tensor]) -> tuple[Manifest, Iterator[Chunk]]:
    return plain({k: v.double() for k, v in w.items()})


def _nan(w: dict[str, torch.Tensor]) -> tuple[Manifest, Iterator[Chunk]]:
    first = next(iter(w))
    bad = {k: v.clone() for k, v in w.items()}
    bad[first].view(-1)[0] = float("nan")
    return plain(bad)


def _bad_crc(w: dict[str, torch.Tensor]) -> tuple[Manifest, Iterator[Chunk]]:
    manifest, chunks = plain(w)
    return manifest, _flip(chunks)


def _bad_digest(w: dict[str, torch.Tensor]) -> tuple[Manifest, Iterator[Chunk]]:
    manifest, chunks = plain(w)
    return dataclasses.replace(manifest, digest="0" * 64), chunks


def _out_of_order(w: dict[str, torch.Tensor]) -> tuple[Manifest, Iterator[Chunk]]:
    manifest, chunks = plain(w)
    return manifest, _swap_first_two(chunks)


def _truncated(w: dict[str, torch.Tensor]) -> tuple[Manifest, Iterator[Chunk]]:
    manifest, chunks = plain(w)
    return manifest, iter(list(chunks)[:-1])


CASES: list[tuple[str, Mutation, grpc.StatusCode, str, str]] = [
    ("wrong names", _renamed, grpc.StatusCode.INVALID_ARGUMENT, "manifest_mismatch", "names"),
    ("wrong shape", _reshaped, grpc.StatusCode.INVALID_ARGUMENT, "manifest_mismatch", "shape"),
    ("wrong dtype", _retyped, grpc.StatusCode.INVALID_ARGUMENT, "manifest_mismatch", "dtype"),
    ("non-finite", _nan, grpc.StatusCode.INVALID_ARGUMENT, "non_finite", "NaN"),
    ("chunk crc32", _bad_crc, grpc.StatusCode.DATA_LOSS, "checksum", "crc32"),
    ("payload digest", _bad_digest, grpc.StatusCode.DATA_LOSS, "checksum", "digest"),
    ("out of order", _out_of_order, grpc.StatusCode.INVALID_ARGUMENT, "chunk_order", "order"),
    ("truncated", _truncated, grpc.StatusCode.INVALID_ARGUMENT, "chunk_order", "ended"),
]


@pytest.fixture
def job(start: StartCoordinator, pki_dir: Path) -> tuple[Coordinator, Silo, TaskSpec]:
    coordinator = start()
    silo = Silo(pki_dir, "silo-a", coordinator.fleet.port)
    submit(coordinator, pki_dir, SPEC)
    return coordinator, silo, silo.pull()


@pytest.mark.parametrize(("label", "mutate", "code", "reason", "needle"), CASES)
def test_bad_update_is_rejected_counted_and_harmless(
    job: tuple[Coordinator, Silo, TaskSpec],
    label: str,
    mutate: Mutation,
    code: grpc.StatusCode,
    reason: str,
    needle: str,
) -> None:
    coordinator, silo, task = job
    weights = silo.download(task)
    before_sha = global_sha(coordinator)
    before_count = rejected(coordinator, reason)
    manifest, chunks = mutate(weights)
    with pytest.raises(grpc.RpcError) as info:
        silo.upload(task, manifest, chunks)
    assert info.value.code() == code, info.value.details()
    assert needle in (info.value.details() or ""), info.value.details()
    assert rejected(coordinator, reason) == before_count + 1
    assert global_sha(coordinator) == before_sha
    # The task stays open: a correct upload afterwards is accepted and counted once.
    reply = silo.upload(task, *plain(weights))
    assert reply.accepted
    with pytest.raises(grpc.RpcError) as again:
        silo.upload(task, *plain(weights))
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # The round closes on that one update: nothing of the rejected one is in the aggregate.
    # (The good update carries the downloaded weights, so the new global model equals them.)
    runner = coordinator.jobs.current()
    assert runner is not None
    deadline = time.monotonic() + 30
    while not runner.state.rounds:
        assert time.monotonic() < deadline, "round 1 did not close"
        time.sleep(0.02)
    assert runner.state.rounds[0].updates_accepted == 1
    assert runner.state.rounds[0].updates_rejected >= 1
    assert runner.global_model is not None
    aggregated = runner.global_model.weights
    for name, tensor in weights.items():
        torch.testing.assert_close(aggregated[name], tensor, rtol=1e-6, atol=1e-6)


def test_upload_for_another_round_or_task_is_refused(
    job: tuple[Coordinator, Silo, TaskSpec], pki_dir: Path
) -> None:
    coordinator, silo, task = job
    weights = silo.download(task)
    with pytest.raises(grpc.RpcError) as wrong_round:
        silo.upload(task, *plain(weights), round_=task.round + 5)
    assert wrong_round.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "round" in (wrong_round.value.details() or "")
    with pytest.raises(grpc.RpcError) as unknown:
        silo.upload(task, *plain(weights), task_id="no-such-task")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # Another silo cannot act on silo-a's task: its identity comes from its certificate.
    other = Silo(pki_dir, "silo-b", coordinator.fleet.port)
    with pytest.raises(grpc.RpcError) as theft:
        other.upload(task, *plain(weights))
    assert theft.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rejected(coordinator, "stale_task") >= 1
    assert rejected(coordinator, "permission_denied") >= 1


def test_crc_mismatch_is_caught_per_chunk(job: tuple[Coordinator, Silo, TaskSpec]) -> None:
    _coordinator, silo, task = job
    weights = silo.download(task)
    manifest, chunks = plain(weights)
    items = list(chunks)
    items[1] = dataclasses.replace(items[1], crc32=zlib.crc32(b"other"))
    with pytest.raises(grpc.RpcError) as info:
        silo.upload(task, manifest, iter(items))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "chunk 1" in (info.value.details() or "")
