"""Choosing the neurons to keep under a latency budget: a multiple-choice knapsack, as HALP (Shen et al.,
2022) formulates it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lightning_prune.dependency import DependencyGraph
from lightning_prune.latency.table import LatencyTable


@dataclass(frozen=True)
class _Group:
    """Gated layers sharing neurons (a residual stream), whose width one choice of the knapsack sets."""

    neurons: torch.Tensor  # the neurons of its gates
    gates: tuple[torch.Tensor, ...]  # neuron per channel of each gate
    layers: tuple[str, ...]  # the table's layers reading or writing its neurons


class LatencySelector:
    """Keeps the most important neurons under a latency budget.

    Each group of gated layers sharing neurons is one item of the knapsack: keeping its ``k`` most
    important alive prunable neurons is worth the sum of their scores and costs the latency of every
    layer reading or writing them (and of the other ops writing them, :meth:`LatencyTable.rest_seconds`),
    at widths on the table's step grid (or keeping all it has), never below ``min_channels`` channels in
    a gated layer. A layer's latency depends on two groups (its input
    and its output); the cost of a group's choice is the latency change of the layers it touches with
    the other groups at a reference choice (exact when one group changes). The dynamic programme over
    that cost in ``bins`` steps is solved for the largest capacity (found by ``search`` bisection steps)
    whose choice the table predicts within the budget; up to ``rounds`` times, each from the previous
    choice. The most valuable choice within the budget is returned.
    """

    def __init__(self, graph: DependencyGraph, table: LatencyTable, min_channels: int = 1) -> None:
        self.graph = graph
        self.table = table
        self.min_channels = min_channels
        gates = [g.neurons for g in graph.gates.values()]
        parent = list(range(len(gates)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        first: dict[int, int] = {}
        for index, neurons in enumerate(gates):
            for neuron in neurons[neurons >= 0].unique().tolist():
                parent[root(first.setdefault(neuron, index))] = root(index)
        members: dict[int, list[int]] = {}
        for index in range(len(gates)):
            members.setdefault(root(index), []).append(index)
        self.groups = []
        for indices in members.values():
            neurons = torch.cat([gates[i] for i in indices])
            neurons = neurons[neurons >= 0].unique()
            layers = tuple(
                name
                for name, layer in table.layers.items()
                if torch.isin(layer.in_ids, neurons).any() or torch.isin(layer.out_ids, neurons).any()
            )
            self.groups.append(_Group(neurons, tuple(gates[i] for i in indices), layers))

    def select(
        self,
        scores: torch.Tensor,
        alive: torch.Tensor,
        budget: float,
        *,
        bins: int = 2000,
        rounds: int = 3,
        search: int = 8,
    ) -> torch.Tensor:
        """Bool per neuron: the alive neurons kept, maximising the sum of ``scores`` (one per neuron, as
        :func:`~lightning_prune.pruner.selection.neuron_scores` gives) with the table's predicted latency
        at most ``budget`` seconds. Removed neurons stay removed. When no choice tried fits the budget (it
        is below what the floors allow), the fastest one."""
        alive = alive.to("cpu", torch.bool)
        if self.table.predict(alive) <= budget:  # nothing has to go (removed neurons cannot come back)
            return alive
        scores = scores.to("cpu", torch.float64)
        reference = alive
        best, best_value, fastest = None, -float("inf"), (float("inf"), alive)
        for _ in range(rounds):
            options = [self._options(group, scores, alive, reference) for group in self.groups]
            values, costs = [o[1] for o in options], [o[2] for o in options]
            low, high = sum(c.min() for c in costs), budget - self.table.predict(reference)
            capacity, found = high, None
            for attempt in range(search):  # bisection on the capacity the approximate costs may use
                chosen = alive.clone()
                picks = _knapsack(values, costs, capacity, bins)
                for group, (kept, _, _), pick in zip(self.groups, options, picks):
                    chosen[group.neurons] = False
                    chosen[kept[pick]] = True
                latency = self.table.predict(chosen)
                fastest = min(fastest, (latency, chosen), key=lambda pair: pair[0])
                if latency <= budget:
                    found, low = chosen, capacity
                    value = float(scores[chosen].sum())
                    if value > best_value:
                        best, best_value = chosen, value
                    if attempt == 0:
                        break
                else:
                    high = capacity
                capacity = (low + high) / 2
            if found is None or torch.equal(found, reference):
                break
            reference = found
        return best if best is not None else fastest[1]

    def _options(
        self, group: _Group, scores: torch.Tensor, alive: torch.Tensor, reference: torch.Tensor
    ) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
        """The neurons each allowed choice of ``group`` keeps, its value, and its latency change from
        ``reference``."""
        prunable = self.graph.prunable[group.neurons]
        fixed = group.neurons[alive[group.neurons] & ~prunable]
        candidates = group.neurons[alive[group.neurons] & prunable]
        ranked = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(scores[ranked], 0)])
        padded = torch.cat([alive, torch.tensor([False])])
        floors = [min(self.min_channels, int(padded[g].sum())) for g in group.gates]
        layers = [self.table.layers[name] for name in group.layers]
        ref_padded = torch.cat([reference, torch.tensor([False])])
        rest = self.table.rest_seconds  # the rest of the network shrinks with the activations it writes

        def seconds(padded: torch.Tensor) -> float:
            return sum(layer.seconds(*layer.widths(padded)) for layer in layers) + rest(padded[:-1])

        base = seconds(ref_padded)
        kept, values, costs = [], [], []
        for k in range(ranked.numel() + 1):
            if (fixed.numel() + k) % self.table.width_step and k < ranked.numel():
                continue
            keep = torch.cat([fixed, ranked[:k]])
            trial = ref_padded.clone()
            trial[group.neurons] = False
            trial[keep] = True
            if any(int(trial[g].sum()) < floor for g, floor in zip(group.gates, floors)):
                continue
            kept.append(keep)
            values.append(float(cumulative[k]))
            costs.append(seconds(trial) - base)
        return kept, np.array(values), np.array(costs)


def _knapsack(values: list[np.ndarray], costs: list[np.ndarray], capacity: float, bins: int) -> list[int]:
    """One option per group maximising the total value with the total cost at most ``capacity``, costs
    rounded up to ``capacity / bins`` (what is chosen always fits); the cheapest options if none fits.
    Options are in ascending cost; of options of equal value the last is taken (neurons scoring zero
    are kept while the budget allows)."""
    spare = capacity - sum(c.min() for c in costs)
    if spare <= 0:
        return [int(c.argmin()) for c in costs]
    unit = spare / bins
    best = np.zeros(bins + 1)  # best value of the groups so far with a total (rounded) cost <= b units
    steps, choices = [], []
    for value, cost in zip(values, costs):
        weight = np.ceil((cost - cost.min()) / unit - 1e-9).astype(np.int64)
        new = np.full(bins + 1, -np.inf)
        choice = np.zeros(bins + 1, dtype=np.int64)
        for j in np.flatnonzero(weight <= bins)[::-1]:  # the costliest first: a tie keeps the costlier option
            total = np.full(bins + 1, -np.inf)
            total[weight[j]:] = best[: bins + 1 - weight[j]] + value[j]
            better = total > new
            new[better], choice[better] = total[better], j
        best = new
        steps.append(weight)
        choices.append(choice)
    picks, b = [], bins
    for weight, choice in zip(reversed(steps), reversed(choices)):
        j = int(choice[b])
        picks.append(j)
        b -= int(weight[j])
    return picks[::-1]
