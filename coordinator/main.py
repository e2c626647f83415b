"""``gptfl-coordinator --config coordinator.yaml``: runs the coordinator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from coordinator.config import ENV_PREFIX, CoordinatorConfig
from coordinator.server import start_coordinator
from gptfl.config_loading import load_config
from gptfl.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, GptflError, PkiError
from gptfl.logging_setup import configure_logging

log = logging.getLogger("coordinator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptfl-coordinator", description="Run the GPT-FL coordinator."
    )
    parser.add_argument("--config", type=Path, required=True, help="coordinator.yaml")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext gRPC without client certificates (development only)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {"insecure": True, "tls": None} if args.insecure else None
        config = load_config(
            CoordinatorConfig, args.config, env_prefix=ENV_PREFIX, overrides=overrides
        )
        if config.tls is not None:
            config.tls.files().read()  # unreadable certificates fail here, in one line
    except (ConfigError, PkiError) as exc:
        print(f"gptfl-coordinator: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(
        fmt=config.log_format,
        level=logging.DEBUG if args.verbose else logging.INFO,
        name="coordinator",
    )
    try:
        coordinator = start_coordinator(config)
    except (GptflError, OSError, RuntimeError) as exc:
        # RuntimeError: grpcio reports an address already in use this way.
        print(f"gptfl-coordinator: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    coordinator.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
