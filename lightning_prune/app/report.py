"""``lightning-prune-report SWEEP_DIR``: aggregate the runs of a Hydra sweep (or any folder of runs)
into ``report.md`` (a Markdown table: one row per run, and mean +- std over seeds) and ``report.png``."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_prune.app.plots import plt, read_csv

REPORT_MD = "report.md"
REPORT_PNG = "report.png"


def find_runs(root: str | Path) -> list[Path]:
    """Folders under ``root`` (itself included) holding a ``metrics.json``, sorted."""
    root = Path(root)
    return sorted({p.parent for p in root.rglob("metrics.json")}, key=lambda p: (len(p.parts), str(p)))


def run_overrides(run_dir: Path) -> dict[str, str]:
    """The command-line overrides of a run, from Hydra's ``.hydra/overrides.yaml`` (``{}`` if absent)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def load_runs(root: str | Path) -> list[dict[str, Any]]:
    runs = []
    for run_dir in find_runs(root):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        curve = run_dir / "pruning_curve.csv"
        runs.append({
            "dir": run_dir,
            "overrides": run_overrides(run_dir),
            "metrics": metrics,
            "curve": read_csv(curve) if curve.is_file() else [],
        })  # fmt: skip
    return runs


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f}"
    if kind == "mflops":
        return f"{value / 1e6:.2f}"
    if kind == "params":
        return f"{value / 1e6:.3f}"
    if kind == "float":
        return f"{value:.4f}"
    if kind == "time":
        return f"{value:.0f}"
    return str(value)


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def differing_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value is not the same in every run (none for a single run)."""
    if len(runs) < 2:
        return []
    keys = sorted({k for r in runs for k in r["overrides"]})
    return [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]


def make_report(root: str | Path, group_out: tuple[str, ...] = ("seed",)) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown report of the runs under ``root`` and the runs themselves."""
    root = Path(root)
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run with a metrics.json under {root}")
    all_keys = sorted({k for r in runs for k in r["overrides"]})
    # columns: the overrides that differ between runs; the shared ones are listed once above the table
    keys = differing_keys(runs)
    shared = [f"`{k}={runs[0]['overrides'][k]}`" for k in all_keys if k not in keys]
    lines = [f"# Sweep report: {root}", "", f"{len(runs)} runs."]
    if shared:
        lines += ["", "Common overrides: " + " ".join(shared)]
    lines += ["", "top-1 and loss on the validation set after the last stage; FLOPs per example.", ""]
    header = ["run", *keys, "top-1 (%)", "loss", "MFLOPs", "FLOPs kept", "params (M)", "neurons kept", "wall (s)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        f = r["metrics"].get("final", {})
        row = [
            str(r["dir"].relative_to(root)) if r["dir"] != root else ".",
            *(r["overrides"].get(k, "") for k in keys),
            _fmt(f.get("top1"), "pct"),
            _fmt(f.get("loss"), "float"),
            _fmt(f.get("flops"), "mflops"),
            _fmt(f.get("flops_ratio"), "float"),
            _fmt(f.get("params"), "params"),
            _fmt(f.get("neurons_kept"), ""),
            _fmt(f.get("wall_time_s"), "time"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    group_keys = [k for k in keys if k not in group_out]
    if len(runs) > 1 and len(group_keys) < len(keys):
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in runs:
            groups[tuple(r["overrides"].get(k, "") for k in group_keys)].append(r)
        lines += ["", f"Mean ± std over {', '.join(group_out)}:", ""]
        header = [*group_keys, "runs", "top-1 (%)", "MFLOPs", "params (M)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, members in sorted(groups.items()):
            finals = [m["metrics"].get("final", {}) for m in members]
            row = [
                *key,
                str(len(members)),
                _mean_std([100 * f["top1"] for f in finals if f.get("top1") is not None]),
                _mean_std([f["flops"] / 1e6 for f in finals if f.get("flops") is not None]),
                _mean_std([f["params"] / 1e6 for f in finals if f.get("params") is not None]),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n", runs


def run_labels(runs: list[dict[str, Any]], group_out: tuple[str, ...] = ("seed",)) -> list[str]:
    """One legend label per run: the overrides that differ between the runs, less ``group_out`` (runs that
    differ only in those share a label); the recipe (or folder) name where nothing is left."""
    keys = [k for k in differing_keys(runs) if k not in group_out]
    return [
        ", ".join(f"{k}={r['overrides'][k]}" for k in keys if k in r["overrides"])
        or r["metrics"].get("recipe") or r["dir"].name
        for r in runs
    ]


def report_figure(runs: list[dict[str, Any]], group_out: tuple[str, ...] = ("seed",)) -> plt.Figure:
    """Accuracy while pruning and final FLOPs vs accuracy, one colour per label, a legend under each panel."""
    fig, (ax_curve, ax_flops) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    labels = run_labels(runs, group_out)
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(dict.fromkeys(labels))}
    curve_seen: set[str] = set()
    flops_seen: set[str] = set()
    for r, label in zip(runs, labels):
        if r["curve"]:
            ax_curve.plot([c["neurons_pruned"] for c in r["curve"]], [100 * c["val_top1"] for c in r["curve"]], "-",
                          color=colors[label], alpha=0.8, label=None if label in curve_seen else label)  # fmt: skip
            curve_seen.add(label)
        f = r["metrics"].get("final", {})
        if f.get("flops") is not None and f.get("top1") is not None:
            ax_flops.scatter(f["flops"] / 1e6, 100 * f["top1"], color=colors[label],
                             label=None if label in flops_seen else label)  # fmt: skip
            flops_seen.add(label)
    ax_curve.set(xlabel="neurons pruned", ylabel="top-1 accuracy (%)", title="accuracy while pruning (probe)")
    ax_flops.set(xlabel="MFLOPs per example", ylabel="final top-1 accuracy (%)", title="FLOPs vs accuracy")
    for ax in (ax_curve, ax_flops):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    return fig


def plot_report(runs: list[dict[str, Any]], path: Path, group_out: tuple[str, ...] = ("seed",)) -> Path:
    fig = report_figure(runs, group_out)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # tight: nothing of the legends is cut off
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-prune-report", description=__doc__)
    parser.add_argument("sweep_dir", help="a multirun folder (or any folder of runs with metrics.json)")
    parser.add_argument("--out", help="output folder (default: the sweep folder)")
    parser.add_argument("--group-out", default="seed",
                        help="comma-separated overrides averaged over in the summary table (default: seed)")  # fmt: skip
    args = parser.parse_args(argv)
    group_out = tuple(k for k in args.group_out.split(",") if k)
    text, runs = make_report(args.sweep_dir, group_out)
    out = Path(args.out or args.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MD).write_text(text)
    plot_report(runs, out / REPORT_PNG, group_out)
    print(text)
    print(f"wrote {out / REPORT_MD} and {out / REPORT_PNG}")


if __name__ == "__main__":
    main()
