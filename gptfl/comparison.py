"""GPT-FL against FL from scratch: two finished jobs' summaries side by side.

``gptfl demo`` runs the same federated job twice, once from the model the pretrain phase made
(GPT-FL) and once from a random initialisation (scratch), with the same seeds, silos and
partitions, and writes the comparison next to the GPT-FL job's own report::

    runs/<gptfl job>/comparison.json   per-round accuracies, rounds to 90%/95%, provenance
    runs/<gptfl job>/comparison.md     the same as a table, with the plot
    runs/<gptfl job>/comparison.png    both test-accuracy curves (round 0 = initial model)

The format of ``comparison.json`` is documented in docs/quickstart.md ("What the demo
writes").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gptfl import atomic_io

COMPARISON_VERSION = 1
#: accuracy levels whose first round is reported
THRESHOLDS = (0.90, 0.95)
#: rounds whose accuracy the table and the terminal summary highlight
MILESTONE_ROUNDS = (1, 5, 10, 30)


def accuracy_curve(summary: Mapping[str, Any]) -> list[float | None]:
    """The server-side test accuracy of each round, round 1 first."""
    return [r.get("test_accuracy") for r in summary.get("rounds", [])]


def initial_accuracy(summary: Mapping[str, Any]) -> float | None:
    """The initial model's test accuracy (round 0), when the coordinator measured it."""
    evaluation = summary.get("initialisation", {}).get("evaluation", {})
    value = evaluation.get("test_accuracy") if isinstance(evaluation, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def rounds_to_reach(accuracies: Sequence[float | None], level: float) -> int | None:
    """The first round (1-based) whose accuracy is at least ``level``; None if none is."""
    for number, value in enumerate(accuracies, start=1):
        if value is not None and value >= level:
            return number
    return None


def build_comparison(
    gptfl: Mapping[str, Any], scratch: Mapping[str, Any], *, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The comparison record of two job summaries (``summary.json`` contents)."""
    curves = {"gptfl": accuracy_curve(gptfl), "scratch": accuracy_curve(scratch)}
    init = gptfl.get("initialisation", {})
    return {
        "comparison_version": COMPARISON_VERSION,
        "gptfl_job": gptfl.get("job_id"),
        "scratch_job": scratch.get("job_id"),
        "settings": dict(settings),
        "gptfl": curves["gptfl"],
        "scratch": curves["scratch"],
        "synthetic_only_accuracy": initial_accuracy(gptfl),
        "scratch_initial_accuracy": initial_accuracy(scratch),
        "rounds_to": {
            name: {f"{level:.2f}": rounds_to_reach(curve, level) for level in THRESHOLDS}
            for name, curve in curves.items()
        },
        "final": {name: (curve[-1] if curve else None) for name, curve in curves.items()},
        "status": {"gptfl": gptfl.get("status"), "scratch": scratch.get("status")},
        "initialisation": {
            key: init.get(key)
            for key in (
                "kind",
                "generator_id",
                "generator_hash",
                "dataset_id",
                "manifest_sha256",
                "images",
                "fallback",
            )
            if key in init
        },
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _rounds(value: int | None, planned: int) -> str:
    return f"not within {planned}" if value is None else str(value)


def render_markdown(comparison: Mapping[str, Any], *, plot_name: str | None) -> str:
    """comparison.md: settings, milestones, rounds to 90%/95%, and the per-round table."""
    gptfl, scratch = comparison["gptfl"], comparison["scratch"]
    planned = max(len(gptfl), len(scratch))
    settings = comparison["settings"]
    rounds_to = comparison["rounds_to"]
    init = comparison.get("initialisation", {})
    lines = [
        "# GPT-FL vs FL from scratch",
        "",
        f"- GPT-FL job `{comparison['gptfl_job']}` ({comparison['status']['gptfl']}), "
        f"scratch job `{comparison['scratch_job']}` ({comparison['status']['scratch']})",
        "- same federation for both: "
        + ", ".join(f"{key} {value}" for key, value in settings.items()),
    ]
    if init.get("kind") == "pretrain":
        lines.append(
            f"- GPT-FL's initial model: pretrained on {init.get('images')} synthetic images "
            f"from generator `{init.get('generator_id')}` (hash `{init.get('generator_hash')}`"
            f"), dataset `{init.get('dataset_id')}`"
        )
    elif init.get("fallback"):
        lines.append(
            "- **the pretrain phase failed; the GPT-FL job started from a random "
            f"initialisation**: {init['fallback'].get('reason')}"
        )
    lines += [
        f"- synthetic-only accuracy (GPT-FL's round 0): "
        f"**{_pct(comparison['synthetic_only_accuracy'])}**; scratch's round 0: "
        f"{_pct(comparison['scratch_initial_accuracy'])}",
        "",
    ]
    if plot_name:
        lines += [f"![test accuracy per round]({plot_name})", ""]
    milestones = [r for r in MILESTONE_ROUNDS if r <= planned]
    lines += [
        "| | "
        + " | ".join(f"round {r}" for r in milestones)
        + " | rounds to 90% | rounds to 95% |",
        "|---|" + "---:|" * (len(milestones) + 2),
    ]
    for name, curve in (("GPT-FL", gptfl), ("scratch", scratch)):
        key = "gptfl" if name == "GPT-FL" else "scratch"
        cells = [_pct(curve[r - 1]) if r <= len(curve) else "-" for r in milestones]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {_rounds(rounds_to[key]['0.90'], planned)}"
            + f" | {_rounds(rounds_to[key]['0.95'], planned)} |"
        )
    lines += [
        "",
        "Test accuracy is the coordinator's server-side evaluation of each round's global "
        "model on the held-out test split, which no silo trains on.",
        "",
        "| round | GPT-FL | scratch | difference (points) |",
        "|---:|---:|---:|---:|",
        f"| 0 | {_pct(comparison['synthetic_only_accuracy'])} | "
        f"{_pct(comparison['scratch_initial_accuracy'])} | |",
    ]
    for index in range(planned):
        a = gptfl[index] if index < len(gptfl) else None
        b = scratch[index] if index < len(scratch) else None
        diff = f"{100 * (a - b):+.2f}" if a is not None and b is not None else "-"
        lines.append(f"| {index + 1} | {_pct(a)} | {_pct(b)} | {diff} |")
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: Mapping[str, Any], path: Path) -> bool:
    """Both test-accuracy curves, round 0 (the initial model) included; False if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    for key, label, initial in (
        ("gptfl", "GPT-FL (pretrained on synthetic data)", "synthetic_only_accuracy"),
        ("scratch", "FL from random initialisation", "scratch_initial_accuracy"),
    ):
        points = [(0, comparison.get(initial))] + list(enumerate(comparison[key], start=1))
        xs = [x for x, y in points if y is not None]
        ys = [y for _, y in points if y is not None]
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
            plotted = True
    if plotted:
        for level in THRESHOLDS:
            ax.axhline(level, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("round (0 = initial model)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title("GPT-FL vs FL from scratch")
        fig.tight_layout()
        with atomic_io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return plotted


def write_comparison(
    out_dir: Path,
    gptfl: Mapping[str, Any],
    scratch: Mapping[str, Any],
    *,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Writes comparison.json, comparison.png and comparison.md into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = build_comparison(gptfl, scratch, settings=settings)
    atomic_io.write_json(out_dir / "comparison.json", comparison)
    plotted = plot_comparison(comparison, out_dir / "comparison.png")
    atomic_io.write_text(
        out_dir / "comparison.md",
        render_markdown(comparison, plot_name="comparison.png" if plotted else None),
    )
    return comparison
