"""The synth service on the CPU with the demo's settings: generation images/s, pretrain time.

The demo's own pretrain section (``gptfl.cli.demo_cmd.digits_pretrain_section``: the bundled
class-conditional digits generator, 200 images per digit, 20 DPM-Solver++ steps, guidance 1.0,
``ink-box`` framing to 1x8x8; cnn-small trained for 30 epochs with SGD and a cosine schedule)
runs through the real service: ``gptfl-synth`` as a process started by
:class:`gptfl.local_cluster.LocalCluster` (mTLS on 127.0.0.1, ``torch_threads`` as the demo
gives it), called with :class:`gptfl.synth_client.SynthClient`. Each run is one Generate and
one Pretrain on the same warm process; the first Generate also loads the generator.

Reported per run: the service's own wall time of Generate (``DatasetInfo.seconds``: loading
on the first run, sampling, resizing, storing) and images/s from it; the client's wall time
of the call; Pretrain's service time and the client's (which adds receiving the weights); the
final synthetic validation accuracy. The table gives the median over ``--runs``.

    python -m bench.synth [--runs 3] [--threads 1] [--images-per-label 200] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import format_table, load_average, machine, median, stamp, write_result
from gptfl.cli.demo_cmd import digits_pretrain_section
from gptfl.local_cluster import LocalCluster
from gptfl.models import ModelSpec
from gptfl.pki import participant_files
from gptfl.synth_client import SynthClient
from gptfl.synth_spec import GeneratorSettings, PretrainSettings, SynthesisRequest

MODEL = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)


def run(*, runs: int, threads: int, images_per_label: int, epochs: int) -> dict[str, Any]:
    section = digits_pretrain_section(images_per_label=images_per_label, epochs=epochs)
    request = SynthesisRequest(
        labels=list(section["labels"]),
        images_per_label=images_per_label,
        in_channels=MODEL.in_channels,
        image_size=MODEL.image_size,
        **section["generation"],
    )
    generator_settings = GeneratorSettings(**section["generator_settings"])
    settings = PretrainSettings(**section["training"])
    load_before = load_average()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        cluster = LocalCluster(Path(tmp), silos=[], torch_threads=threads)
        cluster.provision()
        try:
            address = cluster.start_synth()
            tls = participant_files(cluster.pki_dir, "coordinator")
            with SynthClient(address, tls=tls) as client:
                client.wait_ready(60)
                for number in range(1, runs + 1):
                    started = time.perf_counter()
                    info = client.generate(
                        backend=section["backend"],
                        generator=section["generator"],
                        request=request,
                        generator_settings=generator_settings,
                    )
                    generate_wall = time.perf_counter() - started
                    started = time.perf_counter()
                    outcome = client.pretrain(
                        dataset_id=info.dataset_id, model=MODEL, settings=settings
                    )
                    pretrain_wall = time.perf_counter() - started
                    result = {
                        "run": number,
                        "images": info.images,
                        "generate_service_s": info.seconds,
                        "generate_client_s": generate_wall,
                        "images_per_s": info.images / info.seconds,
                        "pretrain_service_s": outcome.seconds,
                        "pretrain_client_s": pretrain_wall,
                        "epochs": len(outcome.epochs),
                        "seconds_per_epoch": median(e.seconds for e in outcome.epochs),
                        "initial_val_accuracy": outcome.initial_val_accuracy,
                        "final_val_accuracy": outcome.final_val_accuracy,
                        "device": info.device,
                        "dataset_id": info.dataset_id,
                    }
                    results.append(result)
                    print(json.dumps(result), file=sys.stderr)
        finally:
            cluster.stop()
    return {
        "bench": "synth",
        "when": stamp(),
        "settings": {
            "runs": runs,
            "torch_threads": threads,
            "backend": section["backend"],
            "generator": section["generator"],
            "request": request.model_dump(),
            "generator_settings": generator_settings.model_dump(),
            "pretrain": settings.model_dump(),
            "model": MODEL.model_dump(),
        },
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "runs": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="the service's torch threads")
    parser.add_argument("--images-per-label", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, help="JSON result (bench/results/synth.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(
        runs=args.runs,
        threads=args.threads,
        images_per_label=args.images_per_label,
        epochs=args.epochs,
    )
    runs = result["runs"]
    figures = [
        ("generate (service)", "generate_service_s"),
        ("generate (client wall)", "generate_client_s"),
        ("images/s (service)", "images_per_s"),
        ("pretrain (service)", "pretrain_service_s"),
        ("pretrain (client wall)", "pretrain_client_s"),
        ("synthetic val accuracy", "final_val_accuracy"),
    ]
    rows = [
        [name, *(stat([r[key] for r in runs]) for stat in (median, min, max))]
        for name, key in figures
    ]
    print(format_table(["figure", "median", "min", "max"], rows))
    load = f"load {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after"
    print(f"{len(runs)} runs, {args.threads} torch thread(s), {load}")
    path = write_result("synth", result, args.out)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
