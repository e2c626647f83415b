"""GPT-FL against FL from scratch, and the levers that move the gap (docs/gptfl-results.md).

Runs the demo's federation **in one process**, as an exact replica of what the real processes
compute, so that dozens of 30-round runs fit on a shared 2-core machine:

- synthetic data: the bundled digits generator sampled with the same per-image seeds as the
  synth service (:func:`synth_service.generators.plan_images`), fitted to 8x8 with
  :func:`synth_service.resize.fit_images` and quantised to uint8 like an artifact's shards;
- pretraining: :func:`synth_service.pretrain.pretrain`, as the synth service runs it;
- silos: the demo's Dirichlet parts of scikit-learn's digits (``gptfl.cli.demo_cmd``), 10%
  held out per silo as the agents do, local training with :func:`gptfl.training.train_local`
  and the coordinator's per-task seeds ``crc32("<seed>:<round>:<silo>")``;
- aggregation: :class:`coordinator.aggregation.RunningSum` and the job's strategy
  (:func:`coordinator.strategies.build_strategy`);
- test accuracy: the coordinator's server-side test split.

The only difference to the real processes is the order in which updates are summed (arrival
order there, silo order here), which changes float32 rounding: curves agree to the last digit
for the first rounds and within a few tenths of a point later (checked against ``gptfl demo``).

A *variant* changes one lever (see :data:`VARIANTS`); ``scratch`` and ``gptfl`` (the demo's
settings) are the two reference runs. Variants whose name ends in ``+scratch`` apply an FL
setting to the random start as well, so a lever that changes FL is always compared against a
baseline under the same FL settings. Results go to ``bench/results/gptfl_levers.json``
(incrementally: an interrupted sweep resumes) and, with ``--figures``, PNGs are drawn.

    python -m bench.gptfl_levers --seeds 0,1,2 --variants scratch,gptfl,stretch
    python -m bench.gptfl_levers --figures docs/figures     # plots from the stored results
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import RESULTS_DIR, load_average, machine, stamp
from coordinator.aggregation import RunningSum
from coordinator.strategies import build_strategy
from gptfl import atomic_io
from gptfl.cli.demo_cmd import digits_pretrain_section, digits_silos
from gptfl.data.dataset import ArrayDataset
from gptfl.data.partition import MAX_PARTITION_ATTEMPTS, split_fraction
from gptfl.data.sources import SklearnDigitsSource, load_source
from gptfl.job_spec import StrategySpec, strategy_spec
from gptfl.models import ModelSpec, build_model
from gptfl.synth_spec import PretrainSettings
from gptfl.task import LocalSettings
from gptfl.training import evaluate, train_local
from gptfl.weights import WeightMap

CPU = torch.device("cpu")
MODEL = ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)
CACHE_DIR = Path(".cache") / "gptfl-levers"
DEFAULT_OUT = RESULTS_DIR / "gptfl_levers.json"
#: the demo's pretraining settings (``digits_pretrain_section`` with the demo's defaults)
DEMO_PRETRAIN: dict[str, Any] = digits_pretrain_section(images_per_label=200, epochs=30)["training"]

Transform = Callable[[WeightMap, int], WeightMap]
ImageTransform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FlSettings:
    """The federation: the demo's, unless a variant says otherwise."""

    silos: int = 10
    alpha: float = 0.1
    rounds: int = 30
    learning_rate: float = 0.05
    batch_size: int = 32
    epochs: int = 1
    strategy: StrategySpec = strategy_spec()
    #: learning rate per round (1-based) instead of the constant ``learning_rate``
    schedule: Callable[[int], float] | None = None
    #: fraction of each silo's part held out for federated evaluation; None: the demo's setting
    hold_out: float | None = None
    #: inputs standardised with the pooled training mean and std (silos and test set alike)
    standardize: bool = False
    #: inputs multiplied by this (silos and test set alike); 16: the digits' raw 0-16 values
    input_scale: float = 1.0
    #: the silos' local SGD momentum
    momentum: float = 0.0
    #: ``"dirichlet"``: the demo's split; ``"balanced"``: :func:`balanced_dirichlet_parts`
    partition: str = "dirichlet"


