"""Running GPT-FL against FL from scratch on a local federation, for ``gptfl demo`` and
``gptfl federate``.

The caller plans the federation (a :class:`~gptfl.local_cluster.LocalCluster`) and the two job
specs; :func:`run_comparison` starts the processes, runs the GPT-FL job then the scratch job
on the same silos, prints progress and the comparison, writes ``comparison.{json,md,png}``
next to the GPT-FL job's report (:mod:`gptfl.comparison`) and shuts everything down, also on
Ctrl-C.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from gptfl.admin_client import AdminClient
from gptfl.cli.admin_cmd import follow
from gptfl.comparison import MILESTONE_ROUNDS, THRESHOLDS, epsilons_by_round, write_comparison
from gptfl.errors import EXIT_FAILURE, EXIT_OK
from gptfl.local_cluster import ClusterError, LocalCluster


@dataclass(frozen=True)
class ComparisonPlan:
    """The jobs to run on a planned federation.

    Attributes:
        program: the command's name, for messages (``gptfl demo``).
        scratch: the job spec of FL from a random initialisation.
        gptfl: the same job with a ``pretrain`` section; None runs the scratch job alone
            (no synth service, no comparison).
        gptfl_step: what the GPT-FL job does, printed before it.
        settings: recorded in ``comparison.json`` as the run's settings.
        thresholds: the accuracy levels whose first round the comparison reports.
        privacy: the silos' ``privacy`` section when they train with DP-SGD: each silo's
            epsilon is then kept per round and the comparison states the budget.
    """

    program: str
    scratch: Mapping[str, Any]
    gptfl: Mapping[str, Any] | None
    gptfl_step: str
    settings: Mapping[str, Any]
    thresholds: Sequence[float] = THRESHOLDS
    privacy: Mapping[str, Any] | None = None


def print_table(summary: Mapping[str, Any]) -> None:
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


def print_comparison(comparison: Mapping[str, Any]) -> None:
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
    thresholds = comparison.get("thresholds", THRESHOLDS)
    header = "".join(f" | {'round ' + str(r):>9}" for r in marks)
    header += "".join(f" | {'to ' + str(round(100 * level)) + '%':>6}" for level in thresholds)
    print(f"{'':>8}{header}")
    for name, key in (("GPT-FL", "gptfl"), ("scratch", "scratch")):
        curve = comparison[key]
        cells = "".join(f" | {_pct(curve[r - 1] if r <= len(curve) else None):>9}" for r in marks)
        for level in thresholds:
            reached = comparison["rounds_to"][key][f"{level:.2f}"]
            cells += f" | {'-' if reached is None else str(reached):>6}"
        print(f"{name:>8}{cells}")
    privacy = comparison.get("privacy")
    if privacy:
        budget = privacy["budget"]
        print(
            f"\nDP-SGD at every silo: epsilon <= {budget.get('target_epsilon')} at delta "
            f"{budget.get('target_delta')} per silo and job; each silo's epsilon at the end:"
        )
        final = privacy["final"]
        for name, key in (("GPT-FL", "gptfl"), ("scratch", "scratch")):
            spends = ", ".join(f"{silo} {eps:.4g}" for silo, eps in sorted(final[key].items()))
            print(f"{name:>8}: {spends or '-'}")


def _print_initial_model(summary: Mapping[str, Any]) -> None:
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


def _run_job(admin: AdminClient, spec: Mapping[str, Any], title: str) -> tuple[int, dict[str, Any]]:
    admin.status(wait_for_ready=True)
    job_id = admin.submit(yaml.safe_dump(dict(spec), sort_keys=False))
    print(f"==> {title}: submitted job {job_id}")
    code = follow(admin)
    summary = admin.status().summary
    if summary is None:
        raise ClusterError(f"job {job_id} produced no summary")
    return code, summary


def _report(cluster: LocalCluster, plan: ComparisonPlan, summaries: list[dict[str, Any]]) -> None:
    runs_dir = cluster.runs_dir
    if plan.gptfl is None:
        summary = summaries[0]
        print_table(summary)
        report_dir = runs_dir / summary["job_id"]
        print(f"\n==> report:  {report_dir / 'report.md'}")
        print(f"==> summary: {report_dir / 'summary.json'}")
        print(f"==> model:   {report_dir / 'model.safetensors'}")
        final = summary["final"].get("test_accuracy")
        if final is not None:
            print(
                f"==> final test accuracy {100 * final:.2f}% after {len(summary['rounds'])} rounds"
            )
        return
    gptfl_summary, scratch_summary = summaries
    out_dir = runs_dir / gptfl_summary["job_id"]
    privacy = (
        {
            "budget": dict(plan.privacy),
            "epsilon_by_round": {
                "gptfl": epsilons_by_round(gptfl_summary),
                "scratch": epsilons_by_round(scratch_summary),
            },
        }
        if plan.privacy is not None
        else None
    )
    comparison = write_comparison(
        out_dir,
        gptfl_summary,
        scratch_summary,
        settings=plan.settings,
        thresholds=plan.thresholds,
        privacy=privacy,
    )
    print_comparison(comparison)
    print(f"\n==> comparison: {out_dir / 'comparison.md'} (and .json, .png)")
    print(f"==> GPT-FL:     {out_dir / 'report.md'}")
    print(f"==> scratch:    {runs_dir / scratch_summary['job_id'] / 'report.md'}")


def run_comparison(cluster: LocalCluster, plan: ComparisonPlan, *, keep_work: bool) -> int:
    """Starts ``cluster``, runs the plan's jobs, reports, and stops every process.

    The cluster's work folder is removed at the end unless ``keep_work`` or a process did
    not exit cleanly.

    Returns:
        0 when every job finished and every process stopped cleanly, else 1 (or the first
        job's exit code).
    """
    started = time.monotonic()
    compare = plan.gptfl is not None
    code: int | None = EXIT_FAILURE
    try:
        print(f"==> creating a development PKI in {cluster.pki_dir}")
        cluster.provision()
        if compare:
            address = cluster.start_synth()
            print(f"==> synth service up: {address} (mutual TLS, CPU)")
        endpoints = cluster.start_coordinator()
        print(f"==> coordinator up: fleet {endpoints.fleet}, admin {endpoints.admin} (mutual TLS)")
        cluster.start_silos()
        names = ", ".join(p.silo_id for p in cluster.silos)
        print(f"==> started {len(cluster.silos)} silo agents: {names}")
        with cluster.admin() as admin:
            if plan.gptfl is not None:
                print(f"==> 1/2 GPT-FL: {plan.gptfl_step}")
                gptfl_code, gptfl_summary = _run_job(admin, plan.gptfl, "GPT-FL")
                _print_initial_model(gptfl_summary)
                print("==> 2/2 FL from scratch: the same job from a random initialisation")
                scratch_code, scratch_summary = _run_job(admin, plan.scratch, "scratch")
                code = gptfl_code or scratch_code
                summaries = [gptfl_summary, scratch_summary]
            else:
                code, scratch_summary = _run_job(admin, plan.scratch, "FL from scratch")
                summaries = [scratch_summary]
        _report(cluster, plan, summaries)
    except ClusterError as exc:
        print(f"{plan.program}: {exc}", file=sys.stderr)
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
            keep_work = True
            code = code or EXIT_FAILURE
        else:
            print(f"==> all {len(exits)} processes stopped cleanly")
        if keep_work:
            print(f"==> work folder kept: {cluster.work_dir}")
        else:
            shutil.rmtree(cluster.work_dir, ignore_errors=True)
    print(f"==> {plan.program.removeprefix('gptfl ')} took {time.monotonic() - started:.1f}s")
    return code if code is not None else EXIT_OK
