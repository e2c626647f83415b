"""The end-of-job export: final model, ``summary.json``, ``report.md`` and a plot.

``summary.json`` is documented in docs/summary-json.md; its ``rounds`` list holds one entry per
round with at least ``round``, ``test_accuracy``, ``test_loss`` and ``seconds``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.job_state import JobState, SiloSummary
from coordinator.tasks import ModelVersion
from gptfl import atomic_io
from gptfl.weights_io import save_weights

SUMMARY_VERSION = 1


def build_summary(state: JobState, *, model_digest: str | None) -> dict[str, Any]:
    rounds = [r.to_json() for r in state.rounds]
    last = rounds[-1] if rounds else {}
    return {
        "summary_version": SUMMARY_VERSION,
        "job_id": state.job_id,
        "name": state.spec.get("name"),
        "status": state.phase.value,
        "message": state.message,
        "rounds_completed": len(rounds),
        "rounds_planned": state.spec.get("rounds"),
        "created_unix": state.created_unix,
        "finished_unix": state.finished_unix,
        "seconds": (state.finished_unix or time.time()) - state.created_unix,
        "model": {**state.spec.get("model", {}), "blake3": model_digest},
        "strategy": state.spec.get("strategy", {}),
        "initialisation": state.initialisation,
        "final": {
            key: last.get(key)
            for key in ("test_accuracy", "test_loss", "federated_accuracy", "federated_loss")
        },
        "silos": {silo: _silo_summary(s) for silo, s in sorted(state.silos.items())},
        "silo_level_privacy": state.silo_level_privacy or None,
        "rounds": rounds,
        "spec": state.spec,
    }


def _silo_summary(s: SiloSummary) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "rounds_participated": s.rounds_participated,
        "examples": s.examples,
        "updates_rejected": s.updates_rejected,
        "tasks_declined": s.tasks_declined,
        # the sample-level DP spend the silo reported last (None: it trained without DP)
        "privacy": (
            {
                "epsilon": s.privacy_epsilon,
                "delta": s.privacy_delta,
                "accountant": s.privacy_accountant,
            }
            if s.privacy_epsilon is not None
            else None
        ),
    }
    if s.tasks_declined:
        summary["last_decline"] = {
            "round": s.last_decline_round,
            "kind": s.last_decline_kind,
            "reason": s.last_decline_reason,
        }
    if s.privacy_flag:
        summary["privacy_flag"] = s.privacy_flag
    return summary


def privacy_metadata(state: JobState) -> dict[str, Any]:
    """What the model's metadata says of privacy: each silo's reported spend, and the
    silo-level guarantee of the aggregate when the job had one."""
    return {
        "silos": {
            silo: {"epsilon": s.privacy_epsilon, "delta": s.privacy_delta}
            for silo, s in sorted(state.silos.items())
            if s.privacy_epsilon is not None
        },
        "silo_level": state.silo_level_privacy or None,
    }


def plot_accuracy(state: JobState, path: Path) -> bool:
    """Writes a PNG of accuracy per round; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    initial = initial_test_accuracy(state.initialisation)
    series = {
        # Round 0 is the initial model (for GPT-FL: the synthetic-only accuracy).
        "test (server-side)": [(0, initial)] + [(r.round, r.test_accuracy) for r in state.rounds],
        "federated (silo-side)": [(r.round, r.federated_accuracy) for r in state.rounds],
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for label, points in series.items():
        xs = [x for x, y in points if y is not None]
        ys = [y for _, y in points if y is not None]
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
            plotted = True
    if plotted:
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{state.spec.get('name')}: accuracy per round")
        fig.tight_layout()
        with atomic_io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return plotted


def initial_test_accuracy(initialisation: Mapping[str, Any]) -> float | None:
    """The initial model's server-side test accuracy (round 0), when it was measured."""
    evaluation = initialisation.get("evaluation")
    if not isinstance(evaluation, Mapping):
        return None
    value = evaluation.get("test_accuracy")
    return float(value) if isinstance(value, int | float) else None


def describe_initialisation(initialisation: Mapping[str, Any]) -> str:
    """One line: where the first global model came from."""
    kind = str(initialisation.get("kind", "random"))
    fallback = initialisation.get("fallback")
    if isinstance(fallback, Mapping):
        return (
            f"`{kind}` (seed {initialisation.get('seed')}): the {fallback.get('from')} phase "
            f"failed ({fallback.get('reason')}); the job started from a random "
            "initialisation (`on_failure: random`)"
        )
    if kind == "pretrain":
        return (
            f"`pretrain` (GPT-FL): pretrained on {initialisation.get('images')} synthetic "
            f"images from generator `{initialisation.get('generator_id')}`"
        )
    if kind == "file":
        return f"`file` {initialisation.get('path')} ({initialisation.get('blake3')})"
    if kind == "random":
        return f"`random` (seed {initialisation.get('seed')})"
    return f"`{kind}`"


def _initial_model_section(initialisation: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    initial = initial_test_accuracy(initialisation)
    if initial is not None:
        what = (
            "synthetic-only accuracy"
            if initialisation.get("kind") == "pretrain"
            else "accuracy of the initial model"
        )
        lines += [f"- round 0 ({what}, server-side test set): **{_fmt(initial, True)}**"]
    if initialisation.get("kind") != "pretrain":
        return ["## Initial model", "", *lines, ""] if lines else []
    pretrain = initialisation.get("pretrain", {})
    request = initialisation.get("request", {})
    lines += [
        f"- synth service: `{initialisation.get('synth')}`, backend "
        f"`{initialisation.get('backend')}`, generator `{initialisation.get('generator_id')}` "
        f"(content hash `{initialisation.get('generator_hash')}`)",
        f"- synthetic dataset `{initialisation.get('dataset_id')}` (manifest sha256 "
        f"`{initialisation.get('manifest_sha256')}`): {initialisation.get('images')} images, "
        f"{request.get('images_per_label')} per label, resize mode "
        f"`{request.get('resize_mode')}`, guidance {request.get('guidance_min')}-"
        f"{request.get('guidance_max')}, seed {request.get('seed')}; generated in "
        f"{initialisation.get('generate', {}).get('seconds', 0.0):.1f} s on "
        f"{initialisation.get('generate', {}).get('device')}",
        f"- pretrained in {pretrain.get('seconds', 0.0):.1f} s on {pretrain.get('device')}: "
        f"synthetic validation accuracy {_fmt(pretrain.get('initial_val_accuracy'), True)} "
        f"-> {_fmt(pretrain.get('final_val_accuracy'), True)}; settings "
        f"`{json.dumps(pretrain.get('settings', {}), sort_keys=True)}`",
        f"- initial model blake3 `{initialisation.get('blake3')}`",
        "",
        "| epoch | train loss | synthetic val loss | synthetic val accuracy | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for e in pretrain.get("epochs", []):
        lines.append(
            f"| {e.get('epoch')} | {_fmt(e.get('train_loss'))} | {_fmt(e.get('val_loss'))} | "
            f"{_fmt(e.get('val_accuracy'), True)} | {e.get('seconds', 0.0):.2f} |"
        )
    return ["## Initial model (GPT-FL pretrain phase)", "", *lines, ""]


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if pct else f"{value:.4f}"


def render_markdown(summary: Mapping[str, Any], *, plot_name: str | None) -> str:
    lines = [
        f"# Job {summary['job_id']}",
        "",
        f"- status: **{summary['status']}** {summary['message']}".rstrip(),
        f"- model: `{summary['model'].get('arch')}` ({summary['model'].get('blake3')})",
        f"- strategy: `{summary['strategy'].get('name', 'fedavg')}`",
        f"- initialisation: {describe_initialisation(summary['initialisation'])}",
        f"- rounds: {summary['rounds_completed']} of {summary['rounds_planned']}, "
        f"{summary['seconds']:.1f} s",
        "",
    ]
    lines += _initial_model_section(summary["initialisation"])
    if plot_name:
        lines += [f"![accuracy per round]({plot_name})", ""]
    lines += [
        "| round | test accuracy | test loss | federated accuracy | train loss | silos | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rounds"]:
        lines.append(
            f"| {r['round']} | {_fmt(r['test_accuracy'], True)} | {_fmt(r['test_loss'])} | "
            f"{_fmt(r['federated_accuracy'], True)} | {_fmt(r['train_loss'])} | "
            f"{r['updates_accepted']}/{r['silos_selected']} | {r['seconds']:.2f} |"
        )
    lines += [
        "",
        "## Silos",
        "",
        "| silo | rounds | examples | epsilon (delta) | declined |",
        "|---|---:|---:|---:|---:|",
    ]
    for silo, s in summary["silos"].items():
        privacy = s.get("privacy")
        spend = f"{privacy['epsilon']:.3g} ({privacy['delta']:.1g})" if privacy else "no DP"
        lines.append(
            f"| {silo} | {s['rounds_participated']} | {s['examples']} | {spend} | "
            f"{s.get('tasks_declined', 0)} |"
        )
    notes = [
        f"- {silo}: {s['privacy_flag']}"
        for silo, s in summary["silos"].items()
        if "privacy_flag" in s
    ]
    lines += [""] + (["Privacy flags:", "", *notes, ""] if notes else [])
    lines += _privacy_section(summary.get("silo_level_privacy"))
    return "\n".join(lines) + "\n"


def _privacy_section(silo_level: Mapping[str, Any] | None) -> list[str]:
    if not silo_level:
        return []
    return [
        "## Silo-level differential privacy",
        "",
        f"{silo_level['mechanism']}: updates clipped to {silo_level['clip_norm']:g}, noise "
        f"multiplier {silo_level['noise_multiplier']:.4g}; after {silo_level['rounds']} rounds "
        f"the aggregate is ({silo_level['epsilon']:.3g}, {silo_level['delta']:g})-DP for each "
        f"silo's whole data ({silo_level['accountant']} accountant). See docs/privacy.md.",
        "",
    ]


def export_job(state: JobState, model: ModelVersion | None, out_dir: Path) -> dict[str, Any]:
    """Writes the final model (when there is one), summary.json, report.md and the plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = None
    if model is not None:
        weights, digest = model.weights, model.manifest.digest
        save_weights(
            out_dir / "model.safetensors",
            weights,
            metadata={
                "job_id": state.job_id,
                "rounds": len(state.rounds),
                "model": state.spec.get("model"),
                "initialisation": state.initialisation,
                "privacy": privacy_metadata(state),
                "final_metrics": state.rounds[-1].to_json() if state.rounds else {},
            },
        )
    summary = build_summary(state, model_digest=digest)
    atomic_io.write_json(out_dir / "summary.json", summary)
    plotted = plot_accuracy(state, out_dir / "accuracy.png")
    atomic_io.write_text(
        out_dir / "report.md",
        render_markdown(summary, plot_name="accuracy.png" if plotted else None),
    )
    return summary
