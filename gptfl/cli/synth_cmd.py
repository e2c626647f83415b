"""``gptfl synth ...``: reproduce a synthetic dataset from its manifest; call a synth service.

``regenerate`` runs the generator locally (no service), so it needs the synth service's
library (``synth_service``, installed with this package) and diffusers; both are imported
only when that command runs, so the rest of ``gptfl`` neither loads diffusers nor depends on
a service package. ``generate`` and ``pretrain`` are admin calls to a running service over
mutual TLS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from gptfl.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, ChecksumError
from gptfl.models import ModelSpec
from gptfl.synth_client import EpochInfo, SynthClient, SynthProgress
from gptfl.synth_spec import FIT_MODES, GeneratorSettings, PretrainSettings, SynthesisRequest
from gptfl.tls_config import TlsConfig
from gptfl.weights_io import save_weights

DEFAULT_ADDRESS = "127.0.0.1:50061"


def register(subparsers: Any) -> None:
    synth = subparsers.add_parser(
        "synth", help="synthetic datasets: regenerate, generate, pretrain"
    )
    synth.set_defaults(handler=lambda _a: _help(synth))
    commands = synth.add_subparsers(dest="synth_command", metavar="ACTION")

    regen = commands.add_parser(
        "regenerate",
        help="reproduce a dataset from its manifest and check every shard's sha256",
    )
    regen.add_argument("--manifest", type=Path, required=True, help="manifest.json or its folder")
    regen.add_argument("--generator", type=Path, required=True, help="the generator's model folder")
    regen.add_argument("--out", type=Path, help="write the regenerated artifact here")
    regen.add_argument("--device", default="cpu", help="cpu (bit-exact), cuda, cuda:N, auto")
    regen.add_argument("--batch-size", type=int, default=32, help="images per generator call")
    regen.set_defaults(handler=_regenerate)

    generate = commands.add_parser("generate", help="ask a synth service for a dataset (admin)")
    _connection_options(generate)
    generate.add_argument("--backend", default="class-conditional")
    generate.add_argument("--generator", default="digits", help="folder under its models_dir")
    generate.add_argument("--labels", required=True, help="comma-separated label names")
    generate.add_argument("--images-per-label", type=int, required=True)
    generate.add_argument("--channels", type=int, default=1, help="1 or 3")
    generate.add_argument("--image-size", type=int, required=True)
    generate.add_argument("--resize-mode", default="stretch", choices=FIT_MODES)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--guidance-min", type=float, default=1.0)
    generate.add_argument("--guidance-max", type=float, default=1.0)
    generate.add_argument("--steps", type=int, help="inference steps (backend default)")
    generate.set_defaults(handler=_with_client(_generate))

    pretrain = commands.add_parser("pretrain", help="train a model on a stored dataset (admin)")
    _connection_options(pretrain)
    pretrain.add_argument("--dataset-id", required=True)
    pretrain.add_argument("--arch", default="cnn-small")
    pretrain.add_argument("--classes", type=int, required=True)
    pretrain.add_argument("--channels", type=int, default=1)
    pretrain.add_argument("--image-size", type=int, required=True)
    pretrain.add_argument("--epochs", type=int, default=10)
    pretrain.add_argument("--out", type=Path, required=True, help="model.safetensors")
    pretrain.set_defaults(handler=_with_client(_pretrain))


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synth", default=DEFAULT_ADDRESS, help=f"address ({DEFAULT_ADDRESS})")
    parser.add_argument(
        "--certs",
        type=Path,
        default=Path("pki/admin"),
        help="folder with ca.pem, cert.pem, key.pem of the admin identity (default pki/admin)",
    )
    parser.add_argument("--server-name", help="TLS name of the service, if not its address")
    parser.add_argument("--insecure", action="store_true", help="plaintext (development only)")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _regenerate(args: argparse.Namespace) -> int:
    # Imported here: loads torch and diffusers (see the module docstring).
    from synth_service.artifacts import (
        check_artifact_target,
        manifest_sha256,
        read_manifest,
        regenerate,
        write_artifact,
    )
    from synth_service.generators import load_generator, load_options

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
        print(f"gptfl synth regenerate: MISMATCH: {exc}", file=sys.stderr)
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


def _with_client(
    action: Callable[[SynthClient, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        tls = None if args.insecure else TlsConfig.from_dir(args.certs).files()
        try:
            with SynthClient(args.synth, tls=tls, server_name=args.server_name) as client:
                return action(client, args)
        except grpc.RpcError as exc:
            code = exc.code()
            print(f"gptfl synth: {code.name}: {exc.details()}", file=sys.stderr)
            return EXIT_UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE else EXIT_FAILURE

    return handler


def _show_progress(progress: SynthProgress) -> None:
    print(f"{progress.stage}: {progress.message}", file=sys.stderr)


def _show_epoch(epoch: EpochInfo) -> None:
    print(
        f"epoch {epoch.epoch}/{epoch.epochs}: train loss {epoch.train_loss:.4f}, "
        f"val accuracy {epoch.val_accuracy:.4f}",
        file=sys.stderr,
    )


def _generate(client: SynthClient, args: argparse.Namespace) -> int:
    request = SynthesisRequest(
        labels=[label.strip() for label in args.labels.split(",") if label.strip()],
        images_per_label=args.images_per_label,
        in_channels=args.channels,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        seed=args.seed,
        guidance_min=args.guidance_min,
        guidance_max=args.guidance_max,
    )
    info = client.generate(
        backend=args.backend,
        generator=args.generator,
        request=request,
        generator_settings=GeneratorSettings(num_inference_steps=args.steps),
        on_progress=_show_progress,
    )
    print(json.dumps(asdict(info), indent=2))
    return EXIT_OK


def _pretrain(client: SynthClient, args: argparse.Namespace) -> int:
    spec = ModelSpec(
        arch=args.arch,
        num_classes=args.classes,
        in_channels=args.channels,
        image_size=args.image_size,
    )
    outcome = client.pretrain(
        dataset_id=args.dataset_id,
        model=spec,
        settings=PretrainSettings(epochs=args.epochs),
        on_epoch=_show_epoch,
    )
    save_weights(
        args.out,
        outcome.weights,
        metadata={"source": "gptfl synth pretrain", "dataset_id": outcome.dataset_id},
    )
    print(
        json.dumps(
            {
                "out": str(args.out),
                "initial_val_accuracy": outcome.initial_val_accuracy,
                "final_val_accuracy": outcome.final_val_accuracy,
                "seconds": outcome.seconds,
                "device": outcome.device,
            },
            indent=2,
        )
    )
    return EXIT_OK
