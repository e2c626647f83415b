"""gRPC plumbing in one place: options, mutual-TLS credentials, channels, servers, errors.

Every channel and server in GPT-FL is built here, so keepalive, message sizes, TLS, retries
and the health service are configured the same way everywhere. Plaintext exists only when a
caller passes ``tls=None`` explicitly (the ``--insecure`` flags), and it logs a warning.

Retries are gRPC's own (:data:`RETRIED_METHODS`, :data:`RETRY_POLICY`): every channel carries a
service config whose ``retryPolicy`` sends an idempotent unary call again, with jittered
exponential backoff and within the call's deadline, when it fails with ``UNAVAILABLE`` before
the server answered (a connection that dropped, a server restarting). A brief outage then
costs a silo nothing: its long poll, heartbeat or report goes through on a new connection and
it keeps its task. Streams are left out (gRPC cannot replay a stream whose first messages
were answered); the silo's upload has its own policy (``silo_agent.upload_retry``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gptfl.errors import GptflError
from gptfl.pki import TlsFiles

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 << 20  # gRPC's default; weights move in 1 MiB chunks and never need more

_COMMON_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True)
class RetryPolicy:
    """How gRPC retries a call of :data:`RETRIED_METHODS` that failed with ``UNAVAILABLE``.

    Attempt ``n`` (from 2) waits a uniform draw between 0 and ``min(initial_backoff_s *
    backoff_multiplier**(n-2), max_backoff_s)``, and no attempt starts past the call's
    deadline. gRPC caps ``max_attempts`` at 5.

    Attributes:
        max_attempts: attempts in all, the first one included.
        initial_backoff_s: the bound of the first pause.
        max_backoff_s: the largest bound of a pause.
        backoff_multiplier: growth of the bound from one pause to the next.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0


#: the default: pauses bounded by 0.5, 1, 2 and 4 s, so an outage of a few seconds is ridden out
RETRY_POLICY = RetryPolicy()

#: unary calls that may safely be sent twice, by service. A PullTask sent again gets the task
#: its lost reply carried (``coordinator.tasks``); a repeated Heartbeat, status or silo list
#: changes nothing; a ReportEvaluation or DeclineTask whose first attempt did arrive is refused
#: the second time (ALREADY_EXISTS, FAILED_PRECONDITION) and the task keeps the outcome of the
#: first: the evaluation is averaged once (the refused repeat is counted as a rejected report).
#: A SubmitSecAgg whose first attempt arrived is answered as done and changes nothing (the
#: round's protocol took the first).
#: Register is not retried here: the silo's reconnect loop is its retry, with the backoff of
#: its config. Streams are never listed.
RETRIED_METHODS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "gptfl.v1.Fleet": (
            "Heartbeat",
            "PullTask",
            "ReportEvaluation",
            "DeclineTask",
            "SubmitSecAgg",
        ),
        "gptfl.v1.Admin": ("GetStatus", "ListSilos"),
    }
)


def service_config(
    policy: RetryPolicy = RETRY_POLICY,
    methods: Mapping[str, tuple[str, ...]] = RETRIED_METHODS,
) -> str:
    """The channel's service config (JSON): ``policy`` for each of ``methods``."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [
                        {"service": service, "method": method}
                        for service, names in methods.items()
                        for method in names
                    ],
                    "retryPolicy": {
                        "maxAttempts": policy.max_attempts,
                        "initialBackoff": f"{policy.initial_backoff_s}s",
                        "maxBackoff": f"{policy.max_backoff_s}s",
                        "backoffMultiplier": policy.backoff_multiplier,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.service_config", service_config()),
    # the config above is the channel's own; none is looked up through DNS
    ("grpc.service_config_disable_resolution", 1),
]


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate signed by ``files.ca``."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


_warned_plaintext: set[str] = set()


def open_channel(
    address: str, *, tls: TlsFiles | None, server_name: str | None = None
) -> grpc.Channel:
    """A channel to ``address``: mutual TLS with ``tls``, plaintext (with a warning) without."""
    options = list(_CHANNEL_OPTIONS)
    if tls is None:
        if address not in _warned_plaintext:  # once per address, not on every reconnect
            _warned_plaintext.add(address)
            log.warning(
                "plaintext channel to %s: insecure mode (--insecure or insecure: true); "
                "do not use in production",
                address,
            )
        return grpc.insecure_channel(address, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, channel_credentials(tls), options=options)


@dataclass
class Server:
    """A gRPC server with the standard health service, bound to one address."""

    server: grpc.Server
    health: health.HealthServicer
    port: int
    address: str

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", status)

    def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then stop taking calls and let in-flight ones finish within grace."""
        self.set_serving(False)
        self.server.stop(grace_s).wait()


def start_server(
    address: str,
    *,
    tls: TlsFiles | None,
    register: Callable[[grpc.Server], None],
    max_workers: int = 64,
    name: str = "grpc",
    warn_plaintext: bool = True,
) -> Server:
    """Builds, binds and starts a server; ``register`` adds the servicers.

    An address ending in ``:0`` binds an ephemeral port (tests); the bound port is returned.
    Without ``tls`` the server is plaintext, which is logged as a warning about insecure
    mode unless ``warn_plaintext`` is false (a server that is plaintext by design).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name),
        options=_SERVER_OPTIONS,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    register(server)
    if tls is None:
        if warn_plaintext:
            log.warning(
                "%s server on %s is PLAINTEXT: insecure mode (--insecure or insecure: true)",
                name,
                address,
            )
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials(tls))
    if port == 0:
        raise OSError(f"could not bind {name} server to {address}")
    server.start()
    host = address.rsplit(":", 1)[0]
    handle = Server(server, health_servicer, port, f"{host}:{port}")
    handle.set_serving(True)
    return handle


def start_health_server(address: str) -> Server:
    """A plaintext server with only the health service.

    Kubelet's gRPC probes cannot present client certificates, so probes target this port;
    the owner flips it to NOT_SERVING together with its other servers on shutdown.
    """
    log.info("health server on %s is plaintext (health checks only)", address)
    return start_server(
        address,
        tls=None,
        register=lambda _s: None,
        max_workers=4,
        name="health",
        warn_plaintext=False,  # kubelet probes have no certificate
    )


def abort(context: grpc.ServicerContext, error: GptflError) -> NoReturn:
    """Ends the call with the status and message of a domain error."""
    context.abort(error.code, str(error))
    raise AssertionError("unreachable: context.abort raises")  # for type checkers


F = TypeVar("F", bound=Callable[..., Any])


def maps_errors(method: F) -> F:
    """Decorates a servicer method so that :class:`GptflError` becomes its gRPC status."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except GptflError as exc:
            abort(context, exc)

    return wrapper  # type: ignore[return-value]


def maps_stream_errors(method: F) -> F:
    """Like :func:`maps_errors` for server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except GptflError as exc:
            abort(context, exc)

    return wrapper  # type: ignore[return-value]
