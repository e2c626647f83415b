"""Per-round overhead of the demo federation: round wall time minus the slowest silo's training.

The demo's own job and silos (``gptfl.cli.demo_cmd``: cnn-small 1x8x8, scikit-learn digits
split 80/20, the 80% over 4 silos with Dirichlet alpha 0.5, FedAvg, server-side and federated
evaluation) run as real processes through :class:`gptfl.local_cluster.LocalCluster` over mTLS
on 127.0.0.1. For each round, ``summary.json`` gives ``seconds`` (the coordinator's round wall
time: task dispatch, transfers, local training, aggregation, evaluation, checkpoint) and
``slowest_train_seconds`` (the slowest accepted silo's own training time); everything else is
the overhead this bench reports. Round 1 is reported apart: in the first job it carries the
processes' warm-up (data loading, first model build, torch's first backward pass).

The silo agents stay up between jobs (``exit_after_job: false``), so with ``--runs N`` the
same warm processes run N jobs in a row. From round 2 on, the overhead is split further at the
coordinator's "accepted update" log line (JSON logs, millisecond timestamps), and the two
round-close steps that touch the disk or a data set (checkpoint, server evaluation) are timed
on their own afterwards, on the same model, data and disk.

    python -m bench.round [--rounds 10] [--runs 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml

from bench.machine import format_table, load_average, machine, median, stamp, write_result
from coordinator.checkpoint import save_checkpoint
from coordinator.evaluation import ServerEvaluator
from coordinator.job_state import JobState
from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.data.sources import SklearnDigitsSource
from gptfl.local_cluster import LocalCluster, SiloPlan
from gptfl.models import ModelSpec, build_model

GOAL_S = 0.1


def _wait_connected(cluster: LocalCluster, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with cluster.admin() as admin:
        admin.status(wait_for_ready=True)
        while sum(s.connected for s in admin.silos()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} silos registered within {timeout_s:g}s")
            time.sleep(0.1)


def run_job(cluster: LocalCluster, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Submits ``spec``, waits for its end and returns its ``summary.json``."""
    deadline = time.monotonic() + timeout_s
    with cluster.admin() as admin:
        while True:
            try:
                job_id = admin.submit(yaml.safe_dump(spec, sort_keys=False))
                break
            except grpc.RpcError as exc:
                # The previous job reports "finished" a moment before its thread has exported
                # the final model and report; until then a new job is refused.
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        while not admin.status().ended:
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} did not end within {timeout_s:g}s")
            time.sleep(0.2)
    path = cluster.runs_dir / job_id / "summary.json"
    while not path.exists():  # the job thread writes it just after the job ends
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} was not written")
        time.sleep(0.1)
    summary: dict[str, Any] = json.loads(path.read_text())
    if summary["status"] != "finished":
        raise RuntimeError(f"job {job_id} ended {summary['status']}: {summary['message']}")
    return summary


_ACCEPTED = re.compile(r"^round (\d+): accepted update from ")
_DONE = re.compile(r"^round (\d+)/\d+ done in ")


