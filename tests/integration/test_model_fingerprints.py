"""Registration checks the silo's model fingerprints: a real coordinator over mutual TLS."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from gptfl import serde
from gptfl.models.fingerprint import ModelFingerprint, local_fingerprints
from gptfl.proto.v1 import fleet_pb2, fleet_pb2_grpc
from tests.integration.conftest import StartCoordinator, silo_channel


def _register(
    pki_dir: Path, port: int, silo: str, models: list[ModelFingerprint]
) -> fleet_pb2.RegisterReply:
    with silo_channel(pki_dir, silo, port) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        request = fleet_pb2.RegisterRequest(
            agent_version="test", models=serde.fingerprints_to_pb(models)
        )
        reply: fleet_pb2.RegisterReply = stub.Register(request, timeout=10)
        return reply


def _resnet20() -> ModelFingerprint:
    return next(f for f in local_fingerprints() if f.arch == "resnet20")


def test_matching_fingerprints_and_an_older_agent_register(
    start: StartCoordinator, pki_dir: Path
) -> None:
    coordinator = start()
    port = coordinator.fleet.port
    assert _register(pki_dir, port, "silo-a", list(local_fingerprints())).silo_id == "silo-a"
    assert _register(pki_dir, port, "silo-b", []).silo_id == "silo-b"  # sends none: unchecked
    # An architecture only the silo has is no reason to refuse it.
    extra = ModelFingerprint("silo-only-net", "silo-models", "1.0", "0" * 64)
    assert _register(pki_dir, port, "silo-c", [extra]).silo_id == "silo-c"
    assert {r.silo_id for r in coordinator.registry.snapshot()} == {"silo-a", "silo-b", "silo-c"}


@pytest.mark.parametrize(
    ("changed", "reason"),
    [
        (
            {"provider_version": "9.9.9"},
            "model architecture 'resnet20' comes from gpt-fl {version} at the coordinator but "
            "from gpt-fl 9.9.9 at the silo",
        ),
        (
            {"layout_sha256": "f" * 64},
            "model architecture 'resnet20' (gpt-fl {version}) builds a different parameter "
            "layout at the silo (layout ffffffffffff, coordinator {layout})",
        ),
    ],
)
def test_a_silo_whose_model_differs_is_refused_with_the_reason(
    start: StartCoordinator, pki_dir: Path, changed: dict[str, str], reason: str
) -> None:
    coordinator = start()
    ours = _resnet20()
    theirs = [replace(ours, **changed)]  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as refused:
        _register(pki_dir, coordinator.fleet.port, "silo-a", theirs)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    expected = reason.format(version=ours.provider_version, layout=ours.layout_sha256[:12])
    assert refused.value.details() == expected
    assert coordinator.registry.snapshot() == []  # a refused silo is not recorded


def test_a_malformed_fingerprint_list_is_invalid(start: StartCoordinator, pki_dir: Path) -> None:
    coordinator = start()
    with pytest.raises(grpc.RpcError) as refused:
        _register(pki_dir, coordinator.fleet.port, "silo-a", [replace(_resnet20(), arch="")])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "models: a fingerprint needs an arch" in (refused.value.details() or "")