@dataclass(frozen=True)
class Variant:
    """One lever, as a change to the demo's GPT-FL run (or to both runs)."""

    description: str
    pretrained: bool = True
    resize_mode: str = "ink-box"
    guidance: tuple[float, float] = (1.0, 1.0)
    images_per_label: int = 200
    images: ImageTransform | None = None
    pretrain: Mapping[str, Any] = field(default_factory=dict)
    transform: Transform | None = None
    fl: FlSettings = FlSettings()


def _random_init(seed: int) -> WeightMap:
    model = build_model(MODEL, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def conv_norm_like_init(weights: WeightMap, seed: int) -> WeightMap:
    """Rescales every conv kernel to the norm it had at random init.

    Each conv of ``cnn-small`` feeds a GroupNorm, so the network computes exactly the same
    function (same synthetic-only accuracy), but SGD's effective step on those kernels,
    which shrinks with the square of their norm, is back to what a fresh model gets.
    """
    init = _random_init(seed)
    return {
        k: v * (init[k].norm() / v.norm()) if v.ndim == 4 else v.clone() for k, v in weights.items()
    }


def reset_head(weights: WeightMap, seed: int) -> WeightMap:
    """The last linear layer back to its random initialisation (features kept)."""
    init = _random_init(seed)
    return {
        k: init[k].clone() if k.startswith("classifier.3.") else v.clone()
        for k, v in weights.items()
    }


def per_image_max(x: np.ndarray) -> np.ndarray:
    """Each image scaled so its brightest pixel is 1 (the real digits' ink saturates)."""
    peak = x.reshape(len(x), -1).max(axis=1).reshape(-1, 1, 1, 1)
    scaled: np.ndarray = np.where(peak > 0, x / np.maximum(peak, 1e-6), x)
    return scaled


def seventeen_levels(x: np.ndarray) -> np.ndarray:
    """Quantised to the real digits' 17 grey levels (0/16 .. 16/16)."""
    levels: np.ndarray = np.round(x * 16) / 16
    return levels


def _cosine_over_rounds(rounds: int, peak: float) -> Callable[[int], float]:
    return lambda r: peak * 0.5 * (1 + math.cos(math.pi * (r - 1) / rounds))


FEDADAM = strategy_spec(name="fedadam", server_learning_rate=0.01)

VARIANTS: dict[str, Variant] = {
    "scratch": Variant("FL from a seeded random initialisation", pretrained=False),
    "gptfl": Variant(
        "the demo: 200 images/digit, guidance 1.0, ink-box, 30 epochs SGD 0.05 cosine"
    ),
    "stretch": Variant("plain resize instead of ink-box framing", resize_mode="stretch"),
    "guidance-1-3": Variant(
        "label fidelity: guidance drawn from 1.0-3.0 (fidelity 90% -> 97.5%)",
        guidance=(1.0, 3.0),
    ),
    "pretrain-15": Variant("15 pretraining epochs instead of 30", pretrain={"epochs": 15}),
    "pretrain-wd5e-3": Variant(
        "pretraining weight decay 5e-3 instead of 5e-4", pretrain={"weight_decay": 5e-3}
    ),
    "conv-norm-reset": Variant(
        "weight norm: conv kernels rescaled to their init norm after pretraining",
        transform=conv_norm_like_init,
    ),
    "head-reset": Variant("last layer re-initialised after pretraining", transform=reset_head),
    "inputs-max1": Variant(
        "input normalisation: synthetic images scaled to a peak of 1", images=per_image_max
    ),
    "inputs-17-levels": Variant(
        "input normalisation: synthetic images quantised to 17 grey levels",
        images=seventeen_levels,
    ),
    "fedadam": Variant(
        "server optimizer FedAdam (eta 0.01) on GPT-FL", fl=FlSettings(strategy=FEDADAM)
    ),
    "fedadam+scratch": Variant(
        "server optimizer FedAdam (eta 0.01) from scratch",
        pretrained=False,
        fl=FlSettings(strategy=FEDADAM),
    ),
    "lr-cosine": Variant(
        "FL learning rate 0.05 decayed over the 30 rounds (cosine) on GPT-FL",
        fl=FlSettings(schedule=_cosine_over_rounds(30, 0.05)),
    ),
    "lr-cosine+scratch": Variant(
        "FL learning rate 0.05 decayed over the 30 rounds (cosine) from scratch",
        pretrained=False,
        fl=FlSettings(schedule=_cosine_over_rounds(30, 0.05)),
    ),
    "scratch-all-data": Variant(
        "FL from scratch, silos train on all of their part (no 10% held out)",
        pretrained=False,
        fl=FlSettings(hold_out=0.0),
    ),
    "scratch-standardized": Variant(
        "FL from scratch on standardised inputs (pooled training mean and std)",
        pretrained=False,
        fl=FlSettings(standardize=True),
    ),
    "scratch-raw-inputs": Variant(
        "FL from scratch on the digits' raw 0-16 values instead of [0, 1]",
        pretrained=False,
        fl=FlSettings(input_scale=16.0),
    ),
    "scratch-lr0.1": Variant(
        "FL from scratch with silo learning rate 0.1",
        pretrained=False,
        fl=FlSettings(learning_rate=0.1),
    ),
    "scratch-momentum": Variant(
        "FL from scratch with silo SGD momentum 0.9", pretrained=False, fl=FlSettings(momentum=0.9)
    ),
    "scratch-balanced-partition": Variant(
        "FL from scratch on FedML's capped Dirichlet split",
        pretrained=False,
        fl=FlSettings(partition="balanced"),
    ),
    "gptfl-balanced-partition": Variant(
        "the demo's GPT-FL run on FedML's capped Dirichlet split",
        fl=FlSettings(partition="balanced"),
    ),
    "gptfl-60": Variant("the demo's GPT-FL run for 60 rounds", fl=FlSettings(rounds=60)),
    "scratch-60": Variant(
        "FL from scratch for 60 rounds", pretrained=False, fl=FlSettings(rounds=60)
    ),
}


# ---- the pieces of the replica ----------------------------------------------------------------


def raw_synthetic(seed: int, guidance: tuple[float, float], per_label: int) -> np.ndarray:
    """The generator's 16x16 images (float in [0, 1]), label order, cached on disk."""
    from synth_service.generators import BUNDLED_DIGITS_GENERATOR, load_generator, plan_images

    path = CACHE_DIR / f"raw-seed{seed}-g{guidance[0]}-{guidance[1]}-n{per_label}.npy"
    if path.exists():
        cached: np.ndarray = np.load(path)
        return cached
    labels = [str(d) for d in range(10)]
    specs = plan_images(
        labels,
        images_per_label=per_label,
        prompts={label: [label] for label in labels},
        seed=seed,
        guidance_range=guidance,
        guidance_step=0.5,
    )
    generator = load_generator(
        "class-conditional", BUNDLED_DIGITS_GENERATOR, device="cpu", num_inference_steps=20
    )
    started = time.perf_counter()
    raw = generator.generate(specs, batch_size=32)
    print(f"  generated {len(specs)} images in {time.perf_counter() - started:.0f}s", flush=True)
    if [s.label for s in specs] != [str(d) for d in np.repeat(np.arange(10), per_label)]:
        raise RuntimeError("plan_images no longer lists the images label by label")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.save(path, raw)
    return raw


def synthetic_dataset(variant: Variant, seed: int) -> ArrayDataset:
    from synth_service.artifacts import quantize
    from synth_service.resize import fit_images

    raw = raw_synthetic(seed, variant.guidance, variant.images_per_label)
    x = fit_images(raw, in_channels=1, image_size=8, mode=variant.resize_mode)
    # As stored in an artifact: uint8 levels round(255 x).
    x = quantize(x).astype(np.float32) / np.float32(255.0)
    if variant.images is not None:
        x = variant.images(x).astype(np.float32)
    y = np.repeat(np.arange(10, dtype=np.int64), variant.images_per_label)
    return ArrayDataset(x=x, y=y)


def initial_model(variant: Variant, seed: int) -> tuple[WeightMap, float | None]:
    """The starting weights and the pretraining's final synthetic validation accuracy."""
    if not variant.pretrained:
        return _random_init(seed), None
    from synth_service.pretrain import pretrain

    settings = PretrainSettings(**{**DEMO_PRETRAIN, **variant.pretrain, "seed": seed})
    result = pretrain(MODEL, synthetic_dataset(variant, seed), settings)
    weights = dict(result.state_dict)
    if variant.transform is not None:
        weights = variant.transform(weights, seed)
    return weights, result.final_val_accuracy


def balanced_dirichlet_parts(
    labels: np.ndarray, *, count: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """FedML's Dirichlet split (the code base of the GPT-FL paper), for comparison only.

    Like :func:`gptfl.data.partition.dirichlet_partition`, but a part that already holds
    ``len(labels) / count`` examples gets nothing of the classes that follow, and draws repeat
    until every part holds at least 10: parts of more even size.
    """
    rng = np.random.default_rng(seed)
    fair_share = labels.shape[0] / count
    for _ in range(MAX_PARTITION_ATTEMPTS):
        parts: list[list[int]] = [[] for _ in range(count)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            weights = rng.dirichlet(np.full(count, alpha))
            weights = np.array(
                [w * (len(p) < fair_share) for w, p in zip(weights, parts, strict=True)]
            )
            cuts = (np.cumsum(weights / weights.sum()) * members.size).astype(np.int64)[:-1]
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= 10:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no capped Dirichlet(alpha={alpha}) split gave every part >= 10 examples")


def _silo_parts(fl: FlSettings, seed: int) -> list[tuple[str, ArrayDataset, float]]:
    """Each silo's id, part of the train split and held-out fraction (the demo's by default)."""
    plans = digits_silos(count=fl.silos, alpha=fl.alpha, seed=seed)
    if fl.partition == "dirichlet":
        return [
            (
                plan.silo_id,
                load_source(
                    SklearnDigitsSource.model_validate(plan.data["train"]),
                    in_channels=1,
                    image_size=8,
                ),
                plan.data["eval_fraction"],
            )
            for plan in plans
        ]
    train = load_source(
        SklearnDigitsSource(kind="sklearn-digits", split="train"), in_channels=1, image_size=8
    )
    parts = balanced_dirichlet_parts(np.asarray(train.y), count=fl.silos, alpha=fl.alpha, seed=seed)
    return [
        (plan.silo_id, train.subset(part), plan.data["eval_fraction"])
        for plan, part in zip(plans, parts, strict=True)
    ]


def silo_data(fl: FlSettings, seed: int) -> list[tuple[str, ArrayDataset]]:
    out = []
    for silo_id, data, eval_fraction in _silo_parts(fl, seed):
        hold_out = eval_fraction if fl.hold_out is None else fl.hold_out
        if hold_out:
            kept, _held = split_fraction(len(data), fraction=hold_out, seed=0)
            data = data.subset(kept)
        out.append((silo_id, data))
    return out


def rescaled(
    silos: list[tuple[str, ArrayDataset]], test: ArrayDataset, *, shift: float, divisor: float
) -> tuple[list[tuple[str, ArrayDataset]], ArrayDataset]:
    """Every input (silos and test set alike) as ``(x - shift) / divisor``."""

    def apply(d: ArrayDataset) -> ArrayDataset:
        return ArrayDataset(x=((np.asarray(d.x) - shift) / divisor).astype(np.float32), y=d.y)

    return [(s, apply(d)) for s, d in silos], apply(test)


def test_accuracy(weights: WeightMap, test: ArrayDataset) -> float:
    model = build_model(MODEL)
    model.load_state_dict(weights)
    return evaluate(model, test, device=CPU).accuracy


def federate(start: WeightMap, fl: FlSettings, seed: int, test: ArrayDataset) -> list[float]:
    """Test accuracy after each round, as the coordinator and silo agents compute it."""
    silos = silo_data(fl, seed)
    if fl.standardize:  # with the pooled training mean and std
        pooled = np.concatenate([np.asarray(d.x) for _, d in silos])
        silos, test = rescaled(silos, test, shift=float(pooled.mean()), divisor=float(pooled.std()))
    if fl.input_scale != 1.0:  # 16: exactly x * 16 (a power of two)
        silos, test = rescaled(silos, test, shift=0.0, divisor=1.0 / fl.input_scale)
    strategy = build_strategy(fl.strategy)
    weights = {k: v.clone() for k, v in start.items()}
    model = build_model(MODEL)
    curve = []
    for number in range(1, fl.rounds + 1):
        total = RunningSum(weights)
        lr = fl.learning_rate if fl.schedule is None else fl.schedule(number)
        for silo_id, data in silos:
            model.load_state_dict(weights)
            settings = LocalSettings(
                epochs=fl.epochs,
                batch_size=fl.batch_size,
                learning_rate=lr,
                momentum=fl.momentum,
                seed=zlib.crc32(f"{seed}:{number}:{silo_id}".encode()) & 0x7FFFFFFF,
            )
            result = train_local(model, data, settings, device=CPU)
            trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
            total.add(trained, result.num_examples)
        weights = strategy.apply(weights, total.mean())
        curve.append(test_accuracy(weights, test))
    return curve


def rounds_to(curve: list[float], level: float) -> int | None:
    return next((i for i, value in enumerate(curve, start=1) if value >= level), None)


# ---- sweep and figures ----------------------------------------------------------------------


def run_sweep(variants: list[str], seeds: list[int], out: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    runs: dict[str, Any] = results.setdefault("runs", {})
    test = load_source(
        SklearnDigitsSource(kind="sklearn-digits", split="test"), in_channels=1, image_size=8
    )
    for seed in seeds:
        for name in variants:
            key = f"{name}/seed{seed}"
            if key in runs:
                continue
            variant = VARIANTS[name]
            started, load_before = time.perf_counter(), load_average()
            weights, synthetic_val = initial_model(variant, seed)
            round0 = test_accuracy(weights, test)
            curve = federate(weights, variant.fl, seed, test)
            runs[key] = {
                "variant": name,
                "seed": seed,
                "round0": round0,
                "synthetic_val_accuracy": synthetic_val,
                "curve": curve,
                "rounds_to_90": rounds_to(curve, 0.90),
                "rounds_to_95": rounds_to(curve, 0.95),
                "seconds": time.perf_counter() - started,
                "load_before": load_before,
                "load_after": load_average(),
            }
            # Re-read first: sweeps over different seeds may run side by side.
            stored: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
            runs = {**stored.get("runs", {}), **runs}
            results.update(
                runs=runs,
                machine=machine(),
                updated=stamp(),
                descriptions={k: v.description for k, v in VARIANTS.items()},
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_io.write_text(out, json.dumps(results, indent=1) + "\n")
            print(_line(key, runs[key]), flush=True)
    return results


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _line(key: str, run: Mapping[str, Any]) -> str:
    curve = run["curve"]
    return (
        f"{key:<24} r0 {_pct(run['round0']):>5}  r1 {_pct(curve[0]):>5}  r5 {_pct(curve[4]):>5}"
        f"  r10 {_pct(curve[9]):>5}  r30 {_pct(curve[-1]):>5}  to90 {run['rounds_to_90']}"
        f"  to95 {run['rounds_to_95']}  ({run['seconds']:.0f}s)"
    )


def summary_table(results: Mapping[str, Any]) -> str:
    """Markdown: per variant, the mean over seeds at rounds 0/1/5/10/30 (and the last round
    when it is not 30) and the rounds to 90%/95% of each seed (``-``: not reached)."""
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for run in results["runs"].values():
        by_variant.setdefault(run["variant"], []).append(run)
    lines = [
        "| variant | seeds | round 0 | round 1 | round 5 | round 10 | round 30 | last round "
        "| rounds to 90% | rounds to 95% |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    order = [name for name in VARIANTS if name in by_variant]
    for name in order:
        runs = sorted(by_variant[name], key=lambda r: r["seed"])

        def mean_at(index: int, runs: list[Mapping[str, Any]] = runs) -> str:
            values = [[r["round0"], *r["curve"]][index] for r in runs]
            return f"{100 * sum(values) / len(values):.1f}"

        last = len(runs[0]["curve"])
        to90 = "/".join(str(r["rounds_to_90"] or "-") for r in runs)
        to95 = "/".join(str(r["rounds_to_95"] or "-") for r in runs)
        lines.append(
            f"| `{name}` | {','.join(str(r['seed']) for r in runs)} | {mean_at(0)} | "
            f"{mean_at(1)} | {mean_at(5)} | {mean_at(10)} | {mean_at(30)} | "
            f"{mean_at(last) if last != 30 else ''} | {to90} | {to95} |"
        )
    return "\n".join(lines)


def draw_figures(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """Curves of the reference runs and of each lever against scratch (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]

    def curves(name: str) -> list[list[float]]:
        return [[r["round0"], *r["curve"]] for r in runs.values() if r["variant"] == name]

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [
        ("gptfl-vs-scratch.png", "GPT-FL (demo settings) vs FL from scratch", ["gptfl", "scratch"]),
        (
            "gptfl-levers-data.png",
            "levers on the synthetic data",
            ["gptfl", "stretch", "guidance-1-3", "inputs-max1", "inputs-17-levels", "scratch"],
        ),
        (
            "gptfl-levers-model.png",
            "levers on the pretrained model",
            ["gptfl", "pretrain-15", "pretrain-wd5e-3", "conv-norm-reset", "head-reset", "scratch"],
        ),
        (
            "gptfl-levers-fl.png",
            "levers on FL (applied to both starts)",
            ["gptfl", "scratch", "fedadam", "fedadam+scratch", "lr-cosine", "lr-cosine+scratch"],
        ),
        ("gptfl-60-rounds.png", "60 rounds: does scratch catch up?", ["gptfl-60", "scratch-60"]),
    ]
    for file_name, title, names in panels:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for name in names:
            group = curves(name)
            if not group:
                continue
            mean = np.mean(np.asarray(group), axis=0)
            style = "--" if name.endswith("scratch") else "-"
            (line,) = ax.plot(range(len(mean)), mean, style, label=f"{name} (n={len(group)})")
            if len(names) == 2:  # the reference plot also shows each seed
                for one in group:
                    ax.plot(range(len(one)), one, style, color=line.get_color(), alpha=0.25)
        for level in (0.90, 0.95):
            ax.axhline(level, color="grey", linewidth=0.8, linestyle=":")
        # The levers differ by a point or two: zoom in (scratch leaves the frame early on).
        ax.set_ylim(0.8 if len(names) > 2 else 0.0, 1.0)
        ax.set_xlabel("round (0 = initial model)")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = folder / file_name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--figures", type=Path, default=None, help="draw PNGs into this folder")
    parser.add_argument("--table", action="store_true", help="print the mean-over-seeds table")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    results = (
        run_sweep(names, [int(s) for s in args.seeds.split(",")], args.out)
        if names
        else json.loads(args.out.read_text())
    )
    if args.table:
        print(summary_table(results))
    if args.figures is not None:
        for path in draw_figures(results, args.figures):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
