"""``gptfl-coordinator --config coordinator.yaml``: runs the coordinator until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from coordinator.config import ENV_PREFIX, CoordinatorConfig
from coordinator.server import start_coordinator
from gptfl.errors import EXIT_CONFIG, ConfigError
from gptfl.logging_setup import configure_logging
from gptfl.service_process import (
    load_service_config,
    serve_until_signal,
    service_parser,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = service_parser(
        prog="gptfl-coordinator",
        description="Run the GPT-FL coordinator.",
        config_name="coordinator.yaml",
    ).parse_args(argv)
    try:
        config, _ = load_service_config(
            CoordinatorConfig, args, env_prefix=ENV_PREFIX, role="coordinator"
        )
    except ConfigError as exc:
        print(f"gptfl-coordinator: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(
        fmt=config.log_format,
        level=logging.DEBUG if args.verbose else logging.INFO,
        name="coordinator",
    )
    return serve_until_signal("gptfl-coordinator", lambda: start_coordinator(config))


if __name__ == "__main__":
    sys.exit(main())
