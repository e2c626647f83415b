"""``gptfl-silo --config silo.yaml``: runs a silo agent until SIGTERM/SIGINT or its job ends."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from gptfl import atomic_io
from gptfl.errors import EXIT_CONFIG, EXIT_FAILURE, ConfigError, GptflError
from gptfl.logging_setup import configure_logging
from gptfl.memory import tune_allocator
from gptfl.service_process import (
    ENDPOINTS_FILE,
    load_service_config,
    service_parser,
    start_metrics_http,
    stop_on_signals,
)
from silo_agent.agent import SiloAgent
from silo_agent.config import ENV_PREFIX, SiloConfig
from silo_agent.metrics import SiloMetrics

log = logging.getLogger("silo_agent")


def main(argv: Sequence[str] | None = None) -> int:
    args = service_parser(
        prog="gptfl-silo",
        description="Run a GPT-FL silo agent (with --insecure, silo_id must be in the config).",
        config_name="silo.yaml",
    ).parse_args(argv)
    try:
        config, identity = load_service_config(SiloConfig, args, env_prefix=ENV_PREFIX, role="silo")
    except ConfigError as exc:
        print(f"gptfl-silo: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # the silo's id: the CN of its certificate (what the coordinator knows it as)
    name = identity.common_name if identity is not None else config.silo_id or "silo"
    configure_logging(
        fmt=config.log_format, level=logging.DEBUG if args.verbose else logging.INFO, name=name
    )
    tune_allocator()  # weights stream in 1 MiB messages: keep their buffers off mmap
    metrics = SiloMetrics.create()
    try:
        atomic_io.ensure_writable_dir(config.state_dir, key="state_dir")
        metrics_port = start_metrics_http(config.metrics_address, metrics.registry)
        agent = SiloAgent(config, metrics=metrics)
        # The bound port (port 0 in a config means "any free port"), for local clusters.
        atomic_io.write_json(
            config.state_dir / ENDPOINTS_FILE, {"pid": os.getpid(), "metrics_port": metrics_port}
        )
    except ConfigError as exc:
        print(f"gptfl-silo: {args.config.name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (GptflError, OSError) as exc:
        print(f"gptfl-silo: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    stop = stop_on_signals()
    log.info(
        "silo agent starting: coordinator %s, device %s%s",
        config.coordinator,
        agent.device,
        f", metrics :{metrics_port}" if metrics_port else "",
    )
    return agent.run(stop)


if __name__ == "__main__":
    sys.exit(main())
