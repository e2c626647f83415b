"""The umbrella command line: ``gptfl <command> ...``.

Each command lives in its own module under ``gptfl.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` to a function taking the
parsed arguments and returning an exit code. Errors derived from
:class:`gptfl.errors.GptflError`, and failed gRPC calls, become one line on stderr and a
documented exit code (:mod:`gptfl.cli.exit_codes`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gptfl import __version__
from gptfl.cli.exit_codes import run_command
from gptfl.errors import EXIT_USAGE

# Modules that contribute a sub-command (each has `register(subparsers)`).
COMMAND_MODULES = (
    "gptfl.cli.pki_cmd",
    "gptfl.cli.admin_cmd",
    "gptfl.cli.demo_cmd",
    "gptfl.cli.federate_cmd",
    "gptfl.cli.synth_cmd",
    "gptfl.cli.models_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptfl", description="GPT-FL: federated learning from a synthetic-data start."
    )
    parser.add_argument("--version", action="version", version=f"gpt-fl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run_command("gptfl", lambda: int(handler(args)))


if __name__ == "__main__":
    sys.exit(main())
