"""gRPC retries the idempotent unary calls on UNAVAILABLE, and nothing else.

A real server on 127.0.0.1 answers each method with UNAVAILABLE a set number of times before
it succeeds; a channel from :func:`gptfl.rpc.open_channel` calls it. What the server counts is
what the channel sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from gptfl.proto.v1 import admin_pb2, fleet_pb2
from gptfl.rpc import RETRIED_METHODS, Server, open_channel, service_config, start_server

FLEET, ADMIN = "gptfl.v1.Fleet", "gptfl.v1.Admin"
_SERVICES = {
    FLEET: fleet_pb2.DESCRIPTOR.services_by_name["Fleet"],
    ADMIN: admin_pb2.DESCRIPTOR.services_by_name["Admin"],
}


class _Flaky:
    """Fails the first ``failures`` calls of each unary method with UNAVAILABLE."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def handler(self, name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def handle(_request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls[name] = self.calls.get(name, 0) + 1
                seen = self.calls[name]
            if seen <= self.failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
            return b""  # an empty message is a valid reply of every type

        return handle

    def register(self, server: grpc.Server) -> None:
        for service, descriptor in _SERVICES.items():
            table = {
                m.name: grpc.unary_unary_rpc_method_handler(self.handler(f"{service}/{m.name}"))
                for m in descriptor.methods
                if not (m.client_streaming or m.server_streaming)
            }
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, table),))


@pytest.fixture()
def flaky() -> Iterator[tuple[_Flaky, Server]]:
    backend = _Flaky(failures=1)  # one retry: its pause is at most initial_backoff_s
    server = start_server("127.0.0.1:0", tls=None, register=backend.register, max_workers=4)
    yield backend, server
    server.stop(0)


def _call(server: Server, method: str) -> grpc.StatusCode:
    channel = open_channel(server.address, tls=None)
    try:
        channel.unary_unary(f"/{method}")(b"", timeout=30)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    finally:
        channel.close()
    return grpc.StatusCode.OK


def _unary_methods() -> list[str]:
    return [
        f"{service}/{m.name}"
        for service, descriptor in _SERVICES.items()
        for m in descriptor.methods
        if not (m.client_streaming or m.server_streaming)
    ]


@pytest.mark.parametrize("method", _unary_methods())
def test_the_idempotent_calls_ride_out_unavailable_and_the_others_fail_at_once(
    flaky: tuple[_Flaky, Server], method: str
) -> None:
    backend, server = flaky
    service, name = method.split("/")
    if name in RETRIED_METHODS.get(service, ()):
        assert _call(server, method) == grpc.StatusCode.OK
        assert backend.calls[method] == 2
    else:
        assert _call(server, method) == grpc.StatusCode.UNAVAILABLE
        assert backend.calls[method] == 1  # never sent twice


def test_what_is_retried_is_exactly_the_idempotent_unary_calls() -> None:
    """Named here once more on purpose: adding a call to the policy is a decision to review."""
    assert dict(RETRIED_METHODS) == {
        FLEET: ("Heartbeat", "PullTask", "ReportEvaluation", "DeclineTask", "SubmitSecAgg"),
        ADMIN: ("GetStatus", "ListSilos"),
    }
    for service, names in RETRIED_METHODS.items():
        methods = _SERVICES[service].methods_by_name
        for name in names:
            assert not methods[name].client_streaming and not methods[name].server_streaming


def test_the_service_config_is_what_grpc_reads() -> None:
    config: dict[str, Any] = json.loads(service_config())
    (method_config,) = config["methodConfig"]
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= policy["maxAttempts"] <= 5  # gRPC caps it at 5
    assert policy["initialBackoff"].endswith("s") and policy["maxBackoff"].endswith("s")
    assert {(n["service"], n["method"]) for n in method_config["name"]} == {
        (s, m) for s, names in RETRIED_METHODS.items() for m in names
    }
