"""What DP-SGD costs a silo per local epoch, against the same training without DP.

The same model, data, batch size and loop (:func:`gptfl.training.run_epochs`) with and without
Opacus: plain SGD over the seeded shuffled loader, and DP-SGD through
``PrivacyEngine.make_private`` (Poisson batches of the same expected size, per-sample
clipping, noise) in each of Opacus's per-sample gradient modes: ``hooks`` (module hooks, the
default), ``ew`` (PyTorch's expanded weights) and ``functorch`` (``torch.func`` vmap). Each
repeat builds everything afresh, as a silo does for each task (the modes take turns within
a repeat), and times

- the first epoch (``cold``: what a one-epoch task costs, engine set-up included) and
- a second epoch on the same objects (``warm``: the steady cost of an epoch).

The figures are medians over the repeats; the DP/plain ratios are of the medians. One torch
thread, as each silo of the demo runs with. The accounting a DP silo adds per round (an RDP
epsilon over the job's history, by Opacus, cached within a round) is timed too.

    python -m bench.dp [--repeats 7] [--examples 1024] [--batches 32,128] [--models cnn-small]
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine

from bench.machine import format_table, load_average, machine, median, stamp, write_result
from gptfl.data import ArrayDataset, SklearnDigitsSource, load_source
from gptfl.models import ModelSpec, build_model
from gptfl.task import LocalSettings
from gptfl.training import make_loader, make_optimizer, run_epochs
from silo_agent.dp_budget import Mechanism, epsilon
from silo_agent.trainer import without_inplace_activations

CPU = torch.device("cpu")
MODES = ("plain", "hooks", "ew", "functorch")
GOAL_MULTIPLE = 2.5
SHAPES = {"cnn-small": (1, 8), "resnet20": (3, 32)}


def _data(arch: str, examples: int) -> ArrayDataset:
    channels, size = SHAPES[arch]
    digits = load_source(
        SklearnDigitsSource(kind="sklearn-digits", split="all"),
        in_channels=channels,
        image_size=size,
    )
    return digits.subset(np.arange(min(examples, len(digits))))


def _one_run(
    arch: str, data: ArrayDataset, batch: int, mode: str, seed: int
) -> tuple[float, float]:
    """(cold, warm) seconds of one fresh model/optimizer/loader: epoch 1 with the set-up,
    then epoch 2."""
    channels, size = SHAPES[arch]
    spec = ModelSpec(arch=arch, num_classes=10, in_channels=channels, image_size=size)
    settings = LocalSettings(epochs=1, batch_size=batch, learning_rate=0.05, seed=seed)
    started = time.perf_counter()
    model = without_inplace_activations(build_model(spec, seed=seed))
    optimizer: Any = make_optimizer(model, settings)
    loader: Any = make_loader(data, batch_size=batch, seed=seed)
    trained: Any = model
    if mode != "plain":
        trained, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
            grad_sample_mode=mode,
        )
    run_epochs(trained, optimizer, loader, epochs=1, device=CPU)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    run_epochs(trained, optimizer, loader, epochs=1, device=CPU)
    return cold, time.perf_counter() - started


def measure(
    arch: str, examples: int, batch: int, repeats: int
) -> dict[str, dict[str, float | str]]:
    """Every mode once per repeat, in turn, so that a change in the machine's load during the
    bench falls on all of them alike."""
    data = _data(arch, examples)
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    errors: dict[str, str] = {}
    for seed in range(repeats):
        for mode in MODES:
            if mode in errors:
                continue
            try:
                runs[mode].append(_one_run(arch, data, batch, mode, seed))
            except Exception as exc:  # noqa: BLE001 - a mode that fails is reported, not fatal
                errors[mode] = f"{type(exc).__name__}: {str(exc)[:200]}"
    results: dict[str, dict[str, float | str]] = {}
    for mode in MODES:
        if mode in errors:
            results[mode] = {"error": errors[mode]}
        else:
            results[mode] = {
                "cold_s": median(c for c, _ in runs[mode]),
                "warm_s": median(w for _, w in runs[mode]),
            }
        print(f"  {arch} batch {batch} {mode}: {results[mode]}", flush=True)
    plain = results["plain"]
    for mode in MODES[1:]:
        entry = results[mode]
        if "warm_s" in entry:
            entry["warm_x"] = float(entry["warm_s"]) / float(plain["warm_s"])
            entry["cold_x"] = float(entry["cold_s"]) / float(plain["cold_s"])
    return results


def accounting_seconds(repeats: int) -> float:
    """One uncached RDP epsilon of a 30-round job's history, as a silo computes per round."""
    times = []
    for i in range(repeats):
        history = [Mechanism(1.0 + i / 1000, 0.25, 4 * 30)]  # a new history each time
        started = time.perf_counter()
        epsilon(history, delta=1e-5, accountant="rdp")
        times.append(time.perf_counter() - started)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--models", default="cnn-small")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)  # Opacus's secure-RNG and hook notes
    load_before = load_average()
    started = stamp()
    table: dict[str, Any] = {}
    rows = []
    for arch in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            results = measure(arch, args.examples, batch, args.repeats)
            table[f"{arch}/batch{batch}"] = results
            plain = results["plain"]
            for mode in MODES:
                entry = results[mode]
                if "error" in entry:
                    rows.append([arch, batch, mode, "-", "-", "-", "-", str(entry["error"])[:60]])
                    continue
                rows.append(
                    [
                        arch,
                        batch,
                        mode,
                        float(entry["warm_s"]),
                        float(entry["warm_s"]) / float(plain["warm_s"]),
                        float(entry["cold_s"]),
                        float(entry["cold_s"]) / float(plain["cold_s"]),
                        "",
                    ]
                )
    accounting = accounting_seconds(args.repeats)
    result = {
        "bench": "dp",
        "started": started,
        "finished": stamp(),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "settings": {
            "repeats": args.repeats,
            "examples": args.examples,
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
            "torch_threads": 1,
        },
        "goal_multiple": GOAL_MULTIPLE,
        "results": table,
        "rdp_epsilon_seconds": accounting,
    }
    path = write_result("dp", result)
    headers = ["model", "batch", "mode", "warm epoch s", "x plain", "cold task s", "x plain", ""]
    print(format_table(headers, rows))
    print(f"one uncached RDP epsilon: {accounting:.3f}s; load {load_before} -> {load_average()}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
