"""Group magnitude: a neuron's weights in every layer it touches, the data-free baseline of Torch-Pruning."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.dependency import DependencyGraph
from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.base import Criterion
from lightning_prune.importance.registry import register_criterion
from lightning_prune.importance.weight_taylor import spread_to_gates

REDUCTIONS = ("sum", "mean")
NORMALIZERS = (None, "mean")


@register_criterion("group_magnitude")
class GroupMagnitude(Criterion):
    """``sum |w|^p`` over every parameter slice of a neuron, per layer, aggregated over its layers.

    A neuron's slices are the rows of its *writers* (Conv/Linear filters, depthwise filters, BatchNorm
    gamma; biases and BatchNorm beta too if ``bias``) and the input columns of its *readers* (the
    Conv/Linear weights reading its channels, all features of a flattened channel together). Each layer
    gives ``sum |w|^p`` over its slice; ``reduction="sum"`` adds the layers up, ``"mean"`` divides by the
    number of layers the neuron touches (channels tied by residual additions touch more). With
    ``normalize="mean"`` scores are divided by the mean score of the neuron's group: the neurons that
    share gated layers (a block's internal channels; a residual stream), counting only neurons whose
    writers are not all zero (not yet removed). Torch-Pruning's ``GroupMagnitudeImportance`` defaults
    are ``p=2, reduction="mean", normalize="mean"``.
    """

    data_driven = False

    def __init__(self, p: float = 2, reduction: str = "mean", normalize: str | None = "mean", bias: bool = False):
        if not p > 0:
            raise PruningConfigurationError(f"group_magnitude p must be positive, got {p!r}")
        if reduction not in REDUCTIONS:
            raise PruningConfigurationError(f"group_magnitude reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if normalize not in NORMALIZERS:
            raise PruningConfigurationError(
                f"group_magnitude normalize must be one of {NORMALIZERS}, got {normalize!r}"
            )
        self.p, self.reduction, self.normalize, self.bias = p, reduction, normalize, bias

    def static_scores(self, graph: DependencyGraph) -> dict[str, torch.Tensor]:
        total = torch.zeros(graph.num_neurons, dtype=torch.float64)
        layers = torch.zeros(graph.num_neurons, dtype=torch.float64)
        written = torch.zeros(graph.num_neurons, dtype=torch.float64)
        for neurons, values, is_writer in self._slices(graph):
            keep = neurons >= 0
            total.index_add_(0, neurons[keep], values[keep])
            if is_writer:
                written.index_add_(0, neurons[keep], values[keep])
            touched = torch.zeros(graph.num_neurons, dtype=torch.bool)
            touched[neurons[keep]] = True
            layers += touched
        if self.reduction == "mean":
            total = total / layers.clamp_min(1)
        if self.normalize == "mean":
            total = total / group_means(graph, total, written > 0)
        return spread_to_gates(graph, total)

    def _slices(self, graph: DependencyGraph):
        """``(neuron per row, sum |w|^p per row, is a writer)`` of every layer the neurons touch."""
        for name, neurons in graph.writers.items():
            module = graph.modules[name]
            attrs = ("weight", "bias") if self.bias else ("weight",)
            values = [self._rows(t) for a in attrs if isinstance(t := getattr(module, a, None), torch.Tensor)]
            if values:
                yield neurons, sum(values), True
        for name, neurons in graph.readers.items():
            module = graph.modules[name]
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
                continue  # a depthwise filter reads only its own channel: counted once, as a writer
            yield neurons, self._rows(module.weight.transpose(0, 1)), False

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().abs().pow(self.p).reshape(t.shape[0], -1).sum(1).cpu()


def group_means(graph: DependencyGraph, scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Per neuron, the mean score over the ``alive`` neurons of its group (neurons linked by sharing a
    gated layer); 1 where a group has none."""
    parent = list(range(graph.num_neurons))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for gate in graph.gates.values():
        first = root(int(gate.neurons[0]))
        for n in gate.neurons.tolist():
            parent[root(n)] = first
    group = torch.tensor([root(i) for i in range(graph.num_neurons)])
    sums = torch.zeros(graph.num_neurons, dtype=torch.float64).index_add_(0, group, scores * alive)
    counts = torch.zeros(graph.num_neurons, dtype=torch.float64).index_add_(0, group, alive.double())
    means = sums / counts.clamp_min(1)
    return torch.where(means[group] > 0, means[group], torch.ones_like(scores))
