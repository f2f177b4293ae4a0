"""Pruning curves: prune a fixed network step by step without fine-tuning (Molchanov et al. 2019,
Figures 2-4). After every step the importance is re-estimated (a ``-fixed`` entry estimates once and
prunes in that order); the training loss and test accuracy are recorded against neurons pruned, for
several seeds (seeds draw the images used to estimate and seed the random criterion). ``oracle`` prunes
with the oracle of Eq. 3, re-evaluated every step: the neurons whose removal changes the loss least,
``(E - E')^2``; ``oracle_signed`` those whose removal raises it least, ``E' - E`` (it overfits the
estimation images: a neuron whose removal lowers their loss may raise it elsewhere)."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.importance import estimate_importance, prune_once
from lightning_prune.compaction import alive_from_masks
from lightning_prune.importance.estimate import apply_alive, graph_for
from lightning_prune.oracle import oracle_importance
from lightning_prune.study.common import batches_of, build_model, load_split
from lightning_prune.study.correlation import _plain
from lightning_prune.study.criteria import CriterionEntry, parse_entries


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        count += y.numel()
    return loss / max(count, 1), correct / max(count, 1)


def crossing(pruned: list[int], losses: list[float], threshold: float) -> float | None:
    """Neurons pruned when the loss first reaches ``threshold`` (linear interpolation); None if never."""
    for i, loss in enumerate(losses):
        if loss >= threshold:
            if i == 0:
                return 0.0
            l0, l1, p0, p1 = losses[i - 1], loss, pruned[i - 1], pruned[i]
            return p0 + (p1 - p0) * (threshold - l0) / (l1 - l0) if l1 > l0 else float(p1)
    return None


def prune_curve(base: nn.Module, entry: CriterionEntry, seed: int, cfg: Any, train_pool, eval_train, eval_test) -> dict:
    model = copy.deepcopy(base).eval()
    images = entry.images or cfg.images
    gen = torch.Generator().manual_seed(seed)
    x_pool, y_pool = train_pool.tensors
    idx = torch.randperm(len(x_pool), generator=gen)[:images]
    bs = cfg.batch_size
    est = [(x_pool[idx[i : i + bs]], y_pool[idx[i : i + bs]]) for i in range(0, len(idx), bs)]
    graph = graph_for(model, est[0], placement=cfg.gate_placement)
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    loss, acc = evaluate(model, eval_train) if eval_train else (math.nan, math.nan)
    _, acc = evaluate(model, eval_test) if eval_test else (math.nan, acc)
    record = {"pruned": [0], "loss": [loss], "accuracy": [acc], "seconds": 0.0, "images": images}
    max_pruned = min(cfg.max_pruned or graph.num_prunable, graph.num_prunable - 1)
    start = time.perf_counter()
    order_scores = None
    # "oracle": the squared oracle of Eq. 3 (least change of the loss first); "oracle_signed": least increase
    criterion = None if entry.criterion in ("oracle", "oracle_signed") else entry.build(seed)
    while record["pruned"][-1] < max_pruned:
        if order_scores is None or not entry.fixed:
            if criterion is None:
                oracle = oracle_importance(model, est, graph=graph, alive=alive)
                order_scores = oracle.signed if entry.criterion == "oracle_signed" else oracle.squared
            else:
                order_scores = estimate_importance(
                    model, est, criterion=criterion, graph=graph, alive=alive, hessian=cfg.hessian,
                    hessian_samples=cfg.hessian_samples, seed=seed,
                ).neurons  # fmt: skip
        num = min(cfg.step, max_pruned - record["pruned"][-1])
        new_alive = alive_from_masks(graph, prune_once(
            model, order_scores.clone(), num=num, graph=graph, alive=alive, min_channels=cfg.min_channels
        ))  # fmt: skip
        if int((alive & ~new_alive).sum()) == 0:
            break
        alive = new_alive
        apply_alive(graph, alive)
        loss, acc = evaluate(model, eval_train) if eval_train else (math.nan, math.nan)
        if eval_test:
            _, acc = evaluate(model, eval_test)
        record["pruned"].append(int((~alive & graph.prunable).sum()))
        record["loss"].append(loss)
        record["accuracy"].append(acc)
        if cfg.stop_loss is not None and not math.isnan(loss) and loss > cfg.stop_loss:
            break
    record["seconds"] = time.perf_counter() - start
    return record


def run_curve(cfg: Any) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = build_model(cfg.model, 0)
    entries = parse_entries(cfg.criteria)
    pool_size = max([cfg.images] + [e.images or 0 for e in entries])
    train_pool = load_split(cfg.dataset, "train", max(pool_size, cfg.pool_images), cfg.data_seed)
    eval_train, eval_test = [], []
    if cfg.loss_images:
        eval_train = batches_of(load_split(cfg.dataset, "train", cfg.loss_images, cfg.data_seed + 1), 500)
    if cfg.test_images:
        eval_test = batches_of(load_split(cfg.dataset, "test", cfg.test_images, cfg.data_seed), 500)
    curves: dict[str, list[dict]] = {}
    for entry in entries:
        curves[entry.label] = []
        for seed in cfg.seeds:
            curves[entry.label].append(prune_curve(base, entry, int(seed), cfg, train_pool, eval_train, eval_test))
            _write(cfg, curves, out_dir)
    return _write(cfg, curves, out_dir)


def _write(cfg: Any, curves: dict[str, list[dict]], out_dir: Path) -> dict[str, Any]:
    summary = {}
    for label, runs in curves.items():
        cross = [crossing(r["pruned"], r["loss"], cfg.loss_threshold) for r in runs]
        found = [c for c in cross if c is not None]
        mean = sum(found) / len(found) if found else None
        std = math.sqrt(sum((c - mean) ** 2 for c in found) / len(found)) if found else None
        summary[label] = {"crossings": cross, "mean": mean, "std": std, "seeds": len(runs),
                          "seconds": sum(r["seconds"] for r in runs)}  # fmt: skip
    report = {"study": "curve", "config": _plain(cfg), "model": cfg.model, "threshold": cfg.loss_threshold,
              "summary": summary, "curves": curves}  # fmt: skip
    (out_dir / "curve.json").write_text(json.dumps(report, indent=1))
    (out_dir / "curve.md").write_text(curve_markdown(report))
    curve_plot(report, out_dir / "curve.png")
    return report


def curve_markdown(report: dict[str, Any]) -> str:
    thr = report["threshold"]
    lines = [f"# Pruning without fine-tuning: {report['model']}", "",
             f"Neurons pruned when the training loss reaches {thr} (mean +- std over seeds; "
             "'never' when a run did not reach it), and the test accuracy along the way.", "",
             "| criterion | neurons pruned at loss threshold | runs reaching it | test acc before pruning | seconds (all seeds) |",
             "|---|---|---|---|---|"]  # fmt: skip
    order = sorted(report["summary"].items(), key=lambda kv: -(kv[1]["mean"] if kv[1]["mean"] is not None else 1e9))
    for label, s in order:
        runs = report["curves"][label]
        reached = sum(c is not None for c in s["crossings"])
        value = "never" if s["mean"] is None else f"{s['mean']:.1f} +- {s['std']:.1f}"
        acc0 = runs[0]["accuracy"][0] if runs else math.nan
        lines.append(f"| {label} | {value} | {reached}/{s['seeds']} | {acc0:.3f} | {s['seconds']:.0f} |")
    lines.append("")
    # test accuracy at the neuron counts every run reached (mean +- std over seeds)
    runs_all = [r for runs in report["curves"].values() for r in runs]
    if runs_all:
        common = sorted(set.intersection(*(set(r["pruned"]) for r in runs_all)))
        if len(common) > 12:
            common = common[:: -(-len(common) // 12)]
        if common:
            lines += ["Test accuracy after pruning (mean +- std over seeds):", "",
                      "| criterion | " + " | ".join(str(c) for c in common) + " |",
                      "|---|" + "---|" * len(common)]  # fmt: skip
            for label, runs in report["curves"].items():
                cells = []
                for c in common:
                    accs = torch.tensor([r["accuracy"][r["pruned"].index(c)] for r in runs], dtype=torch.float64)
                    spread = f" +- {float(accs.std(unbiased=False)):.3f}" if len(runs) > 1 else ""
                    cells.append(f"{float(accs.mean()):.3f}{spread}")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def curve_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.cm.tab20.colors if len(report["curves"]) > 10 else plt.cm.tab10.colors
    for i, (label, runs) in enumerate(report["curves"].items()):
        if not runs:
            continue
        length = min(len(r["pruned"]) for r in runs)
        x = torch.tensor(runs[0]["pruned"][:length], dtype=torch.float64)
        for ax, key in zip(axes, ("loss", "accuracy")):
            y = torch.tensor([r[key][:length] for r in runs], dtype=torch.float64)
            if torch.isnan(y).all():
                continue
            mean, std = y.mean(0), y.std(0, unbiased=False)
            (line,) = ax.plot(x, mean, label=label, ls="--" if label.endswith("fixed") else "-",
                              color=colors[i % len(colors)])  # fmt: skip
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    axes[0].axhline(report["threshold"], color="k", lw=0.6, ls=":")
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("test accuracy")
    for ax in axes:
        ax.set_xlabel("neurons pruned")
    axes[0].set_title(f"{report['model']}: loss (mean +- std over seeds)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge_curves(directories: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Merge the ``curve.json`` of several runs (e.g. criteria run in parallel processes) into one report."""
    from omegaconf import OmegaConf

    curves: dict[str, list[dict]] = {}
    config = None
    for d in directories:
        report = json.loads((Path(d) / "curve.json").read_text())
        config = config or report["config"]
        curves.update(report["curves"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.create(config)
    cfg.criteria = list(curves)
    return _write(cfg, curves, out_dir)


if __name__ == "__main__":  # python -m lightning_prune.study.curve OUT_DIR IN_DIR [IN_DIR ...]
    import sys

    merge_curves(sys.argv[2:], sys.argv[1])
