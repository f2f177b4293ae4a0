"""PNG plots of one run (from its ``pruning_curve.csv`` / ``pruning_history.csv`` / ``metrics.json``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ACCURACY_LOSS_PNG = "accuracy_loss_vs_neurons_pruned.png"
FLOPS_ACCURACY_PNG = "flops_vs_accuracy.png"


def read_csv(path: Path) -> list[dict[str, float | None]]:
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's plots into ``run_dir``; returns the files written."""
    run_dir = Path(run_dir)
    written = []
    curve_file = run_dir / "pruning_curve.csv"
    history_file = run_dir / "pruning_history.csv"
    curve = read_csv(curve_file) if curve_file.is_file() else []
    history = read_csv(history_file) if history_file.is_file() else []
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    title = metrics.get("recipe") or run_dir.name
    if curve or history:
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
        if curve:
            ax_acc.plot([r["neurons_pruned"] for r in curve], [100 * r["val_top1"] for r in curve], "o-", ms=3,
                        label="validation (probe batches)")  # fmt: skip
            ax_loss.plot([r["neurons_pruned"] for r in curve], [r["val_loss"] for r in curve], "o-", ms=3,
                         label="validation loss (probe batches)")  # fmt: skip
        if history:
            pts = [(r["neurons_pruned"], r["loss"]) for r in history if r.get("loss") is not None]
            if pts:
                ax_loss.plot(*zip(*pts), "s-", ms=2, label="training loss (smoothed)")
        ax_acc.set(xlabel="neurons pruned", ylabel="top-1 accuracy (%)", title=f"{title}: accuracy while pruning")
        ax_loss.set(xlabel="neurons pruned", ylabel="loss", title="loss while pruning")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / ACCURACY_LOSS_PNG, dpi=110)
        plt.close(fig)
        written.append(run_dir / ACCURACY_LOSS_PNG)
    stages = metrics.get("stages", {})
    if curve or stages:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        if curve:
            ax.plot([r["flops"] / 1e6 for r in curve], [100 * r["val_top1"] for r in curve], "o-", ms=3,
                    label="while pruning (probe batches)")  # fmt: skip
        points: dict[tuple[float, float], list[str]] = {}
        for name, s in stages.items():  # stages at the same point (finetuned, compact) share one label
            points.setdefault((round(s["flops"] / 1e6, 3), round(100 * s["top1"], 2)), []).append(name)
        for (x, y), names in points.items():
            ax.scatter(x, y, marker="*", s=120, zorder=3)
            ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set(xlabel="MFLOPs per example", ylabel="top-1 accuracy (%)", title=f"{title}: FLOPs vs accuracy")
        ax.grid(alpha=0.3)
        if curve:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / FLOPS_ACCURACY_PNG, dpi=110)
        plt.close(fig)
        written.append(run_dir / FLOPS_ACCURACY_PNG)
    return written
