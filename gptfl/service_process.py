"""What every GPT-FL service process does the same way: its command line, loading its config
(one-line errors, certificates checked at start), its metrics endpoint, and waiting for
SIGTERM/SIGINT. Used by ``gptfl-coordinator``, ``gptfl-silo`` and ``gptfl-synth``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, start_http_server

from gptfl.config_loading import load_config
from gptfl.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, GptflError, PkiError
from gptfl.pki import Identity
from gptfl.tls_config import TlsConfig

#: what every service writes into its state folder once it listens (pid, bound ports);
#: LocalCluster and the benches read it to find ports bound as 0
ENDPOINTS_FILE = "endpoints.json"

log = logging.getLogger(__name__)


class _ServiceConfig(Protocol):
    @property
    def tls(self) -> TlsConfig | None: ...


C = TypeVar("C", bound=_ServiceConfig)


class _Stoppable(Protocol):
    def stop(self, grace_s: float | None = None) -> None: ...


def service_parser(*, prog: str, description: str, config_name: str) -> argparse.ArgumentParser:
    """``--config FILE``, ``--insecure`` and ``-v``, the options every service takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, required=True, help=config_name)
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without certificates (development only; logs a warning)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def load_service_config(
    model: type[C], args: argparse.Namespace, *, env_prefix: str, role: str
) -> tuple[C, Identity | None]:
    """Loads ``args.config`` with environment overrides and ``--insecure`` applied before
    validation, then checks the certificates (:meth:`~gptfl.tls_config.TlsConfig.check`) so
    that a wrong file fails the start, not every connection later.

    Returns:
        The config, and the identity its certificate carries (None in insecure mode).

    Raises:
        ConfigError: the file, a key or a value is wrong, or a certificate file is missing,
            unreadable, mismatched, expired or for another role than ``role``.
    """
    overrides = {"insecure": True, "tls": None} if args.insecure else None
    config = load_config(model, args.config, env_prefix=env_prefix, overrides=overrides)  # type: ignore[type-var]
    if config.tls is None:
        return config, None
    try:
        return config, config.tls.check(role=role)
    except PkiError as exc:
        raise ConfigError(f"{args.config.name}: {exc}") from None


def start_metrics_http(address: str, registry: CollectorRegistry) -> int | None:
    """Serves ``registry`` on ``host:port`` (port 0: any free port); returns the bound port.

    An empty address disables the endpoint.

    Raises:
        ConfigError: the port cannot be bound (in use, not permitted), naming
            ``metrics_address``.
    """
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    except OSError as exc:  # the address itself was checked when the config was loaded
        reason = exc.strerror or exc
        raise ConfigError(f"metrics_address: cannot listen on {address}: {reason}") from None
    bound: int = server.server_port
    return bound


#: how often a main thread waiting for a stop signal wakes to let Python run signal handlers
SIGNAL_POLL_S = 0.5


def stop_on_signals() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT (install from the main thread).

    Wait for it with :func:`wait_for_stop`, or in a loop with timeouts, never with a bare
    ``wait()``.
    """
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def wait_for_stop(stop: threading.Event) -> None:
    """Blocks until ``stop`` is set, waking every :data:`SIGNAL_POLL_S` seconds.

    The kernel may deliver SIGTERM to any thread of the process (gRPC's, torch's). Python then
    only runs the handler once the main thread executes bytecode again, and a main thread
    blocked in a plain ``Event.wait()`` never does: the process ignores the signal until it
    is killed. That hang was seen in CI and is reproduced in
    tests/unit/gptfl/test_service_process.py.
    """
    while not stop.wait(SIGNAL_POLL_S):
        pass


def serve_until_signal(prog: str, start: Callable[[], _Stoppable]) -> int:
    """Starts a service, runs it until SIGTERM/SIGINT, stops it; returns the exit code.

    A service that cannot start gets a one-line message on stderr and
    :data:`~gptfl.errors.EXIT_CONFIG` when its config is to blame (a folder it cannot
    write), else :data:`~gptfl.errors.EXIT_FAILURE` (its port is taken).
    """
    try:
        service = start()
    except (GptflError, OSError, RuntimeError) as exc:
        # RuntimeError: grpcio reports an address already in use this way.
        print(f"{prog}: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE
    wait_for_stop(stop_on_signals())
    service.stop()
    return EXIT_OK
