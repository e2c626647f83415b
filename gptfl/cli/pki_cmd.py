"""``gptfl pki ...``: create a deployment's CA and identities, onboard silos, inspect certs.

See ``docs/pki.md`` for the directory layout and what to hand to each participant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gptfl import pki
from gptfl.errors import EXIT_OK, EXIT_USAGE


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _silo_list(text: str) -> list[str]:
    # "a, b,c" -> ["a", "b", "c"]; ids are validated (with a message naming the bad one) later.
    return [item.strip() for item in text.split(",") if item.strip()]


def _cmd_init(args: argparse.Namespace) -> int:
    silos = [silo for group in args.silos for silo in group]
    pki.init_pki(
        Path(args.out),
        coordinator_hosts=args.coordinator_host,
        silos=silos,
        admin=args.admin,
        synth_hosts=args.synth_host or pki.DEFAULT_SYNTH_HOSTS,
        days=args.days,
        force=args.force,
    )
    print(
        f"PKI written to {args.out}: coordinator, synth, admin {args.admin!r}, "
        f"silos {', '.join(silos) or '(none)'}"
    )
    print(f"hand each folder under {args.out} (never ca/) to its participant; see docs/pki.md")
    return EXIT_OK


def _cmd_add_silo(args: argparse.Namespace) -> int:
    files = pki.add_silo(Path(args.pki), args.silo, days=args.days, force=args.force)
    print(f"silo {args.silo!r} issued: hand {files.cert.parent} to the silo")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    cert = pki.load_certificate(Path(args.cert))
    fields = pki.describe_certificate(cert)
    width = max(len(label) for label, _ in fields) + 1
    for label, value in fields:
        print(f"{label + ':':<{width}} {value}")
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``pki`` command and its sub-commands to the umbrella CLI."""
    parser = subparsers.add_parser(
        "pki",
        help="create and inspect the mutual-TLS identities of a deployment",
        description="Create and inspect the mutual-TLS identities of a deployment.",
    )
    commands = parser.add_subparsers(dest="pki_command", metavar="PKI_COMMAND")
    parser.set_defaults(handler=lambda _args: _print_help(parser))

    init = commands.add_parser(
        "init",
        help="create a CA and certificates for the coordinator, synth service, admin and silos",
    )
    init.add_argument("--out", required=True, metavar="DIR", help="PKI directory to create")
    init.add_argument(
        "--coordinator-host",
        action="append",
        required=True,
        metavar="HOST",
        help="DNS name or IP the coordinator is reached at (repeatable; localhost and "
        "127.0.0.1 are always added)",
    )
    init.add_argument(
        "--silos",
        action="append",
        type=_silo_list,
        required=True,
        metavar="ID[,ID...]",
        help="comma-separated silo ids (repeatable)",
    )
    init.add_argument("--admin", default="admin", help="admin name (default: admin)")
    init.add_argument(
        "--synth-host",
        action="append",
        metavar="HOST",
        help="DNS name or IP the synth service is reached at (repeatable; default: "
        "localhost and 127.0.0.1)",
    )
    init.add_argument(
        "--days", type=_positive_int, default=365, help="certificate validity (default: 365)"
    )
    init.add_argument("--force", action="store_true", help="replace an existing PKI in DIR")
    init.set_defaults(handler=_cmd_init)

    add = commands.add_parser("add-silo", help="issue one more silo identity from the CA")
    add.add_argument("--pki", required=True, metavar="DIR", help="existing PKI directory")
    add.add_argument("--silo", required=True, metavar="ID", help="the new silo's id")
    add.add_argument(
        "--days", type=_positive_int, default=365, help="certificate validity (default: 365)"
    )
    add.add_argument("--force", action="store_true", help="reissue an existing silo")
    add.set_defaults(handler=_cmd_add_silo)

    show = commands.add_parser("show", help="print a certificate's identity and validity")
    show.add_argument("cert", metavar="CERT.pem", help="a PEM certificate file")
    show.set_defaults(handler=_cmd_show)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE
