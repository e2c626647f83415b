"""Upload admission: a silo is told `ready` only once an upload slot is free for it, and
cannot keep the slot by stalling.

A real coordinator (mutual TLS, port 0, ``max_concurrent_uploads: 1``) runs a job; silos send
hand-driven upload streams. While silo A holds the only slot, silo B's header is answered with
nothing, so B has no weights in flight; an A that stalls after `ready` is ended when the round
closes, or sooner after ``upload_stall_timeout_s``, and B is admitted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch
import yaml

from gptfl import serde
from gptfl.admin_client import AdminClient
from gptfl.models import build_model
from gptfl.pki import participant_files
from gptfl.proto.v1 import fleet_pb2
from gptfl.task import TaskSpec
from gptfl.weights import build_manifest, iter_chunks
from silo_agent.fleet_client import FleetClient
from tests.integration.conftest import SILOS, StartCoordinator, silo_channel
from tests.waiting import wait_until

SPEC = {
    "name": "admission",
    "model": {"arch": "cnn-small", "num_classes": 10, "in_channels": 1, "image_size": 8},
    "rounds": 1,
    "min_silos": 2,
    "round_deadline_s": 60,
    "evaluation": {"federated": False},
}


class HandDrivenUpload:
    """An UploadUpdate stream whose parts the test releases one step at a time."""

    def __init__(self, channel: grpc.Channel, client: FleetClient, task: TaskSpec) -> None:
        weights = client.download_model(task, expected=_template(task))
        manifest = build_manifest(weights)
        self._steps: queue.Queue[list[fleet_pb2.UploadPart | bytes] | None] = queue.Queue()
        self._steps.put(
            [
                fleet_pb2.UploadPart(
                    header=fleet_pb2.UpdateHeader(
                        task_id=task.task_id, round=task.round, num_examples=5
                    )
                )
            ]
        )
        self._rest: list[fleet_pb2.UploadPart | bytes] = [
            fleet_pb2.UploadPart(manifest=serde.manifest_to_pb(manifest)),
            *(serde.encode_upload_chunk(c) for c in iter_chunks(weights, manifest)),
        ]
        call = channel.stream_stream(
            "/gptfl.v1.Fleet/UploadUpdate",
            request_serializer=serde.serialize_part,
            response_deserializer=fleet_pb2.UploadReply.FromString,
        )
        self.replies: queue.Queue[fleet_pb2.UploadReply | Exception] = queue.Queue()
        self._responses = call(self._parts(), timeout=60)
        threading.Thread(target=self._read, daemon=True).start()

    def _parts(self) -> Iterator[fleet_pb2.UploadPart | bytes]:
        while (step := self._steps.get()) is not None:
            yield from step

    def _read(self) -> None:
        try:
            for reply in self._responses:
                self.replies.put(reply)
        except grpc.RpcError as exc:
            self.replies.put(exc)

    def send_weights(self) -> None:
        self._steps.put(self._rest)
        self._steps.put(None)


def _template(task: TaskSpec) -> dict[str, torch.Tensor]:
    return dict(build_model(task.model_spec).state_dict())


def _pull(client: FleetClient) -> TaskSpec:
    return wait_until(lambda: client.pull_task(1.0).task, timeout_s=30, interval_s=0, what="a task")


class Federation:
    """A coordinator with one upload slot, silos registered and holding their round-1 tasks."""

    def __init__(
        self,
        start: StartCoordinator,
        pki_dir: Path,
        silos: int,
        spec: dict[str, object],
        **config: float,
    ) -> None:
        self.coordinator = start(max_concurrent_uploads=1, **config)
        port = self.coordinator.fleet.port
        self.names = list(SILOS[:silos])
        self.channels = {name: silo_channel(pki_dir, name, port) for name in self.names}
        self.clients = {name: FleetClient(ch) for name, ch in self.channels.items()}
        for client in self.clients.values():
            client.register(agent_version="test", device="cpu", num_train=5, num_eval=0)
        with AdminClient(
            f"127.0.0.1:{self.coordinator.admin.port}", tls=participant_files(pki_dir, "admin")
        ) as admin:
            admin.submit(yaml.safe_dump(spec))
        self.tasks = {name: _pull(client) for name, client in self.clients.items()}

    def upload(self, index: int) -> HandDrivenUpload:
        """Starts silo ``index``'s upload: its header is sent, its weights wait for a step."""
        name = self.names[index]
        return HandDrivenUpload(self.channels[name], self.clients[name], self.tasks[name])

    def rejected(self, reason: str) -> float:
        """The rejection count for ``reason``, once the handler has unwound (it does so just
        after the call ends, so the count may trail the silo's error by a moment)."""
        registry = self.coordinator.metrics.registry
        value: float = wait_until(
            lambda: registry.get_sample_value("gptfl_updates_rejected_total", {"reason": reason}),
            timeout_s=5,
            what=f"a rejection counted as {reason!r}",
        )
        return value

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def _reply(upload: HandDrivenUpload, timeout: float) -> fleet_pb2.UploadReply | Exception:
    return upload.replies.get(timeout=timeout)


