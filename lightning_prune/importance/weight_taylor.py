"""Taylor importance on weights (Molchanov et al., CVPR 2019, Eq. 7 and 8).

A neuron's parameters ``S`` are the rows of every layer that *writes* its channels (the Conv/Linear
filter and bias producing it, the BatchNorm gamma and beta normalising it). ``form="squares"`` sums
``(g_s w_s)^2`` over ``S`` (Eq. 8); ``form="group"`` squares the sum, ``(sum_s g_s w_s)^2`` (Eq. 7).
"""

from __future__ import annotations

import torch

from lightning_prune.dependency import DependencyGraph
from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.base import Criterion
from lightning_prune.importance.gate_gradients import GateGradients
from lightning_prune.importance.registry import register_criterion
from lightning_prune.importance.statistics import BatchStatistics, writer_parameters


def per_neuron(graph: DependencyGraph, layer_values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum, per neuron, of per-row values of writer layers (``layer -> [rows]``)."""
    total = torch.zeros(graph.num_neurons, dtype=torch.float64)
    for name, values in layer_values.items():
        neurons = graph.writers[name]
        keep = neurons >= 0
        total.index_add_(0, neurons[keep], values.reshape(-1)[keep].double().cpu())
    return total


def row_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1) if t.ndim > 1 else t


def spread_to_gates(graph: DependencyGraph, neuron_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gate-channel scores that add up to ``neuron_values`` per neuron (split evenly over its channels)."""
    count = torch.zeros(graph.num_neurons, dtype=torch.float64)
    for gate in graph.gates.values():
        count.index_add_(0, gate.neurons, torch.ones(gate.channels, dtype=torch.float64))
    share = neuron_values.double() / count.clamp_min(1)
    return {name: share[gate.neurons].float() for name, gate in graph.gates.items()}


def live_parameter_gradients(graph: DependencyGraph) -> dict[str, dict[str, torch.Tensor]]:
    """``.grad`` of the writers' parameters as they are now (zeros where none)."""
    grads = {}
    for layer, params in writer_parameters(graph).items():
        grads[layer] = {
            attr: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float() for attr, p in params.items()
        }
    return grads


@register_criterion("taylor_fo_weight")
class TaylorFOWeight(Criterion):
    """First-order Taylor on the weights of each neuron: ``sum (g w)^2`` (``squares``) or ``(sum g w)^2`` (``group``)."""

    requires = frozenset({"param_grad"})

    def __init__(self, form: str = "squares") -> None:
        if form not in ("squares", "group"):
            raise PruningConfigurationError(f"taylor_fo_weight form must be 'squares' or 'group', got {form!r}")
        self.form = form

    def _scores(self, graph: DependencyGraph, grads: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        params = writer_parameters(graph)
        values = {}
        for layer, layer_grads in grads.items():
            rows = None
            for attr, g in layer_grads.items():
                prod = params[layer][attr].detach().float().to(g.device) * g
                part = row_sum(prod.square()) if self.form == "squares" else row_sum(prod)
                rows = part if rows is None else rows + part
            values[layer] = rows
        neuron = per_neuron(graph, values)
        if self.form == "group":
            neuron = neuron.square()
        return spread_to_gates(graph, neuron)

    def batch_scores(self, stats: BatchStatistics) -> dict[str, torch.Tensor]:
        return self._scores(stats.graph, stats.param_grads)

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        # in the callback parameter gradients are live (and unscaled) when step_scores runs
        return self._scores(self.graph, live_parameter_gradients(self.graph))
