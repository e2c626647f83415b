"""``gptfl-synth --config synth.yaml``: runs the synth service until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch

from gptfl.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, GptflError, PkiError
from gptfl.logging_setup import configure_logging
from gptfl.service_process import (
    load_service_config,
    service_parser,
    stop_on_signals,
    wait_for_stop,
)
from gptfl.training import resolve_device
from synth_service.config import ENV_PREFIX, SynthConfig
from synth_service.server import start_synth_service


def main(argv: Sequence[str] | None = None) -> int:
    args = service_parser(
        prog="gptfl-synth",
        description="Run the GPT-FL synth service (synthetic data generation and pretraining).",
        config_name="synth.yaml",
    ).parse_args(argv)
    try:
        config = load_service_config(SynthConfig, args, env_prefix=ENV_PREFIX)
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
    wait_for_stop(stop_on_signals())
    service.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
