"""``gptfl federate``: does GPT-FL help on my data? GPT-FL against FL from scratch on a
user's own labelled images, split over simulated silos on this machine.

The data is an image folder (one sub-folder per class) or an ``.npz`` archive (``x``, ``y``).
A seeded ``--test-fraction`` of it is the coordinator's test set; the rest is partitioned
over ``--silos`` silo agents (``--partition``: IID, Dirichlet label skew, or by an ``.npz``
column such as a site). The model takes the data's own channels and resolution unless told
otherwise, and every copy of the images (the silos', the test set, the synthetic ones) is
fitted to it the same way (``stretch``). Like ``gptfl demo``, a dev PKI, the synth service, a
coordinator and the silos run as processes over mutual TLS; the GPT-FL job (synthetic data
from the label names, a model pretrained on it, then FL) and the same job from scratch run
on the same silos, and ``comparison.{json,md,png}`` says which reached what, when.
"""

from __future__ import annotations

import argparse
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptfl.cli.comparison_run import ComparisonPlan, run_comparison
from gptfl.cli.demo_cmd import DIGITS_GENERATOR
from gptfl.data.sources import IMAGE_SUFFIXES, read_image
from gptfl.errors import ConfigError, ValidationError
from gptfl.local_cluster import LocalCluster, SiloPlan

#: names the bundled digits generator knows (it is used when every label is one of them)
DIGIT_NAMES = frozenset(
    [str(d) for d in range(10)]
    + ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
)


