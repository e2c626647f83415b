"""``gptfl-synth regenerate``: reproduce a synthetic dataset from its manifest, bit for bit.

Runs the generator locally, without a service: the manifest names the generator (its content
hash and settings), the per-image labels, prompts, seeds and guidance, and every shard's
sha256, so the same generator folder renders the same images and each shard's sha256 is
checked against the manifest. Part of the synth service's program because it needs the
service's generators (and diffusers); ``gptfl`` itself imports no service package.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gptfl.cli.exit_codes import run_command
from gptfl.errors import EXIT_FAILURE, EXIT_OK, ChecksumError
from synth_service.artifacts import (
    check_artifact_target,
    manifest_sha256,
    read_manifest,
    regenerate,
    write_artifact,
)
from synth_service.generators import load_generator, load_options

PROG = "gptfl-synth regenerate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Reproduce a synthetic dataset from its manifest and check every shard's "
        "sha256. Exit 0: identical; 1: a mismatch or another generator; 3: unusable input.",
    )
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.json or its folder")
    parser.add_argument(
        "--generator", type=Path, required=True, help="the generator's model folder"
    )
    parser.add_argument("--out", type=Path, help="write the regenerated artifact here")
    parser.add_argument("--device", default="cpu", help="cpu (bit-exact), cuda, cuda:N, auto")
    parser.add_argument("--batch-size", type=int, default=32, help="images per generator call")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_command(PROG, lambda: _regenerate(args))


def _regenerate(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.manifest)
    generator = load_generator(
        manifest.backend,
        args.generator,
        device=args.device,
        **load_options(manifest.backend, manifest.generator_settings),
    )
    total = len(manifest.image_labels)
    started = time.perf_counter()

    def progress(done: int, all_images: int) -> None:
        print(f"\rregenerating: {done}/{all_images} images", end="", file=sys.stderr)

    if args.out is not None:
        check_artifact_target(args.out)  # before the work, not after it
    try:
        dataset = regenerate(manifest, generator, batch_size=args.batch_size, progress=progress)
    except ChecksumError as exc:
        print(file=sys.stderr)
        print(f"{PROG}: MISMATCH: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(file=sys.stderr)
    if args.out is not None:
        write_artifact(dataset, args.out)
    print(
        json.dumps(
            {
                "identical": True,
                "dataset_id": manifest.dataset_sha256,
                "manifest_sha256": manifest_sha256(manifest),
                "images": total,
                "shards": len(manifest.shards),
                "seconds": round(time.perf_counter() - started, 3),
                "out": str(args.out) if args.out is not None else None,
            },
            indent=2,
        )
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
