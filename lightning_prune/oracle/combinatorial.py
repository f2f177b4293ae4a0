"""References for pruning curves: the combinatorial oracle of one layer and greedy-oracle pruning.

* :func:`combinatorial_oracle`: for a single gated layer with few neurons, the loss of *every* subset of
  ``k`` removed neurons, and the best subset for each ``k`` (exponential: small layers only).
* :func:`greedy_oracle_pruning`: remove, step after step, the neuron whose removal raises the loss least
  given those already removed (the greedy oracle re-evaluated after every step).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_prune.dependency import DependencyGraph
from lightning_prune.oracle.greedy import SumLoss, _batches, oracle_importance, subset_losses
from lightning_prune.pruner import NeuronSelector


@dataclass
class CombinatorialResult:
    layer: str
    neurons: list[int]  # the layer's prunable neurons
    best_loss: dict[int, float]  # k -> lowest mean loss over all subsets of k removed neurons
    best_subset: dict[int, list[int]]
    worst_loss: dict[int, float]
    base_loss: float
    subsets_evaluated: int
    seconds: float


def combinatorial_oracle(
    model: nn.Module,
    data: Iterable[Any],
    layer: str,
    *,
    graph: DependencyGraph,
    ks: Sequence[int] | None = None,
    loss_fn: SumLoss | None = None,
    num_batches: int | None = None,
    max_subsets: int = 200_000,
) -> CombinatorialResult:
    """Evaluate all subsets of ``k`` of the ``n`` prunable neurons of gated layer ``layer`` (each ``k`` in
    ``ks``, default ``1..n-1``)."""
    start = time.perf_counter()
    gate = graph.gates[layer]
    neurons = sorted({int(n) for n in gate.neurons.tolist() if graph.prunable[n]})
    n = len(neurons)
    ks = list(ks) if ks is not None else list(range(1, n))
    total = sum(math.comb(n, k) for k in ks)
    if total > max_subsets:
        raise ValueError(f"{total} subsets of {n} neurons: too many for the combinatorial oracle (max {max_subsets})")
    batches = _batches(data, num_batches)
    subsets = [list(s) for k in ks for s in itertools.combinations(neurons, k)]
    base, losses = subset_losses(model, batches, subsets, graph=graph, loss_fn=loss_fn)
    best_loss, best_subset, worst_loss = {}, {}, {}
    for subset, loss in zip(subsets, losses.tolist()):
        k = len(subset)
        if k not in best_loss or loss < best_loss[k]:
            best_loss[k], best_subset[k] = loss, subset
        worst_loss[k] = max(worst_loss.get(k, -math.inf), loss)
    return CombinatorialResult(layer, neurons, best_loss, best_subset, worst_loss, base, len(subsets),
                               time.perf_counter() - start)  # fmt: skip


@dataclass
class GreedyOracleResult:
    removed: list[int] = field(default_factory=list)  # neurons in removal order
    loss: list[float] = field(default_factory=list)  # mean loss after each step (loss[0]: nothing removed)
    pruned: list[int] = field(default_factory=list)  # neurons removed after each step
    seconds: float = 0.0


def greedy_oracle_pruning(
    model: nn.Module,
    data: Iterable[Any],
    *,
    graph: DependencyGraph,
    steps: int,
    per_step: int = 1,
    neurons: Sequence[int] | None = None,
    alive: torch.Tensor | None = None,
    min_channels: int = 1,
    loss_fn: SumLoss | None = None,
    num_batches: int | None = None,
) -> GreedyOracleResult:
    """Remove ``per_step`` neurons per step for ``steps`` steps, each time those whose removal (alone)
    raises the loss least, re-evaluating the oracle after every step. ``neurons`` restricts the
    candidates (e.g. one layer's). The network's parameters are left untouched."""
    start = time.perf_counter()
    batches = _batches(data, num_batches)
    alive = torch.ones(graph.num_neurons, dtype=torch.bool) if alive is None else alive.clone()
    selector = NeuronSelector(graph, min_channels)
    allowed = torch.zeros(graph.num_neurons, dtype=torch.bool)
    allowed[torch.tensor(neurons, dtype=torch.long) if neurons is not None else graph.prunable] = True
    result = GreedyOracleResult()
    for step in range(steps):
        cands = torch.nonzero(alive & allowed & graph.prunable).flatten().tolist()
        if not cands:
            break
        scores = oracle_importance(model, batches, graph=graph, alive=alive, neurons=cands, loss_fn=loss_fn)
        if step == 0:
            result.loss.append(scores.base_loss)
            result.pruned.append(0)
        values = torch.nan_to_num(scores.signed, nan=float("inf"))
        chosen = selector.select(values, alive & allowed, per_step)
        if chosen.numel() == 0:
            break
        alive[chosen] = False
        result.removed.extend(chosen.tolist())
        # the loss after removal: the oracle already computed it for a single neuron
        if chosen.numel() == 1:
            result.loss.append(scores.base_loss + float(scores.signed[chosen[0]]))
        else:
            base, _ = subset_losses(model, batches, [], graph=graph, removed=torch.nonzero(~alive).flatten().tolist(),
                                    loss_fn=loss_fn)  # fmt: skip
            result.loss.append(base)
        result.pruned.append(len(result.removed))
    result.seconds = time.perf_counter() - start
    return result
