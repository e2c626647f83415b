"""``gptfl-silo --config silo.yaml``: runs a silo agent until SIGTERM/SIGINT or its job ends."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from prometheus_client import start_http_server

from gptfl import atomic_io
from gptfl.config_loading import load_config
from gptfl.errors import EXIT_CONFIG, EXIT_FAILURE, ConfigError, GptflError, PkiError
from gptfl.logging_setup import configure_logging
from silo_agent.agent import SiloAgent
from silo_agent.config import ENV_PREFIX, SiloConfig
from silo_agent.metrics import SiloMetrics

log = logging.getLogger("silo_agent")

ENDPOINTS_FILE = "endpoints.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfl-silo", description="Run a GPT-FL silo agent.")
    parser.add_argument("--config", type=Path, required=True, help="silo.yaml")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="dial the coordinator in plaintext (development only; needs silo_id in the config)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {"insecure": True, "tls": None} if args.insecure else None
        config = load_config(SiloConfig, args.config, env_prefix=ENV_PREFIX, overrides=overrides)
        if config.tls is not None:
            config.tls.files().read()  # unreadable certificates fail here, in one line
    except (ConfigError, PkiError) as exc:
        print(f"gptfl-silo: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    name = config.silo_id or (config.tls.cert.parent.name if config.tls else "silo")
    configure_logging(
        fmt=config.log_format, level=logging.DEBUG if args.verbose else logging.INFO, name=name
    )
    metrics = SiloMetrics.create()
    metrics_port: int | None = None
    if config.metrics_address:
        host, _, port = config.metrics_address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "0.0.0.0", registry=metrics.registry
        )
        metrics_port = server.server_port
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        agent = SiloAgent(config, metrics=metrics)
        # The bound port (port 0 in a config means "any free port"), for local clusters.
        atomic_io.write_json(
            config.state_dir / ENDPOINTS_FILE, {"pid": os.getpid(), "metrics_port": metrics_port}
        )
    except (GptflError, OSError) as exc:
        print(f"gptfl-silo: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "silo agent starting: coordinator %s, device %s%s",
        config.coordinator,
        agent.device,
        f", metrics :{metrics_port}" if metrics_port else "",
    )
    return agent.run(stop)


if __name__ == "__main__":
    sys.exit(main())
