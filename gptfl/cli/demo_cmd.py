"""``gptfl demo``: GPT-FL against FL from scratch, end to end on one machine.

A fresh dev PKI, the synth service, a coordinator and N silo agents as separate processes on
127.0.0.1 over mutual TLS, on scikit-learn's digits (80/20 split; the 80% split non-IID over
the silos with a Dirichlet prior). Two jobs run one after the other on the same federation,
with the same seeds, silos and partitions:

1. **GPT-FL**: the coordinator's pretrain phase has the synth service generate synthetic
   digits with the bundled class-conditional generator (trained on MNIST: the paper's
   out-of-domain setting) and pretrain ``cnn-small`` on them; FL starts from that model.
2. **scratch**: the same FL job from a seeded random initialisation.

Progress is printed per round; at the end a comparison table, and
``runs/<gptfl job>/comparison.{json,md,png}`` next to each job's own ``report.md`` and
``summary.json`` (:mod:`gptfl.comparison`). ``--baseline-only`` runs only the scratch job (the
earlier demo: ``gptfl demo --baseline-only --silos 4 --rounds 10 --alpha 0.5``). Everything
is shut down cleanly, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gptfl.admin_client import AdminClient
from gptfl.cli.admin_cmd import follow
from gptfl.comparison import MILESTONE_ROUNDS, THRESHOLDS, write_comparison
from gptfl.errors import EXIT_FAILURE, EXIT_OK
from gptfl.local_cluster import ClusterError, LocalCluster, SiloPlan

#: the synth service's name for its bundled digits generator
DIGITS_GENERATOR = "digits"
DIGIT_LABELS = [str(digit) for digit in range(10)]


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run GPT-FL against FL from scratch on this machine (synth service, coordinator "
        "and silos as processes over mTLS)",
    )
    demo.add_argument("--silos", type=int, default=10, help="silo agents to start (default 10)")
    demo.add_argument("--rounds", type=int, default=30, help="FL rounds per job (default 30)")
    demo.add_argument(
        "--alpha", type=float, default=0.1, help="Dirichlet alpha of the non-IID split (0.1)"
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
    demo.set_defaults(handler=run_demo)


def digits_job_spec(
    *, name: str, rounds: int, silos: int, strategy: str, seed: int
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
        "local": {"epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        "strategy": {"name": strategy},
        "evaluation": {"server": {"kind": "sklearn-digits", "split": "test"}, "federated": True},
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
    *, count: int, alpha: float, seed: int, stay_after_job: bool = False
) -> list[SiloPlan]:
    """Silo ``i`` holds part ``i`` of a Dirichlet split of the digits' train split."""
    extra = {"exit_after_job": False} if stay_after_job else {}
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


def print_table(summary: dict[str, Any]) -> None:
    print()
    print(f"{'round':>5} | {'test acc':>8} | {'test loss':>9} | {'fed acc':>8} | {'seconds':>7}")
    print("-" * 51)
    for r in summary["rounds"]:
        acc = r.get("test_accuracy")
        loss = r.get("test_loss")
        fed = r.get("federated_accuracy")
        print(
            f"{r['round']:>5} | {'-' if acc is None else f'{100 * acc:7.2f}%':>8} | "
            f"{'-' if loss is None else f'{loss:.4f}':>9} | "
            f"{'-' if fed is None else f'{100 * fed:7.2f}%':>8} | {r['seconds']:7.2f}"
        )


def _pct(value: float | None) -> str:
    return "      -" if value is None else f"{100 * value:6.2f}%"


def print_comparison(comparison: dict[str, Any]) -> None:
    gptfl, scratch = comparison["gptfl"], comparison["scratch"]
    print()
    print(f"{'round':>5} | {'GPT-FL':>8} | {'scratch':>8}")
    print("-" * 28)
    print(
        f"{0:>5} | {_pct(comparison['synthetic_only_accuracy']):>8} | "
        f"{_pct(comparison['scratch_initial_accuracy']):>8}   (round 0: the initial models)"
    )
    for index in range(max(len(gptfl), len(scratch))):
        a = gptfl[index] if index < len(gptfl) else None
        b = scratch[index] if index < len(scratch) else None
        print(f"{index + 1:>5} | {_pct(a):>8} | {_pct(b):>8}")
    print()
    planned = max(len(gptfl), len(scratch))
    marks = [r for r in MILESTONE_ROUNDS if r <= planned]
    header = "".join(f" | {'round ' + str(r):>9}" for r in marks)
    header += "".join(f" | {'to ' + str(round(100 * level)) + '%':>6}" for level in THRESHOLDS)
    print(f"{'':>8}{header}")
    for name, key in (("GPT-FL", "gptfl"), ("scratch", "scratch")):
        curve = comparison[key]
        cells = "".join(f" | {_pct(curve[r - 1] if r <= len(curve) else None):>9}" for r in marks)
        for level in THRESHOLDS:
            reached = comparison["rounds_to"][key][f"{level:.2f}"]
            cells += f" | {'-' if reached is None else str(reached):>6}"
        print(f"{name:>8}{cells}")


def _print_initial_model(summary: dict[str, Any]) -> None:
    init = summary.get("initialisation", {})
    accuracy = init.get("evaluation", {}).get("test_accuracy")
    if init.get("kind") == "pretrain":
        print(
            f"==> GPT-FL's initial model: pretrained on {init.get('images')} synthetic images "
            f"in {init.get('seconds', 0.0):.0f}s (generator {init.get('generator_id')}, "
            f"dataset {str(init.get('dataset_id'))[:12]}...), synthetic-only test accuracy "
            f"{_pct(accuracy).strip()}"
        )
    elif init.get("fallback"):
        print(f"==> the pretrain phase failed: {init['fallback'].get('reason')}")