class LogCursor:
    """Reads the JSON log lines the coordinator wrote since the last call (ms timestamps)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0

    def new_entries(self) -> list[tuple[float, str]]:
        with open(self._path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        entries = []
        for line in data.decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line that is not ours (a library printing to stderr)
            when = dt.datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
            entries.append((when.replace(tzinfo=dt.UTC).timestamp(), entry["msg"]))
        return entries


def collection_times(entries: list[tuple[float, str]]) -> dict[int, tuple[float, float]]:
    """Per round: (last update accepted, round done) wall-clock times from the log."""
    accepted: dict[int, float] = {}
    done: dict[int, float] = {}
    for when, msg in entries:
        if match := _ACCEPTED.match(msg):
            accepted[int(match[1])] = when
        elif match := _DONE.match(msg):
            done[int(match[1])] = when
    return {n: (accepted[n], done[n]) for n in done if n in accepted}


def split_rounds(
    summary: dict[str, Any], times: dict[int, tuple[float, float]]
) -> list[dict[str, float]]:
    """Each round's seconds, slowest training and overhead; from round 2 on, the overhead is
    also split at the last accepted update (the log's "done" line of the previous round marks
    the start of this one, to the millisecond)."""
    rounds = []
    for r in summary["rounds"]:
        n = r["round"]
        row = {
            "round": n,
            "seconds": r["seconds"],
            "slowest_train_seconds": r["slowest_train_seconds"],
            "overhead_seconds": r["seconds"] - r["slowest_train_seconds"],
            "test_accuracy": r.get("test_accuracy") or float("nan"),
        }
        if n in times and n - 1 in times:
            started = times[n - 1][1]
            last_accepted, done = times[n]
            row["collect_overhead_seconds"] = last_accepted - started - r["slowest_train_seconds"]
            row["close_seconds"] = done - last_accepted
        rounds.append(row)
    return rounds


def close_step_costs(work: Path, spec: dict[str, Any], repeats: int = 7) -> dict[str, float]:
    """Median seconds of two round-close steps, run here on the demo's model and data (one
    torch thread, like the coordinator under LocalCluster) and on the same disk."""
    torch.set_num_threads(1)
    model_spec = ModelSpec.model_validate(spec["model"])
    weights = {k: v.detach().clone() for k, v in build_model(model_spec).state_dict().items()}
    evaluator = ServerEvaluator(
        SklearnDigitsSource(kind="sklearn-digits", split="test"), model_spec
    )
    state = JobState(job_id="bench", spec=spec)
    folder = work / "bench-checkpoints"
    checkpoint_s = []
    evaluate_s = []
    fsync_s = []
    probe = work / "bench-fsync-probe"
    for i in range(repeats):
        with open(probe, "wb") as handle:
            handle.write(b"x" * 4096)
            handle.flush()
            start = time.perf_counter()
            os.fsync(handle.fileno())
            fsync_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        save_checkpoint(folder, round_=i, weights=weights, strategy_state={}, state=state, keep=3)
        checkpoint_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        evaluator.evaluate(weights)
        evaluate_s.append(time.perf_counter() - start)
    return {
        "checkpoint_s": median(checkpoint_s),
        "server_evaluation_s": median(evaluate_s),
        "fsync_4k_file_s": median(fsync_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per job (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="jobs in a row on the same silos")
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--keep", type=Path, help="keep the work dir (PKI, configs, logs) here")
    parser.add_argument("--out", type=Path, help="JSON result path (default bench/results/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    machine_info = machine()
    load_before = load_average()
    plans = [
        SiloPlan(p.silo_id, p.data, {**p.extra, "exit_after_job": False, "log_format": "json"})
        for p in digits_silos(count=args.silos, alpha=args.alpha, seed=0)
    ]
    base_spec = digits_job_spec(
        name="bench-round", rounds=args.rounds, silos=args.silos, strategy="fedavg", seed=0
    )
    jobs: list[list[dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="gptfl-bench-round-") as tmp:
        work = args.keep or Path(tmp)
        cluster = LocalCluster(work, silos=plans, coordinator_extra={"log_format": "json"})
        try:
            cluster.provision()
            cluster.start_coordinator()
            cluster.start_silos()
            _wait_connected(cluster, args.silos, timeout_s=180)
            for run in range(1, args.runs + 1):
                spec = {**base_spec, "name": f"bench-round-{run}"}
                log = LogCursor(cluster.logs_dir / "coordinator.log")
                summary = run_job(cluster, spec, timeout_s=600)
                time.sleep(0.2)  # let the last log lines reach the file
                jobs.append(split_rounds(summary, collection_times(log.new_entries())))
                print(
                    f"job {run}: round 1 {jobs[-1][0]['seconds']:.2f}s, rounds 2+ median "
                    f"overhead {median(r['overhead_seconds'] for r in jobs[-1][1:]):.3f}s",
                    flush=True,
                )
        finally:
            cluster.stop()
        load_after = load_average()
        steps = close_step_costs(work, base_spec)

    print(f"\nper round of job {len(jobs)} (the last):")
    print(
        format_table(
            [
                "round",
                "seconds",
                "slowest train s",
                "overhead s",
                "= until last update",
                "+ round close",
                "test acc",
            ],
            [
                [
                    int(r["round"]),
                    r["seconds"],
                    r["slowest_train_seconds"],
                    r["overhead_seconds"],
                    r.get("collect_overhead_seconds", "-"),
                    r.get("close_seconds", "-"),
                    r["test_accuracy"],
                ]
                for r in jobs[-1]
            ],
        )
    )
    later = [r for job in jobs for r in job[1:]]
    first = [job[0] for job in jobs]
    overhead = median(r["overhead_seconds"] for r in later)
    split = [r for r in later if "close_seconds" in r]
    collect = median(r["collect_overhead_seconds"] for r in split)
    close = median(r["close_seconds"] for r in split)

    def row(label: str, rounds: list[dict[str, float]]) -> list[object]:
        if not rounds:
            return [label, 0, "-", "-", "-", "-"]
        return [
            label,
            len(rounds),
            median(r["seconds"] for r in rounds),
            median(r["slowest_train_seconds"] for r in rounds),
            median(r["overhead_seconds"] for r in rounds),
            max(r["overhead_seconds"] for r in rounds),
        ]

    summary_rows = [
        row("job 1, round 1 (cold: processes just started)", first[:1]),
        row("jobs 2+, round 1 (warm processes, new job)", first[1:]),
        *(row(f"job {n}, rounds 2-{args.rounds}", job[1:]) for n, job in enumerate(jobs, 1)),
        row(f"all jobs, rounds 2-{args.rounds}", later),
    ]
    print(f"\nmedians over {len(jobs)} job(s) of {args.rounds} rounds, {args.silos} silos:")
    print(
        format_table(
            ["rounds", "n", "seconds", "slowest train s", "overhead s", "max overhead s"],
            summary_rows,
        )
    )
    print(
        f"\nrounds 2+, overhead split at the last accepted update (coordinator log, ms "
        f"timestamps): median {collect:.3f}s from the round's start to the last update, beyond "
        f"the slowest training (dispatch, downloads, uploads, and silos waiting for a core), and "
        f"{close:.3f}s from there to the round's end (aggregation, server and federated "
        f"evaluation, checkpoint); of the latter, measured here on the same model and disk: "
        f"checkpoint {steps['checkpoint_s']:.3f}s, server evaluation "
        f"{steps['server_evaluation_s']:.3f}s (one fsync of a 4 KiB file: "
        f"{steps['fsync_4k_file_s'] * 1000:.1f} ms; a checkpoint makes 9)"
    )
    met = overhead < GOAL_S
    print(f"goal: overhead < {GOAL_S}s per round: {'met' if met else 'NOT met'}")
    print(f"load average before {load_before}, after {load_after}")
    result = {
        "bench": "round",
        "when": stamp(),
        "command": "python -m bench.round " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info,
        "load_before": load_before,
        "load_after": load_after,
        "silos": args.silos,
        "rounds": args.rounds,
        "runs": args.runs,
        "jobs": jobs,
        "median": {
            "cold_round1_seconds": first[0]["seconds"],
            "cold_round1_overhead_s": first[0]["overhead_seconds"],
            "per_job_overhead_s": [median(r["overhead_seconds"] for r in job[1:]) for job in jobs],
            "seconds": median(r["seconds"] for r in later),
            "slowest_train_s": median(r["slowest_train_seconds"] for r in later),
            "overhead_s": overhead,
            "overhead_until_last_update_s": collect,
            "round_close_s": close,
        },
        "close_steps_measured_here": steps,
        "goal": {"max_overhead_s": GOAL_S, "met": met},
    }
    print(f"result: {write_result('round', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
