"""``gptfl models``: the architectures this installation resolves, and their fingerprints.

Run it on the coordinator's and a silo's machine: a name whose provider, version or layout
differs between the two is what the coordinator refuses at registration (docs/models.md).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gptfl.errors import EXIT_FAILURE, EXIT_OK
from gptfl.models.fingerprint import SHORT_DIGEST, local_fingerprints
from gptfl.models.registry import plugin_problems


def _cmd_models(args: argparse.Namespace) -> int:
    found = local_fingerprints()
    problems = plugin_problems()
    if args.json:
        document: dict[str, Any] = {
            "architectures": [
                {
                    "arch": f.arch,
                    "provider": f.provider,
                    "provider_version": f.provider_version,
                    "layout_sha256": f.layout_sha256,
                }
                for f in found
            ],
            "problems": problems,
        }
        print(json.dumps(document, indent=2))
    else:
        rows = [("arch", "provider", "version", "layout")] + [
            (f.arch, f.provider, f.provider_version, f.layout_sha256[:SHORT_DIGEST]) for f in found
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
            print(line.rstrip())
        for message in problems.values():
            print(f"not registered: {message}")
    return EXIT_FAILURE if problems else EXIT_OK


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model architectures this installation resolves",
        description=(
            "Lists every model architecture (built-in and from installed packages' "
            "'gptfl.models' entry points) with its provider, version and parameter-layout "
            "digest; entry points that could not be registered are listed with the reason "
            "(exit 1)."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_cmd_models)