def _run_job(admin: AdminClient, spec: dict[str, Any], title: str) -> tuple[int, dict[str, Any]]:
    admin.status(wait_for_ready=True)
    job_id = admin.submit(yaml.safe_dump(spec, sort_keys=False))
    print(f"==> {title}: submitted job {job_id}")
    code = follow(admin)
    summary = admin.status().summary
    if summary is None:
        raise ClusterError(f"job {job_id} produced no summary")
    return code, summary


def run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    runs_dir: Path = args.runs_dir.resolve()
    work = runs_dir / f".demo-work-{time.strftime('%Y%m%d-%H%M%S')}"
    compare = not args.baseline_only
    plans = digits_silos(count=args.silos, alpha=args.alpha, seed=args.seed, stay_after_job=compare)
    common = {"rounds": args.rounds, "silos": args.silos, "strategy": args.strategy}
    scratch_spec = digits_job_spec(
        name="digits-scratch" if compare else "digits-demo", seed=args.seed, **common
    )
    gptfl_spec = {
        **digits_job_spec(name="digits-gptfl", seed=args.seed, **common),
        "pretrain": digits_pretrain_section(
            images_per_label=args.images_per_label, epochs=args.pretrain_epochs
        ),
    }
    what = "GPT-FL vs FL from scratch" if compare else "FL from a random initialisation"
    print(
        f"==> GPT-FL demo ({what}): {args.silos} silos, {args.rounds} rounds of "
        f"{args.strategy}, Dirichlet alpha {args.alpha}, seed {args.seed}"
    )
    cluster = LocalCluster(work, silos=plans, runs_dir=runs_dir, synth=compare)
    code = EXIT_FAILURE
    try:
        print(f"==> creating a development PKI in {work / 'pki'}")
        cluster.provision()
        if compare:
            address = cluster.start_synth()
            print(f"==> synth service up: {address} (mutual TLS, CPU)")
        endpoints = cluster.start_coordinator()
        print(f"==> coordinator up: fleet {endpoints.fleet}, admin {endpoints.admin} (mutual TLS)")
        cluster.start_silos()
        print(f"==> started {len(plans)} silo agents: {', '.join(p.silo_id for p in plans)}")
        with cluster.admin() as admin:
            if compare:
                print(
                    f"==> 1/2 GPT-FL: generate {10 * args.images_per_label} synthetic digits, "
                    f"pretrain {args.pretrain_epochs} epochs, then {args.rounds} FL rounds"
                )
                gptfl_code, gptfl_summary = _run_job(admin, gptfl_spec, "GPT-FL")
                _print_initial_model(gptfl_summary)
                print("==> 2/2 FL from scratch: the same job from a random initialisation")
                scratch_code, scratch_summary = _run_job(admin, scratch_spec, "scratch")
                code = gptfl_code or scratch_code
            else:
                code, scratch_summary = _run_job(admin, scratch_spec, "FL from scratch")
        if compare:
            out_dir = runs_dir / gptfl_summary["job_id"]
            comparison = write_comparison(
                out_dir,
                gptfl_summary,
                scratch_summary,
                settings={
                    "silos": args.silos,
                    "rounds": args.rounds,
                    "alpha": args.alpha,
                    "seed": args.seed,
                    "strategy": args.strategy,
                    "local": "1 epoch, SGD lr 0.05, batch 32",
                    "images_per_label": args.images_per_label,
                    "pretrain_epochs": args.pretrain_epochs,
                },
            )
            print_comparison(comparison)
            print(f"\n==> comparison: {out_dir / 'comparison.md'} (and .json, .png)")
            print(f"==> GPT-FL:     {out_dir / 'report.md'}")
            print(f"==> scratch:    {runs_dir / scratch_summary['job_id'] / 'report.md'}")
        else:
            print_table(scratch_summary)
            report_dir = runs_dir / scratch_summary["job_id"]
            print(f"\n==> report:  {report_dir / 'report.md'}")
            print(f"==> summary: {report_dir / 'summary.json'}")
            print(f"==> model:   {report_dir / 'model.safetensors'}")
            final = scratch_summary["final"].get("test_accuracy")
            if final is not None:
                print(
                    f"==> final test accuracy {100 * final:.2f}% after "
                    f"{len(scratch_summary['rounds'])} rounds"
                )
    except ClusterError as exc:
        print(f"gptfl demo: {exc}", file=sys.stderr)
        print(cluster.log_tail("coordinator"), file=sys.stderr)
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        print("\ninterrupted; shutting everything down", file=sys.stderr)
        code = EXIT_FAILURE
    finally:
        if not compare:
            cluster.wait_silos(timeout_s=30)  # silos leave on their own once the job has ended
        exits = cluster.stop()
        bad = {name: rc for name, rc in exits.items() if rc != 0}
        if bad:
            print(
                f"==> processes that did not exit cleanly: {json.dumps(bad)}; logs in "
                f"{cluster.logs_dir}",
                file=sys.stderr,
            )
            args.keep_work = True
            code = code or EXIT_FAILURE
        else:
            print(f"==> all {len(exits)} processes stopped cleanly")
        if args.keep_work:
            print(f"==> work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"==> demo took {time.monotonic() - started:.1f}s")
    return code if code is not None else EXIT_OK
