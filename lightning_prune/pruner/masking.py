"""Keeping removed neurons removed: zero their parameters, gradients and optimizer state."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_prune.dependency import DependencyGraph
from lightning_prune.ops.layers import KeptLayerNorm


class NeuronMasks:
    """The parameter slices holding each removed neuron, derived from the graph's writers.

    ``dead`` is a bool per neuron. A removed neuron's output channels are produced by its writers'
    rows (Conv/Linear filter and bias, BatchNorm gamma, beta and running mean, LayerNorm weight and bias)
    and by the slices of the parameters that write it (a class token, a position embedding): zeroing them
    makes the channel exactly zero, in training and eval mode. A LayerNorm over removed channels leaves
    them out of its statistics (``KeptLayerNorm.kept``), as the compact network does.
    """

    def __init__(self, graph: DependencyGraph) -> None:
        self.graph = graph
        self._slices: list[tuple[nn.Module, str, int, torch.Tensor]] = []  # (owner, attribute, dim, removed indices)

    def update(self, dead: torch.Tensor) -> None:
        """Recompute the slices for the set of removed neurons ``dead``."""
        padded = torch.cat([dead, torch.tensor([False])])  # index -1 (structural zero) -> not removed
        self._slices = []
        for name, neurons in self.graph.writers.items():
            removed = padded[neurons]
            module = self.graph.modules[name]
            if isinstance(module, KeptLayerNorm):
                module.kept = (~removed).to(next(module.parameters(), removed).device) if removed.any() else None
            rows = torch.nonzero(removed).flatten()
            for attr in ("weight", "bias", "running_mean") if rows.numel() else ():
                self._add(module, attr, 0, rows)
        prefix = self.graph.prefix  # parameters are named from the traced network
        for name, (dim, neurons) in self.graph.parameters.items():
            owner, _, attr = name[len(prefix):].rpartition(".")
            module = self.graph.modules[prefix + owner]
            rows = torch.nonzero(padded[neurons]).flatten()
            if rows.numel():
                self._add(module, attr, dim, rows)

    def _add(self, module: nn.Module, attr: str, dim: int, rows: torch.Tensor) -> None:
        tensor = getattr(module, attr, None)
        if isinstance(tensor, torch.Tensor):
            self._slices.append((module, attr, dim, rows.to(tensor.device)))

    def _tensors(self) -> Iterable[tuple[torch.Tensor, int, torch.Tensor]]:
        for module, attr, dim, rows in self._slices:
            tensor = getattr(module, attr, None)
            if isinstance(tensor, torch.Tensor):
                yield tensor, dim, rows

    @torch.no_grad()
    def zero_parameters(self) -> None:
        for tensor, dim, rows in self._tensors():
            tensor.index_fill_(dim, rows, 0.0)

    @torch.no_grad()
    def zero_gradients(self) -> None:
        for tensor, dim, rows in self._tensors():
            if tensor.grad is not None:
                tensor.grad.index_fill_(dim, rows, 0.0)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zero every per-parameter state tensor (momentum, Adam moments) at the removed rows."""
        for optimizer in optimizers:
            for tensor, dim, rows in self._tensors():
                for value in optimizer.state.get(tensor, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                        value.index_fill_(dim, rows.to(value.device), 0.0)


def reset_optimizer_state(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Forget all optimizer state (momentum buffers, Adam moments), as after the last pruning step."""
    for optimizer in optimizers:
        optimizer.state.clear()

