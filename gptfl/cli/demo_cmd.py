"""``gptfl demo``: GPT-FL against FL from scratch, end to end on one machine.

A fresh dev PKI, the synth service, a coordinator and N silo agents as separate processes on
127.0.0.1 over mutual TLS, on scikit-learn's digits (80/20 split; the 80% split non-IID over
the silos with a Dirichlet prior). Two jobs run one after the other on the same federation,
with the same seeds, silos and partitions:

1. **GPT-FL**: the coordinator's pretrain phase has the synth service generate synthetic
   digits with the bundled class-conditional generator (trained on MNIST: the paper's
   out-of-domain setting) and pretrain ``cnn-small`` on them; FL starts from that model.
2. **scratch**: the same FL job from a seeded random initialisation.

With ``--dp`` every silo trains with DP-SGD under the same stated budget (``--epsilon``,
``--delta``, ``--max-grad-norm``; docs/privacy.md) in both jobs, each round's line is followed
by every silo's epsilon, and the comparison states the budget and reports the rounds to 80%
and 90%.

Progress is printed per round; at the end a comparison table, and
``runs/<gptfl job>/comparison.{json,md,png}`` next to each job's own ``report.md`` and
``summary.json`` (:mod:`gptfl.comparison`). ``--baseline-only`` runs only the scratch job (the
earlier demo: ``gptfl demo --baseline-only --silos 4 --rounds 10 --alpha 0.5``). Everything
is shut down cleanly, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gptfl.cli.comparison_run import ComparisonPlan, run_comparison
from gptfl.comparison import THRESHOLDS
from gptfl.local_cluster import LocalCluster, SiloPlan

#: the synth service's name for its bundled digits generator
DIGITS_GENERATOR = "digits"
DIGIT_LABELS = [str(digit) for digit in range(10)]
#: the demo's local training (both jobs)
DEMO_LOCAL: dict[str, Any] = {"epochs": 1, "batch_size": 32, "learning_rate": 0.05}
#: local training under DP-SGD (both jobs): see docs/benchmarks.md for how it was chosen
DP_LOCAL: dict[str, Any] = {"epochs": 1, "batch_size": 32, "learning_rate": 0.2}
#: the Dirichlet alpha without and with ``--dp``: at 0.1 the smallest silo of seed 0 holds 7
#: training examples, fewer than a batch, and a DP silo refuses a batch larger than its data
DEFAULT_ALPHA, DP_ALPHA = 0.1, 0.5
#: the accuracy levels the DP comparison reports the first round of
DP_THRESHOLDS = (0.80, 0.90)


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run GPT-FL against FL from scratch on this machine (synth service, coordinator "
        "and silos as processes over mTLS)",
    )
    demo.add_argument("--silos", type=int, default=10, help="silo agents to start (default 10)")
    demo.add_argument("--rounds", type=int, default=30, help="FL rounds per job (default 30)")
    demo.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"Dirichlet alpha of the non-IID split ({DEFAULT_ALPHA}; {DP_ALPHA} with --dp)",
    )
    demo.add_argument("--strategy", default="fedavg", help="aggregation strategy (fedavg)")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the partition, the jobs, the synthetic data and the pretraining (0)",
    )
    demo.add_argument(
        "--images-per-label",
        type=int,
        default=200,
        help="synthetic images per digit for the pretrain phase (default 200)",
    )
    demo.add_argument(
        "--pretrain-epochs", type=int, default=30, help="pretraining epochs (default 30)"
    )
    demo.add_argument(
        "--baseline-only",
        action="store_true",
        help="run only FL from a random initialisation (no synth service, no comparison)",
    )
    demo.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where reports go (default runs/)"
    )
    demo.add_argument("--keep-work", action="store_true", help="keep the PKI, configs and logs")
    dp = demo.add_argument_group("differential privacy (docs/privacy.md)")
    dp.add_argument(
        "--dp",
        action="store_true",
        help="every silo trains with DP-SGD (Opacus) under the budget below, in both jobs",
    )
    dp.add_argument(
        "--epsilon", type=float, default=8.0, help="each silo's epsilon per job (default 8)"
    )
    dp.add_argument("--delta", type=float, default=1e-5, help="the delta (default 1e-5)")
    dp.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="per-sample gradient clipping bound (default 1.0)",
    )
    dp.add_argument(
        "--accountant", choices=["rdp", "prv"], default="rdp", help="privacy accountant (rdp)"
    )
    demo.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="both jobs with secure aggregation: the coordinator sees only the sum of the "
        "silos' updates (docs/secure-aggregation.md)",
    )
    demo.set_defaults(handler=run_demo)


def digits_job_spec(
    *,
    name: str,
    rounds: int,
    silos: int,
    strategy: str,
    seed: int,
    local: Mapping[str, Any] = DEMO_LOCAL,
) -> dict[str, Any]:
    """The FL job both demo runs share (the scratch run is exactly this)."""
    return {
        "name": name,
        "model": {"arch": "cnn-small", "num_classes": 10, "in_channels": 1, "image_size": 8},
        "rounds": rounds,
        "seed": seed,
        "min_silos": silos,
        "round_deadline_s": 120,
        "wait_for_silos_s": 120,
        "local": dict(local),
        "strategy": {"name": strategy},
        "evaluation": {"server": {"kind": "sklearn-digits", "split": "test"}, "federated": True},
    }


def secure_aggregation_section(silos: int) -> dict[str, Any]:
    """The demo's ``secure_aggregation``: a majority threshold, and a clipping range well
    above what one round of local SGD moves a weight of ``cnn-small`` on the digits."""
    return {
        "threshold": max(2, silos // 2 + 1),
        "clip_range": 1.0,
        "bits": 32,
        "max_silos": max(16, silos),
    }


def digits_pretrain_section(*, images_per_label: int, epochs: int) -> dict[str, Any]:
    """The GPT-FL run's ``pretrain`` section: the settings docs/gptfl-results.md arrived at.

    Guidance 1.0 and ``ink-box`` framing are what the generator's model card measured as best
    for synthetic-only accuracy on these digits; the optimizer settings are the card's too.
    """
    return {
        "backend": "class-conditional",
        "generator": DIGITS_GENERATOR,
        "labels": DIGIT_LABELS,
        "images_per_label": images_per_label,
        "generation": {
            "resize_mode": "ink-box",
            "guidance_min": 1.0,
            "guidance_max": 1.0,
        },
        "generator_settings": {"num_inference_steps": 20},
        "training": {
            "epochs": epochs,
            "batch_size": 64,
            "optimizer": "sgd",
            "learning_rate": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "cosine",
            "max_shift": 1,
            "val_fraction": 0.1,
        },
        "on_failure": "fail",
    }


def digits_silos(
    *,
    count: int,
    alpha: float,
    seed: int,
    stay_after_job: bool = False,
    privacy: Mapping[str, Any] | None = None,
) -> list[SiloPlan]:
    """Silo ``i`` holds part ``i`` of a Dirichlet split of the digits' train split; with
    ``privacy`` (a silo config's ``privacy`` section) each trains with DP-SGD."""
    extra: dict[str, Any] = {"exit_after_job": False} if stay_after_job else {}
    if privacy is not None:
        extra["privacy"] = dict(privacy)
    return [
        SiloPlan(
            f"silo-{i + 1}",
            {
                "train": {
                    "kind": "sklearn-digits",
                    "split": "train",
                    "partition": {"index": i, "count": count, "alpha": alpha, "seed": seed},
                },
                "eval_fraction": 0.1,
            },
            extra,
        )
        for i in range(count)
    ]


def dp_section(args: argparse.Namespace) -> dict[str, Any] | None:
    """The silos' ``privacy`` section with ``--dp``; None without it."""
    if not args.dp:
        return None
    return {
        "target_epsilon": args.epsilon,
        "target_delta": args.delta,
        "max_grad_norm": args.max_grad_norm,
        "accountant": args.accountant,
    }


def _local_words(local: Mapping[str, Any]) -> str:
    return (
        f"{local['epochs']} epoch, SGD lr {local['learning_rate']:g}, batch {local['batch_size']}"
    )


def run_demo(args: argparse.Namespace) -> int:
    runs_dir: Path = args.runs_dir.resolve()
    work = runs_dir / f".demo-work-{time.strftime('%Y%m%d-%H%M%S')}"
    compare = not args.baseline_only
    privacy = dp_section(args)
    alpha = args.alpha if args.alpha is not None else DP_ALPHA if privacy else DEFAULT_ALPHA
    local = DP_LOCAL if privacy else DEMO_LOCAL
    plans = digits_silos(
        count=args.silos, alpha=alpha, seed=args.seed, stay_after_job=compare, privacy=privacy
    )
    common = {"rounds": args.rounds, "silos": args.silos, "strategy": args.strategy}
    tag = "-dp" if privacy else ""
    scratch_spec = digits_job_spec(
        name=f"digits-scratch{tag}" if compare else f"digits-demo{tag}",
        seed=args.seed,
        local=local,
        **common,
    )
    gptfl_spec = {
        **digits_job_spec(name=f"digits-gptfl{tag}", seed=args.seed, local=local, **common),
        "pretrain": digits_pretrain_section(
            images_per_label=args.images_per_label, epochs=args.pretrain_epochs
        ),
    }
    if args.secure_aggregation:
        secagg = secure_aggregation_section(args.silos)
        scratch_spec["secure_aggregation"] = gptfl_spec["secure_aggregation"] = secagg
    what = "GPT-FL vs FL from scratch" if compare else "FL from a random initialisation"
    print(
        f"==> GPT-FL demo ({what}): {args.silos} silos, {args.rounds} rounds of "
        f"{args.strategy}, Dirichlet alpha {alpha:g}, seed {args.seed}"
        + (", secure aggregation" if args.secure_aggregation else "")
    )
    if privacy:
        print(
            f"==> DP-SGD at every silo: epsilon <= {args.epsilon:g} at delta {args.delta:g} per "
            f"silo and job, per-sample gradients clipped to {args.max_grad_norm:g}, "
            f"{args.accountant} accountant; each silo's ledger is in its state_dir"
        )
    settings: dict[str, Any] = {
        "silos": args.silos,
        "rounds": args.rounds,
        "alpha": alpha,
        "seed": args.seed,
        "strategy": args.strategy,
        "local": _local_words(local),
        "images_per_label": args.images_per_label,
        "pretrain_epochs": args.pretrain_epochs,
    }
    plan = ComparisonPlan(
        program="gptfl demo",
        scratch=scratch_spec,
        gptfl=gptfl_spec if compare else None,
        gptfl_step=(
            f"generate {10 * args.images_per_label} synthetic digits, pretrain "
            f"{args.pretrain_epochs} epochs, then {args.rounds} FL rounds"
        ),
        settings=settings,
        thresholds=DP_THRESHOLDS if privacy else THRESHOLDS,
        privacy=privacy,
    )
    cluster = LocalCluster(work, silos=plans, runs_dir=runs_dir, synth=compare)
    return run_comparison(cluster, plan, keep_work=args.keep_work)