def test_a_silo_gets_ready_only_when_a_slot_is_free(start: StartCoordinator, pki_dir: Path) -> None:
    fed = Federation(start, pki_dir, 2, SPEC)
    a = fed.upload(0)
    first = _reply(a, 30)
    assert isinstance(first, fleet_pb2.UploadReply) and first.ready

    b = fed.upload(1)
    # A holds the only slot: B's header gets no answer, so B sends no weights.
    try:
        early = b.replies.get(timeout=1.5)
    except queue.Empty:
        early = None
    assert early is None, early

    a.send_weights()
    done = _reply(a, 30)
    assert isinstance(done, fleet_pb2.UploadReply) and done.accepted, done

    ready = _reply(b, 30)  # the slot came free
    assert isinstance(ready, fleet_pb2.UploadReply) and ready.ready, ready
    b.send_weights()
    done = _reply(b, 30)
    assert isinstance(done, fleet_pb2.UploadReply) and done.accepted, done
    fed.close()


def test_a_silo_that_stalls_after_ready_loses_its_slot_when_the_round_closes(
    start: StartCoordinator, pki_dir: Path
) -> None:
    fed = Federation(start, pki_dir, 1, {**SPEC, "min_silos": 1, "round_deadline_s": 3})
    stalled = fed.upload(0)
    first = _reply(stalled, 30)
    assert isinstance(first, fleet_pb2.UploadReply) and first.ready
    # It never sends its weights. The round's deadline passes, and the coordinator ends the
    # call instead of letting the silo keep the only upload slot; the update counts as stale.
    ended = _reply(stalled, 30)
    assert isinstance(ended, grpc.RpcError) and ended.code() == grpc.StatusCode.CANCELLED, ended
    assert fed.rejected("stale_task") == 1.0
    fed.close()


def test_an_upload_that_stalls_is_ended_and_the_next_silo_gets_the_slot(
    start: StartCoordinator, pki_dir: Path
) -> None:
    spec = {**SPEC, "min_silos": 1, "round_deadline_s": 60}
    fed = Federation(start, pki_dir, 2, spec, upload_stall_timeout_s=1.0)
    stalled = fed.upload(0)
    first = _reply(stalled, 30)
    assert isinstance(first, fleet_pb2.UploadReply) and first.ready
    waiting = fed.upload(1)
    # A sends nothing after `ready`: about a second later the coordinator ends its call,
    # long before the round's 60 s deadline, and B is admitted.
    ended = _reply(stalled, 20)
    assert isinstance(ended, grpc.RpcError) and ended.code() == grpc.StatusCode.CANCELLED, ended
    ready = _reply(waiting, 20)
    assert isinstance(ready, fleet_pb2.UploadReply) and ready.ready, ready
    waiting.send_weights()
    done = _reply(waiting, 30)
    assert isinstance(done, fleet_pb2.UploadReply) and done.accepted, done
    assert fed.rejected("stalled") == 1.0
    fed.close()