@dataclass(frozen=True)
class DataShape:
    """What the data looks like: its channels, side, and (image folder) class folders."""

    channels: int
    size: int
    folders: tuple[str, ...] = ()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "federate",
        help="GPT-FL against FL from scratch on your own labelled images, split over "
        "simulated silos on this machine",
        description=(
            "Splits DATA (an image folder with one sub-folder per class, or an .npz with x "
            "and y) into a test set and --silos partitions, starts a synth service, a "
            "coordinator and the silos as processes over mutual TLS, and runs GPT-FL and the "
            "same job from scratch; writes comparison.md/.json/.png under --runs-dir."
        ),
    )
    parser.add_argument("--data", type=Path, required=True, help="image folder or .npz file")
    parser.add_argument(
        "--labels",
        help="label names in label order, comma-separated (default for an image folder: its "
        "sub-folders, sorted; required for .npz); the prompts of the synthetic data",
    )
    parser.add_argument("--silos", type=int, default=4, help="silo agents (default 4)")
    parser.add_argument(
        "--partition",
        default="dirichlet:0.5",
        help="iid, dirichlet[:ALPHA] or column:NAME (an .npz array of group values, one "
        "silo per value); default dirichlet:0.5",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="share held out as the test set (0.2)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="FL rounds per job (default 10)")
    parser.add_argument("--arch", help="model architecture (default: by image size, see docs)")
    parser.add_argument("--image-size", type=int, help="model input side (default: the data's)")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), help="model channels (default: the data's)"
    )
    parser.add_argument(
        "--generator",
        help="the GPT-FL generator: a diffusers text-to-image pipeline folder "
        "(save_pretrained), or 'digits' (the bundled one; the default when every label is a "
        "digit name)",
    )
    parser.add_argument(
        "--images-per-label", type=int, default=100, help="synthetic images per label (100)"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="pretraining epochs (10)")
    parser.add_argument(
        "--steps", type=int, help="denoising steps per image (default: the backend's)"
    )
    parser.add_argument("--local-epochs", type=int, default=1, help="epochs per round (1)")
    parser.add_argument("--batch-size", type=int, default=32, help="local batch size (32)")
    parser.add_argument(
        "--learning-rate", type=float, default=0.05, help="local SGD learning rate (0.05)"
    )
    parser.add_argument("--strategy", default="fedavg", help="aggregation strategy (fedavg)")
    parser.add_argument("--seed", type=int, default=0, help="seeds splits, jobs and data (0)")
    parser.add_argument(
        "--baseline-only", action="store_true", help="run only FL from a random initialisation"
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where reports go (default runs/)"
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the PKI, configs and logs")
    parser.set_defaults(handler=run_federate)


def parse_partition(text: str) -> dict[str, Any]:
    """``iid`` / ``dirichlet[:ALPHA]`` / ``column:NAME`` as a partition's fields.

    Raises:
        ConfigError: anything else.
    """
    scheme, _, value = text.partition(":")
    if scheme == "iid" and not value:
        return {"scheme": "iid"}
    if scheme == "dirichlet":
        try:
            alpha = float(value) if value else 0.5
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return {"scheme": "dirichlet", "alpha": alpha}
    if scheme == "column" and value:
        return {"scheme": "column", "column": value}
    raise ConfigError(
        f"--partition: expected iid, dirichlet[:ALPHA > 0] or column:NAME, got {text!r}"
    )


def data_shape(path: Path) -> DataShape:
    """The channels and side of the data's images (an image folder's first image), and an
    image folder's class folders.

    Raises:
        ConfigError: no such file or folder, or nothing to read in it.
    """
    if path.is_file() and path.suffix == ".npz":
        shape = _npz_shape(path)
        if len(shape) == 3:
            return DataShape(1, int(shape[1]))
        channels_first = len(shape) == 4 and shape[1] in (1, 3)
        if len(shape) != 4 or not (channels_first or shape[3] in (1, 3)):
            raise ConfigError(f"--data: x of {path} has shape {shape}, not images")
        return DataShape(int(shape[1] if channels_first else shape[3]), int(shape[2]))
    if not path.is_dir():
        raise ConfigError(f"--data: {path} is neither an image folder nor an .npz file")
    folders = tuple(sorted(child.name for child in path.iterdir() if child.is_dir()))
    for folder in folders:
        for file in sorted((path / folder).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    channels, height, width = read_image(file).shape
                except ValidationError as exc:
                    raise ConfigError(f"--data: {exc}") from None
                return DataShape(channels, max(height, width), folders)
    raise ConfigError(f"--data: {path} has no class sub-folders with PNG or JPEG images")


def _npz_shape(path: Path) -> tuple[int, ...]:
    """The shape of the archive's ``x``, from its header alone (the array is not read)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(member)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"--data: cannot read x of {path}: {exc}") from None
    return tuple(int(d) for d in shape)


def default_arch(size: int) -> str:
    """``cnn-small`` up to 28 pixels, ``resnet20`` at 32, ``resnet18-gn`` above."""
    if size <= 28:
        return "cnn-small"
    return "resnet20" if size == 32 else "resnet18-gn"


def _labels(args: argparse.Namespace, shape: DataShape) -> list[str]:
    if args.labels:
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    elif shape.folders:
        labels = list(shape.folders)
    else:
        raise ConfigError("--labels: name the classes of an .npz in label order (a,b,c)")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ConfigError(f"--labels: need at least 2 distinct names, got {labels}")
    if shape.folders:
        missing = [label for label in labels if label not in shape.folders]
        if missing:
            raise ConfigError(
                f"--labels: {', '.join(missing)} is not a sub-folder of {args.data} "
                f"(has: {', '.join(shape.folders)})"
            )
    return labels


def check_column(path: Path, column: str, silos: int) -> None:
    """A partition by ``column`` needs that array in the ``.npz``, one silo per value.

    Raises:
        ConfigError: not an ``.npz``, no such array, or another number of values.
    """
    if path.is_dir():
        raise ConfigError("--partition column:NAME reads an array of an .npz, not a folder")
    try:
        with np.load(path, allow_pickle=False) as archive:
            values = np.unique(archive[column])
    except KeyError:
        raise ConfigError(f"--partition: {path} has no array {column!r}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--partition: cannot read {column!r} of {path}: {exc}") from None
    if values.size != silos:
        raise ConfigError(
            f"--partition: column {column!r} has {values.size} distinct values; one silo per "
            f"value needs --silos {values.size}"
        )


def _source(args: argparse.Namespace, labels: list[str]) -> dict[str, Any]:
    data = args.data.resolve()
    if data.is_dir():
        return {"kind": "imagefolder", "path": str(data), "class_names": labels}
    return {"kind": "npz", "path": str(data)}


def _generator(args: argparse.Namespace, labels: list[str]) -> tuple[str, str, Path | None]:
    """(backend, generator name, models_dir for the synth service or None)."""
    choice = args.generator
    if choice is None:
        if not set(labels) <= DIGIT_NAMES:
            raise ConfigError(
                "--generator: the labels are not digit names, so the bundled digits generator "
                "cannot draw them; give a diffusers text-to-image pipeline folder (or "
                "--baseline-only)"
            )
        choice = DIGITS_GENERATOR
    if choice == DIGITS_GENERATOR:
        return "class-conditional", DIGITS_GENERATOR, None
    folder = Path(choice).resolve()
    if not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"--generator: {choice} is not a diffusers pipeline folder (no model_index.json)"
        )
    return "text-to-image", folder.name, folder.parent


def run_federate(args: argparse.Namespace) -> int:
    if args.silos < 1 or args.rounds < 1:
        raise ConfigError("--silos and --rounds must be at least 1")
    shape = data_shape(args.data)
    labels = _labels(args, shape)
    partition = parse_partition(args.partition)
    if partition["scheme"] == "column":
        check_column(args.data, partition["column"], args.silos)
    size = args.image_size or shape.size
    channels = args.channels or shape.channels
    model = {
        "arch": args.arch or default_arch(size),
        "num_classes": len(labels),
        "in_channels": channels,
        "image_size": size,
    }
    source = _source(args, labels)
    split = {"test_fraction": args.test_fraction, "split_seed": args.seed}
    compare = not args.baseline_only
    silos = [
        SiloPlan(
            f"silo-{i + 1}",
            {
                "train": {
                    **source,
                    **split,
                    "split": "train",
                    "partition": {**partition, "index": i, "count": args.silos, "seed": args.seed},
                },
                "eval_fraction": 0.0,  # every example trains; the test set is the server's
            },
            {"exit_after_job": False} if compare else {},
        )
        for i in range(args.silos)
    ]
    scratch = {
        "name": "federate-scratch" if compare else "federate",
        "model": model,
        "rounds": args.rounds,
        "seed": args.seed,
        "min_silos": args.silos,
        "round_deadline_s": 600,
        "wait_for_silos_s": 300,
        "local": {
            "epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
        },
        "strategy": {"name": args.strategy},
        "evaluation": {"server": {**source, **split, "split": "test"}, "federated": False},
    }
    synth_extra: dict[str, Any] = {}
    gptfl = None
    if compare:
        backend, generator, models_dir = _generator(args, labels)
        if models_dir is not None:
            synth_extra["models_dir"] = str(models_dir)
        pretrain: dict[str, Any] = {
            "backend": backend,
            "generator": generator,
            "labels": labels,
            "images_per_label": args.images_per_label,
            "training": {"epochs": args.pretrain_epochs},
        }
        if args.steps is not None:
            pretrain["generator_settings"] = {"num_inference_steps": args.steps}
        gptfl = {**scratch, "name": "federate-gptfl", "pretrain": pretrain}
    print(
        f"==> gptfl federate: {args.data} ({len(labels)} classes: {', '.join(labels)}), "
        f"{channels}x{size}x{size} inputs, {model['arch']}; {args.silos} silos "
        f"({args.partition}), {args.rounds} rounds of {args.strategy}, test fraction "
        f"{args.test_fraction}, seed {args.seed}"
    )
    plan = ComparisonPlan(
        program="gptfl federate",
        scratch=scratch,
        gptfl=gptfl,
        gptfl_step=(
            f"generate {len(labels) * args.images_per_label} synthetic images from the label "
            f"names, pretrain {args.pretrain_epochs} epochs, then {args.rounds} FL rounds"
        ),
        settings={
            "data": str(args.data),
            "labels": labels,
            "model": model,
            "silos": args.silos,
            "partition": args.partition,
            "test_fraction": args.test_fraction,
            "rounds": args.rounds,
            "seed": args.seed,
            "strategy": args.strategy,
            "local": scratch["local"],
            "images_per_label": args.images_per_label,
            "pretrain_epochs": args.pretrain_epochs,
        },
    )
    runs_dir: Path = args.runs_dir.resolve()
    work = runs_dir / f".federate-work-{time.strftime('%Y%m%d-%H%M%S')}"
    cluster = LocalCluster(
        work, silos=silos, runs_dir=runs_dir, synth=compare, synth_extra=synth_extra
    )
    return run_comparison(cluster, plan, keep_work=args.keep_work)
