"""Keeping removed neurons removed: zero their parameters, gradients and optimizer state."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_prune.dependency import DependencyGraph


class NeuronMasks:
    """The parameter slices holding each removed neuron, derived from the graph's writers.

    ``dead`` is a bool per neuron. A removed neuron's output channels are produced by its writers'
    rows (Conv/Linear filter and bias, BatchNorm gamma, beta and running mean): zeroing them makes the
    channel exactly zero, in training and eval mode.
    """

    def __init__(self, graph: DependencyGraph) -> None:
        self.graph = graph
        self._slices: list[tuple[nn.Module, torch.Tensor]] = []

    def update(self, dead: torch.Tensor) -> None:
        """Recompute the slices for the set of removed neurons ``dead``."""
        padded = torch.cat([dead, torch.tensor([False])])  # index -1 (structural zero) -> not removed
        self._slices = []
        for name, neurons in self.graph.writers.items():
            rows = torch.nonzero(padded[neurons]).flatten()
            if rows.numel():
                module = self.graph.modules[name]
                self._slices.append((module, rows.to(module.weight.device if _has(module, "weight") else "cpu")))

    def _tensors(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for module, rows in self._slices:
            for attr in ("weight", "bias", "running_mean"):
                tensor = getattr(module, attr, None)
                if isinstance(tensor, torch.Tensor):
                    yield tensor, rows

    @torch.no_grad()
    def zero_parameters(self) -> None:
        for tensor, rows in self._tensors():
            tensor.index_fill_(0, rows, 0.0)

    @torch.no_grad()
    def zero_gradients(self) -> None:
        for tensor, rows in self._tensors():
            if tensor.grad is not None:
                tensor.grad.index_fill_(0, rows, 0.0)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zero every per-parameter state tensor (momentum, Adam moments) at the removed rows."""
        for optimizer in optimizers:
            for tensor, rows in self._tensors():
                for value in optimizer.state.get(tensor, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                        value.index_fill_(0, rows.to(value.device), 0.0)


def reset_optimizer_state(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Forget all optimizer state (momentum buffers, Adam moments), as after the last pruning step."""
    for optimizer in optimizers:
        optimizer.state.clear()


def _has(module: nn.Module, attr: str) -> bool:
    return isinstance(getattr(module, attr, None), torch.Tensor)
