"""``gptfl-synth --config synth.yaml``: runs the synth service until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import torch

from gptfl.config_loading import load_config
from gptfl.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, GptflError, PkiError
from gptfl.logging_setup import configure_logging
from gptfl.training import resolve_device
from synth_service.config import ENV_PREFIX, SynthConfig
from synth_service.server import start_synth_service

log = logging.getLogger("synth_service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptfl-synth",
        description="Run the GPT-FL synth service (synthetic data generation and pretraining).",
    )
    parser.add_argument("--config", type=Path, required=True, help="synth.yaml")
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
        config = load_config(SynthConfig, args.config, env_prefix=ENV_PREFIX, overrides=overrides)
        if config.tls is not None:
            config.tls.files().read()  # unreadable certificates fail here, in one line
        resolve_device(config.device)  # "cuda" on a machine without CUDA fails here
    except (ConfigError, PkiError) as exc:
        print(f"gptfl-synth: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(
        fmt=config.log_format,
        level=logging.DEBUG if args.verbose else logging.INFO,
        name="synth_service",
    )
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        service = start_synth_service(config)
    except (GptflError, OSError, RuntimeError) as exc:
        # RuntimeError: grpcio reports an address already in use this way.
        print(f"gptfl-synth: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    service.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
