"""GPT-FL against FL from scratch: two finished jobs' summaries side by side.

``gptfl demo`` runs the same federated job twice, once from the model the pretrain phase made
(GPT-FL) and once from a random initialisation (scratch), with the same seeds, silos and
partitions, and writes the comparison next to the GPT-FL job's own report::

    runs/<gptfl job>/comparison.json   per-round accuracies, rounds to 90%/95% (80%/90% with
                                       DP), provenance, and with DP the budget and epsilons
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


def epsilons_by_round(summary: Mapping[str, Any]) -> list[dict[str, float]]:
    """Each round's ``{silo: epsilon}``: the cumulative DP epsilon each silo reported with
    its accepted update of that round (``silo_epsilon`` in summary.json)."""
    return [dict(r.get("silo_epsilon") or {}) for r in summary.get("rounds", [])]


def final_epsilons(summary: Mapping[str, Any]) -> dict[str, float]:
    """Each silo's last reported sample-level DP epsilon in a job (silos without DP left out)."""
    spends: dict[str, float] = {}
    for silo, record in summary.get("silos", {}).items():
        privacy = record.get("privacy") if isinstance(record, Mapping) else None
        if isinstance(privacy, Mapping) and isinstance(privacy.get("epsilon"), int | float):
            spends[silo] = float(privacy["epsilon"])
    return spends


