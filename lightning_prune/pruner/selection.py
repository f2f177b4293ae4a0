"""Choosing which neurons to remove: the globally least important, never emptying a layer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_prune.dependency import DependencyGraph


def neuron_scores(graph: DependencyGraph, gate_scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Score of every neuron: the sum of its channels' scores over all gated layers it ties together."""
    scores = torch.zeros(graph.num_neurons, dtype=torch.float64)
    for name, gate in graph.gates.items():
        if name in gate_scores:
            scores.index_add_(0, gate.neurons, gate_scores[name].detach().to("cpu", torch.float64))
    return scores


class NeuronSelector:
    """Greedy global selection under a per-layer floor of ``min_channels`` remaining channels."""

    def __init__(self, graph: DependencyGraph, min_channels: int = 1) -> None:
        self.graph = graph
        self.min_channels = min_channels
        self._gate_names = list(graph.gates)
        # for every neuron, the gated layers holding it (with multiplicity)
        self._members: list[list[int]] = [[] for _ in range(graph.num_neurons)]
        for index, gate in enumerate(graph.gates.values()):
            for neuron in gate.neurons.tolist():
                self._members[neuron].append(index)

    def remaining(self, alive: torch.Tensor) -> list[int]:
        return [int(alive[g.neurons].sum()) for g in self.graph.gates.values()]

    def select(self, scores: torch.Tensor, alive: torch.Tensor, count: int) -> torch.Tensor:
        """Up to ``count`` alive prunable neurons, lowest score first (ties: lowest id first)."""
        candidates = torch.nonzero(alive & self.graph.prunable).flatten()
        order = candidates[torch.sort(scores[candidates], stable=True).indices]
        left = self.remaining(alive)
        chosen: list[int] = []
        for neuron in order.tolist():
            if len(chosen) == count:
                break
            members = self._members[neuron]
            if any(left[g] - members.count(g) < self.min_channels for g in set(members)):
                continue
            for g in members:
                left[g] -= 1
            chosen.append(neuron)
        return torch.tensor(chosen, dtype=torch.long)

    def max_removable(self, alive: torch.Tensor) -> int:
        """How many neurons can be removed at most from ``alive`` under the per-layer floor."""
        return len(self.select(torch.zeros(self.graph.num_neurons), alive, self.graph.num_neurons))


def fewest_reaching(cost_after: Callable[[int], float], most: int, budget: float) -> int:
    """The fewest removals ``k`` in ``[1, most]`` with ``cost_after(k) <= budget`` (``most`` if none does):
    a binary search, since the cost of the network falls as more of the lowest-scoring neurons go."""
    if most <= 1 or cost_after(most) > budget:
        return most
    low, high = 1, most  # cost_after(high) <= budget
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if cost_after(middle) <= budget else (middle + 1, high)
    return high
