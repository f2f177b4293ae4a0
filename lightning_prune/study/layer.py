"""Single-layer pruning references (the paper's Figure 2): in one gated layer, the loss after removing
``k`` neurons chosen by the combinatorial oracle (the best of all subsets, for ``k <= max_k``), by the
greedy oracle (the least harmful neuron each step, re-evaluated), and by each criterion (re-estimated
after every removal), without fine-tuning."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lightning_prune.importance import estimate_importance
from lightning_prune.importance.estimate import graph_for
from lightning_prune.oracle import combinatorial_oracle, greedy_oracle_pruning, subset_losses
from lightning_prune.pruner import NeuronSelector
from lightning_prune.study.common import batches_of, build_model, load_split
from lightning_prune.study.correlation import _plain
from lightning_prune.study.criteria import parse_entries


def run_layer(cfg: Any) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg.model, 0)
    batches = batches_of(load_split(cfg.dataset, "train", cfg.images, cfg.seed), cfg.batch_size)
    graph = graph_for(model, batches[0], placement=cfg.gate_placement)
    layer = cfg.layer or next(iter(graph.gates))
    neurons = sorted({int(n) for n in graph.gates[layer].neurons.tolist() if graph.prunable[n]})
    n = len(neurons)
    steps = n - 1
    curves: dict[str, dict[str, list]] = {}
    t = time.perf_counter()
    comb = combinatorial_oracle(model, batches, layer, graph=graph, ks=list(range(1, min(cfg.max_k, steps) + 1)))
    curves["combinatorial oracle"] = {"k": [0] + sorted(comb.best_loss), "loss": [comb.base_loss] + [
        comb.best_loss[k] for k in sorted(comb.best_loss)], "seconds": time.perf_counter() - t}  # fmt: skip
    curves["combinatorial worst"] = {"k": [0] + sorted(comb.worst_loss), "loss": [comb.base_loss] + [
        comb.worst_loss[k] for k in sorted(comb.worst_loss)]}  # fmt: skip
    t = time.perf_counter()
    greedy = greedy_oracle_pruning(model, batches, graph=graph, steps=steps, neurons=neurons)
    curves["greedy oracle"] = {"k": greedy.pruned, "loss": greedy.loss, "seconds": time.perf_counter() - t}
    selector = NeuronSelector(graph, 1)
    allowed = torch.zeros(graph.num_neurons, dtype=torch.bool)
    allowed[neurons] = True
    for entry in parse_entries(cfg.criteria):
        t = time.perf_counter()
        criterion = entry.build(cfg.seed)
        alive = torch.ones(graph.num_neurons, dtype=torch.bool)
        removed: list[int] = []
        scores = None
        for _ in range(steps):
            if scores is None or not entry.fixed:
                # removed neurons are zeroed by the oracle's runner only: estimate on a pruned copy
                scores = _scores_with_removed(model, batches, graph, criterion, removed, cfg)
            values = torch.where(allowed & alive, torch.nan_to_num(scores, nan=math.inf), torch.full_like(scores, math.inf))
            chosen = selector.select(values, alive & allowed, 1)
            if chosen.numel() == 0:
                break
            alive[chosen] = False
            removed += chosen.tolist()
        _, losses = subset_losses(model, batches, [removed[:k] for k in range(1, len(removed) + 1)], graph=graph)
        curves[entry.label] = {"k": list(range(len(removed) + 1)), "loss": [comb.base_loss] + losses.tolist(),
                               "seconds": time.perf_counter() - t}  # fmt: skip
    report = {"study": "layer", "config": _plain(cfg), "model": cfg.model, "layer": layer, "neurons": n,
              "images": cfg.images, "curves": curves}  # fmt: skip
    (out_dir / "layer.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Pruning one layer without fine-tuning: {cfg.model} `{layer}` ({n} neurons, {cfg.images} images)", "",
             "Training loss after removing k neurons of the layer.", "",
             "| method | " + " | ".join(f"k={k}" for k in range(0, steps + 1)) + " |",
             "|---|" + "---|" * (steps + 1)]  # fmt: skip
    for label, c in curves.items():
        cells = {k: f"{v:.3f}" for k, v in zip(c["k"], c["loss"])}
        lines.append(f"| {label} | " + " | ".join(cells.get(k, "") for k in range(0, steps + 1)) + " |")
    (out_dir / "layer.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, c in curves.items():
        style = "k-" if label.startswith("combinatorial oracle") else ("k:" if "worst" in label else "-")
        ax.plot(c["k"], c["loss"], style, label=label, marker="o" if "oracle" in label else None, ms=3)
    ax.set_xlabel(f"neurons pruned in {layer}")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "layer.png", dpi=100)
    plt.close(fig)
    return report


def _scores_with_removed(model, batches, graph, criterion, removed, cfg) -> torch.Tensor:
    import copy

    from lightning_prune.importance.estimate import apply_alive

    pruned = copy.deepcopy(model)
    pgraph = graph_for(pruned, batches[0], placement=cfg.gate_placement)
    alive = torch.ones(pgraph.num_neurons, dtype=torch.bool)
    alive[removed] = False
    apply_alive(pgraph, alive)
    return estimate_importance(pruned, batches, criterion=criterion, graph=pgraph, alive=alive, hessian=cfg.hessian,
                               hessian_samples=cfg.hessian_samples, seed=cfg.seed).neurons  # fmt: skip
