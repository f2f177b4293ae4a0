"""Correlation study: every criterion against the oracle on one model and data (Molchanov et al. 2019,
Tables 1-2). Pearson, Spearman and Kendall correlations, per layer (averaged over layers) and across all
layers, against the squared oracle (Eq. 3) and against the signed oracle."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lightning_prune.dependency import DependencyGraph
from lightning_prune.importance import estimate_importance
from lightning_prune.importance.estimate import graph_for
from lightning_prune.study.common import batches_of, build_model, load_split
from lightning_prune.study.criteria import parse_entries
from lightning_prune.study.oracle_cache import cached_oracle
from lightning_prune.study.stats import METRICS


def home_layers(graph: DependencyGraph) -> dict[str, torch.Tensor]:
    """Prunable neurons grouped by the first gated layer holding them."""
    seen = torch.zeros(graph.num_neurons, dtype=torch.bool)
    groups = {}
    for name, gate in graph.gates.items():
        neurons = gate.neurons.unique()
        neurons = neurons[graph.prunable[neurons] & ~seen[neurons]]
        seen[neurons] = True
        if neurons.numel():
            groups[name] = neurons
    return groups


def correlations(scores: torch.Tensor, oracle: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every metric across all neurons and per layer (mean over layers with at least 3 neurons)."""
    all_neurons = torch.cat(list(groups.values()))
    out: dict[str, Any] = {"all_layers": {}, "per_layer_mean": {}, "per_layer": {}}
    for metric, fn in METRICS.items():
        out["all_layers"][metric] = fn(scores[all_neurons], oracle[all_neurons])
        values = []
        for name, neurons in groups.items():
            if neurons.numel() < 3:
                continue
            v = fn(scores[neurons], oracle[neurons])
            out["per_layer"].setdefault(name, {})[metric] = v
            if not math.isnan(v):
                values.append(v)
        out["per_layer_mean"][metric] = sum(values) / len(values) if values else math.nan
    return out


def run_correlation(cfg: Any) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.seed)
    data = load_split(cfg.dataset, "train", cfg.images, cfg.seed)
    batches = batches_of(data, cfg.batch_size)
    graph = graph_for(model, batches[0], placement=cfg.gate_placement)
    start = time.perf_counter()
    oracle = cached_oracle(cfg.model, cfg.dataset, "train", cfg.images, cfg.seed, cfg.batch_size,
                           cfg.gate_placement, use_cache=cfg.cache, model=model)  # fmt: skip
    oracle_seconds = oracle["seconds"]
    entries = parse_entries(cfg.criteria)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    groups = home_layers(graph)
    usable = []
    for entry in entries:  # criteria that do not apply to this network (e.g. bn_scale without BatchNorm)
        try:
            entry.build(cfg.seed).setup(graph)
            usable.append(entry)
        except Exception as err:
            results[entry.label] = {"error": str(err)}
    t = time.perf_counter()
    # one pass over the data per kind of output gradient, shared by all criteria
    estimated = estimate_importance(
        model, batches, criterion=[e.build(cfg.seed) for e in usable], graph=graph, hessian=cfg.hessian,
        hessian_samples=cfg.hessian_samples, seed=cfg.seed,
    )  # fmt: skip
    timings["all_criteria"] = time.perf_counter() - t
    for entry, scores in zip(usable, estimated.values()):
        neurons = scores.neurons
        results[entry.label] = {
            "squared_oracle": correlations(neurons, oracle["squared"], groups),
            "signed_oracle": correlations(neurons, oracle["signed"], groups),
        }
    results = {e.label: results[e.label] for e in entries}
    report = {
        "study": "correlation",
        "config": _plain(cfg),
        "model": cfg.model,
        "neurons": int(graph.num_prunable),
        "layers": len(groups),
        "images": int(oracle["examples"]),
        "oracle_seconds": oracle_seconds,
        "oracle_evaluations": oracle["evaluations"],
        "base_loss": oracle["base_loss"],
        "criterion_seconds": timings,
        "results": results,
        "total_seconds": time.perf_counter() - start,
    }
    (out_dir / "correlation.json").write_text(json.dumps(report, indent=1))
    (out_dir / "correlation.md").write_text(correlation_markdown(report))
    correlation_plot(report, out_dir / "correlation.png")
    return report


def correlation_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Correlation with the oracle: {report['model']}",
        "",
        f"{report['neurons']} prunable neurons in {report['layers']} layers, {report['images']} images; "
        f"oracle: {report['oracle_seconds']:.1f} s for {report['oracle_evaluations']} neuron-batch evaluations "
        f"(loss {report['base_loss']:.4f}).",
        "",
    ]
    for target, title in (("squared_oracle", "squared oracle (E - E')^2, Eq. 3"), ("signed_oracle", "signed oracle E' - E")):
        lines += [f"## Against the {title}", "",
                  "| criterion | Pearson (layer mean) | Spearman (layer mean) | Kendall (layer mean) "
                  "| Pearson (all) | Spearman (all) | Kendall (all) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for label, r in report["results"].items():
            if "error" in r:
                continue
            c = r[target]
            cells = [c["per_layer_mean"][m] for m in ("pearson", "spearman", "kendall")]
            cells += [c["all_layers"][m] for m in ("pearson", "spearman", "kendall")]
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in cells) + " |")
        lines.append("")
    skipped = {k: v["error"] for k, v in report["results"].items() if "error" in v}
    if skipped:
        lines += ["Not applicable: " + "; ".join(f"{k} ({v.split(';')[0]})" for k, v in skipped.items()), ""]
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def correlation_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k, v in report["results"].items() if "error" not in v]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(labels) + 1.5), sharey=True)
    for ax, scope in zip(axes, ("per_layer_mean", "all_layers")):
        for j, metric in enumerate(("pearson", "spearman", "kendall")):
            values = [report["results"][k]["squared_oracle"][scope][metric] for k in labels]
            ax.barh([i + (j - 1) * 0.27 for i in range(len(labels))], [0 if math.isnan(v) else v for v in values],
                    height=0.27, label=metric)  # fmt: skip
        ax.set_title(f"{report['model']}: {scope.replace('_', ' ')}")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plain(cfg: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return dict(cfg) if isinstance(cfg, dict) else str(cfg)
