"""``gptfl models``: the architectures this installation resolves, and their fingerprints;
``gptfl models import``: a job's initial model from a ``transformers`` checkpoint folder.

Run ``gptfl models`` on the coordinator's and a silo's machine: a name whose provider,
version or layout differs between the two is what the coordinator refuses at registration
(docs/models.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gptfl.errors import EXIT_FAILURE, EXIT_OK
from gptfl.models import ModelSpec
from gptfl.models.fingerprint import SHORT_DIGEST, local_fingerprints
from gptfl.models.registry import plugin_problems
from gptfl.weights_io import save_weights


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
            (
                f.arch,
                f.provider,
                f.provider_version,
                f.layout_sha256[:SHORT_DIGEST] or "(by version)",
            )
            for f in found
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
            print(line.rstrip())
        for message in problems.values():
            print(f"not registered: {message}")
    return EXIT_FAILURE if problems else EXIT_OK


def _cmd_import(args: argparse.Namespace) -> int:
    # Imported here: the loader imports transformers' model code (seconds), listing does not.
    from gptfl.models.hf_pretrained import load_pretrained

    spec = ModelSpec(
        arch=args.arch,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        image_size=args.image_size,
    )
    model, report = load_pretrained(
        spec, Path(args.source), keep_head=args.keep_head, seed=args.seed
    )
    metadata = {
        "pretrained": {**report.provenance(), "model": spec.model_dump(), "seed": args.seed}
    }
    save_weights(Path(args.out), model.state_dict(), metadata=metadata)
    head = "kept" if not report.fresh else f"new ({spec.num_classes} classes, seed {args.seed})"
    print(
        f"{args.out}: {spec.arch} for {spec.in_channels}x{spec.image_size}x{spec.image_size} "
        f"inputs from {args.source}: {report.copied} tensors copied, head {head}, "
        f"{len(report.resized)} resized, {report.dropped} dropped"
    )
    print(f"use it as the job spec's initial_model (with model: {json.dumps(spec.model_dump())})")
    return EXIT_OK


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
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    imported = actions.add_parser(
        "import",
        help="write a job's initial model from a transformers from_pretrained folder",
        description=(
            "Builds ARCH (resnet18-gn, resnet50-gn, convnext-tiny, vit-b16) for the given "
            "shape, copies the backbone of the checkpoint in --from into it (a new head "
            "unless --keep-head fits) and writes a safetensors file for the job spec's "
            "initial_model."
        ),
    )
    imported.add_argument("--arch", required=True, help="a transformers zoo architecture")
    imported.add_argument("--num-classes", type=int, required=True)
    imported.add_argument("--in-channels", type=int, default=3, help="1 or 3 (default 3)")
    imported.add_argument("--image-size", type=int, required=True)
    imported.add_argument(
        "--from", dest="source", required=True, metavar="DIR", help="the from_pretrained folder"
    )
    imported.add_argument("--out", required=True, help="the safetensors file to write")
    imported.add_argument(
        "--keep-head", action="store_true", help="keep the checkpoint's head if it fits"
    )
    imported.add_argument("--seed", type=int, default=0, help="seeds the new head (default 0)")
    imported.set_defaults(handler=_cmd_import)