def build_comparison(
    gptfl: Mapping[str, Any],
    scratch: Mapping[str, Any],
    *,
    settings: Mapping[str, Any],
    thresholds: Sequence[float] = THRESHOLDS,
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The comparison record of two job summaries (``summary.json`` contents).

    Args:
        gptfl: the GPT-FL job's summary.
        scratch: the scratch job's summary.
        settings: the federation both ran on, for the record.
        thresholds: the accuracy levels whose first round is reported.
        privacy: with DP-SGD at the silos: ``budget`` (the silos' ``privacy`` settings) and
            ``epsilon_by_round`` (per job, each round's ``{silo: epsilon}``,
            :func:`epsilons_by_round`); the record adds each silo's final epsilon per job
            from the summaries.
    """
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
        "thresholds": list(thresholds),
        "rounds_to": {
            name: {f"{level:.2f}": rounds_to_reach(curve, level) for level in thresholds}
            for name, curve in curves.items()
        },
        "privacy": (
            {
                "budget": dict(privacy.get("budget", {})),
                "epsilon_by_round": dict(privacy.get("epsilon_by_round", {})),
                "final": {"gptfl": final_epsilons(gptfl), "scratch": final_epsilons(scratch)},
            }
            if privacy is not None
            else None
        ),
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
    thresholds = comparison.get("thresholds", THRESHOLDS)
    init = comparison.get("initialisation", {})
    privacy = comparison.get("privacy")
    lines = [
        "# GPT-FL vs FL from scratch" + (", both with DP-SGD at every silo" if privacy else ""),
        "",
        f"- GPT-FL job `{comparison['gptfl_job']}` ({comparison['status']['gptfl']}), "
        f"scratch job `{comparison['scratch_job']}` ({comparison['status']['scratch']})",
        "- same federation for both: "
        + ", ".join(f"{key} {value}" for key, value in settings.items()),
    ]
    if privacy:
        lines.append(_budget_line(privacy))
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
        + "".join(f" | rounds to {round(100 * level)}%" for level in thresholds)
        + " |",
        "|---|" + "---:|" * (len(milestones) + len(thresholds)),
    ]
    for name, curve in (("GPT-FL", gptfl), ("scratch", scratch)):
        key = "gptfl" if name == "GPT-FL" else "scratch"
        cells = [_pct(curve[r - 1]) if r <= len(curve) else "-" for r in milestones]
        cells += [_rounds(rounds_to[key][f"{level:.2f}"], planned) for level in thresholds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    by_round = privacy.get("epsilon_by_round", {}) if privacy else {}
    lines += [
        "",
        "Test accuracy is the coordinator's server-side evaluation of each round's global "
        "model on the held-out test split, which no silo trains on.",
        "",
        "| round | GPT-FL | scratch | difference (points) |"
        + (" largest silo epsilon, GPT-FL | largest silo epsilon, scratch |" if privacy else ""),
        "|---:|---:|---:|---:|" + ("---:|---:|" if privacy else ""),
        f"| 0 | {_pct(comparison['synthetic_only_accuracy'])} | "
        f"{_pct(comparison['scratch_initial_accuracy'])} | |" + (" 0 | 0 |" if privacy else ""),
    ]
    for index in range(planned):
        a = gptfl[index] if index < len(gptfl) else None
        b = scratch[index] if index < len(scratch) else None
        diff = f"{100 * (a - b):+.2f}" if a is not None and b is not None else "-"
        row = f"| {index + 1} | {_pct(a)} | {_pct(b)} | {diff} |"
        if privacy:
            row += "".join(
                f" {_eps(_largest(by_round.get(key, []), index))} |" for key in ("gptfl", "scratch")
            )
        lines.append(row)
    if privacy:
        lines += _silo_epsilon_table(privacy)
    return "\n".join(lines) + "\n"


def _largest(rounds: Sequence[Mapping[str, float]], index: int) -> float | None:
    """The largest epsilon any silo had reported by round ``index + 1``."""
    return max(rounds[index].values(), default=None) if index < len(rounds) else None


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _budget_line(privacy: Mapping[str, Any]) -> str:
    budget = privacy.get("budget", {})
    final = privacy.get("final", {})
    spent = ", ".join(
        f"{name} {_eps(max(final.get(key, {}).values(), default=None))}"
        for name, key in (("GPT-FL", "gptfl"), ("scratch", "scratch"))
    )
    return (
        f"- **privacy budget**: sample-level DP-SGD at every silo (Opacus, "
        f"{budget.get('accountant', 'rdp')} accountant, per-sample gradients clipped to "
        f"{budget.get('max_grad_norm')}): each silo's epsilon on its own training data stays "
        f"within **{budget.get('target_epsilon')}** at delta **{budget.get('target_delta')}** "
        f"in each job; the most any silo spent: {spent}. The synthetic pretraining uses no "
        "silo data and spends none of it (docs/privacy.md)"
    )


def _silo_epsilon_table(privacy: Mapping[str, Any]) -> list[str]:
    final = privacy.get("final", {})
    silos = sorted(set(final.get("gptfl", {})) | set(final.get("scratch", {})))
    lines = [
        "",
        "## Each silo's epsilon at the end of each job",
        "",
        "| silo | GPT-FL | scratch |",
        "|---|---:|---:|",
    ]
    for silo in silos:
        lines.append(
            f"| {silo} | {_eps(final.get('gptfl', {}).get(silo))} | "
            f"{_eps(final.get('scratch', {}).get(silo))} |"
        )
    return lines


def plot_comparison(comparison: Mapping[str, Any], path: Path) -> bool:
    """Both test-accuracy curves, round 0 (the initial model) included; False if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    privacy = comparison.get("privacy")
    if privacy:
        fig, (ax, spent_ax) = plt.subplots(
            2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
        )
    else:
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
        for level in comparison.get("thresholds", THRESHOLDS):
            ax.axhline(level, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("round (0 = initial model)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title("GPT-FL vs FL from scratch")
        if privacy:
            _plot_epsilon(spent_ax, privacy)
            ax.set_xlabel("")
            ax.set_title(
                f"GPT-FL vs FL from scratch, DP-SGD at every silo (epsilon <= "
                f"{privacy.get('budget', {}).get('target_epsilon')})"
            )
        fig.tight_layout()
        with atomic_io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return plotted


def _plot_epsilon(ax: Any, privacy: Mapping[str, Any]) -> None:
    """The largest silo epsilon after each round of each job, under the budget's line."""
    by_round = privacy.get("epsilon_by_round", {})
    for key, label in (("gptfl", "GPT-FL"), ("scratch", "scratch")):
        rounds = by_round.get(key, [])
        points = [(i + 1, _largest(rounds, i)) for i in range(len(rounds))]
        xs = [x for x, y in points if y is not None]
        if xs:
            ax.plot(xs, [y for _, y in points if y is not None], marker=".", label=label)
    target = privacy.get("budget", {}).get("target_epsilon")
    if isinstance(target, int | float):
        ax.axhline(target, color="red", linewidth=0.8, linestyle="--", label="budget")
    ax.set_xlabel("round (0 = initial model)")
    ax.set_ylabel("largest silo epsilon")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def write_comparison(
    out_dir: Path,
    gptfl: Mapping[str, Any],
    scratch: Mapping[str, Any],
    *,
    settings: Mapping[str, Any],
    thresholds: Sequence[float] = THRESHOLDS,
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes comparison.json, comparison.png and comparison.md into ``out_dir`` (the
    arguments as :func:`build_comparison`'s)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = build_comparison(
        gptfl, scratch, settings=settings, thresholds=thresholds, privacy=privacy
    )
    atomic_io.write_json(out_dir / "comparison.json", comparison)
    plotted = plot_comparison(comparison, out_dir / "comparison.png")
    atomic_io.write_text(
        out_dir / "comparison.md",
        render_markdown(comparison, plot_name="comparison.png" if plotted else None),
    )
    return comparison
