"""``gptfl synth ...``: admin calls to a running synth service over mutual TLS.

``generate`` asks the service for a dataset, ``pretrain`` for a model trained on one.
Reproducing a dataset from its manifest runs the generator locally, so it belongs to the
synth service's program: ``gptfl-synth regenerate`` (``synth_service/regenerate_cmd.py``);
the shared core imports no service package.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from gptfl.cli.exit_codes import report_rpc_error
from gptfl.errors import EXIT_OK
from gptfl.models import ModelSpec
from gptfl.synth_client import EpochInfo, SynthClient, SynthProgress
from gptfl.synth_spec import FIT_MODES, GeneratorSettings, PretrainSettings, SynthesisRequest
from gptfl.tls_config import TlsConfig
from gptfl.weights_io import save_weights

DEFAULT_ADDRESS = "127.0.0.1:50061"


def register(subparsers: Any) -> None:
    synth = subparsers.add_parser(
        "synth",
        help="ask a synth service for a dataset or a pretrained model",
        epilog="To reproduce a dataset from its manifest: gptfl-synth regenerate --help",
    )
    synth.set_defaults(handler=lambda _a: _help(synth))
    commands = synth.add_subparsers(dest="synth_command", metavar="ACTION")

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


def _with_client(
    action: Callable[[SynthClient, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        tls = None if args.insecure else TlsConfig.from_dir(args.certs).files()
        try:
            with SynthClient(args.synth, tls=tls, server_name=args.server_name) as client:
                return action(client, args)
        except grpc.RpcError as exc:
            return report_rpc_error("gptfl synth", exc, peer="synth service")

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
