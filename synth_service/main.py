"""``gptfl-synth --config synth.yaml``: runs the synth service until SIGTERM/SIGINT.

``gptfl-synth regenerate ...`` reproduces a dataset from its manifest instead, without a
service (:mod:`synth_service.regenerate_cmd`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch

from gptfl import atomic_io
from gptfl.errors import EXIT_CONFIG, ConfigError
from gptfl.logging_setup import configure_logging
from gptfl.service_process import (
    load_service_config,
    serve_until_signal,
    service_parser,
)
from gptfl.training import resolve_device
from synth_service import regenerate_cmd
from synth_service.config import ENV_PREFIX, SynthConfig
from synth_service.server import start_synth_service

REGENERATE = "regenerate"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [REGENERATE]:
        return regenerate_cmd.main(argv[1:])
    parser = service_parser(
        prog="gptfl-synth",
        description="Run the GPT-FL synth service (synthetic data generation and pretraining).",
        config_name="synth.yaml",
    )
    parser.epilog = (
        f"gptfl-synth {REGENERATE} ... reproduces a dataset from its manifest instead "
        f"(gptfl-synth {REGENERATE} --help)"
    )
    args = parser.parse_args(argv)
    try:
        config, _ = load_service_config(SynthConfig, args, env_prefix=ENV_PREFIX, role="synth")
    except ConfigError as exc:
        print(f"gptfl-synth: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        resolve_device(config.device)  # "cuda" on a machine without CUDA fails here
    except ConfigError as exc:
        print(f"gptfl-synth: {args.config.name}: device: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        atomic_io.ensure_writable_dir(config.data_dir, key="data_dir")
    except ConfigError as exc:
        print(f"gptfl-synth: {args.config.name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(
        fmt=config.log_format,
        level=logging.DEBUG if args.verbose else logging.INFO,
        name="synth_service",
    )
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    return serve_until_signal("gptfl-synth", lambda: start_synth_service(config))


if __name__ == "__main__":
    sys.exit(main())
