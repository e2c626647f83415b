"""``gptfl demo``: the embedded end-to-end job on one machine.

A fresh dev PKI, a coordinator and N silo agents as separate processes on 127.0.0.1 over
mutual TLS, scikit-learn's digits (80/20 split; the 80% split non-IID over the silos with a
Dirichlet prior), FedAvg on the small CNN, progress per round, a per-round table at the end
and ``runs/<job>/report.md`` + ``summary.json``. Everything is shut down cleanly, also on
Ctrl-C.
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

from gptfl.cli.admin_cmd import follow
from gptfl.errors import EXIT_FAILURE, EXIT_JOB_FAILED, EXIT_OK
from gptfl.local_cluster import ClusterError, LocalCluster, SiloPlan


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the embedded end-to-end federated job on this machine"
    )
    demo.add_argument("--silos", type=int, default=4, help="silo agents to start (default 4)")
    demo.add_argument("--rounds", type=int, default=10, help="FL rounds (default 10)")
    demo.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet alpha of the non-IID split (0.5)"
    )
    demo.add_argument("--strategy", default="fedavg", help="aggregation strategy (fedavg)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where reports go (default runs/)"
    )
    demo.add_argument("--keep-work", action="store_true", help="keep the PKI, configs and logs")
    demo.set_defaults(handler=run_demo)


def digits_job_spec(
    *, name: str, rounds: int, silos: int, strategy: str, seed: int
) -> dict[str, Any]:
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


def digits_silos(*, count: int, alpha: float, seed: int) -> list[SiloPlan]:
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


def run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    runs_dir: Path = args.runs_dir.resolve()
    work = runs_dir / f".demo-work-{time.strftime('%Y%m%d-%H%M%S')}"
    plans = digits_silos(count=args.silos, alpha=args.alpha, seed=args.seed)
    spec = digits_job_spec(
        name="digits-demo",
        rounds=args.rounds,
        silos=args.silos,
        strategy=args.strategy,
        seed=args.seed,
    )
    print(
        f"==> GPT-FL demo: {args.silos} silos, {args.rounds} rounds of {args.strategy}, "
        f"Dirichlet alpha {args.alpha}"
    )
    cluster = LocalCluster(work, silos=plans, runs_dir=runs_dir)
    code = EXIT_FAILURE
    try:
        print(f"==> creating a development PKI in {work / 'pki'}")
        cluster.provision()
        endpoints = cluster.start_coordinator()
        print(f"==> coordinator up: fleet {endpoints.fleet}, admin {endpoints.admin} (mutual TLS)")
        cluster.start_silos()
        print(f"==> started {len(plans)} silo agents: {', '.join(p.silo_id for p in plans)}")
        with cluster.admin() as admin:
            admin.status(wait_for_ready=True)
            job_id = admin.submit(yaml.safe_dump(spec, sort_keys=False))
            print(f"==> submitted job {job_id}")
            code = follow(admin)
            status = admin.status()
        summary = status.summary
        if summary is None:
            print("no summary was produced", file=sys.stderr)
            return EXIT_JOB_FAILED
        print_table(summary)
        report_dir = runs_dir / job_id
        print(f"\n==> report:  {report_dir / 'report.md'}")
        print(f"==> summary: {report_dir / 'summary.json'}")
        print(f"==> model:   {report_dir / 'model.safetensors'}")
        final = summary["final"].get("test_accuracy")
        if final is not None:
            print(
                f"==> final test accuracy {100 * final:.2f}% after {len(summary['rounds'])} rounds"
            )
    except ClusterError as exc:
        print(f"gptfl demo: {exc}", file=sys.stderr)
        print(cluster.log_tail("coordinator"), file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("\ninterrupted; shutting everything down", file=sys.stderr)
        code = EXIT_FAILURE
    finally:
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
