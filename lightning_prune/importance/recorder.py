"""Hooks that let activation-based criteria score inside the training loop (the callback path).

During training forwards (module in training mode, gradients enabled) a :class:`ActivationRecorder`
records, for every gated layer's output ``x`` and its gradient ``dx`` in the backward that follows:
the mean of ``|x dx|`` and ``(x dx)^2`` over samples and positions, the per-sample ``|mean_positions x dx|``
averaged over samples (Molchanov et al. 2017), the mean and fraction of non-zeros of ``relu(x)``, and
the number of samples seen. :meth:`take` returns the average over the batches since the last call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.dependency import DependencyGraph, Gate
from lightning_prune.importance.statistics import channels_view

KEYS = ("xdx_abs", "xdx_sq", "taylor_output", "act_mean", "act_nonzero")


class ActivationRecorder:
    def __init__(self, graph: DependencyGraph, activations: bool = True, gradients: bool = True) -> None:
        self.graph = graph
        self.activations = activations
        self.gradients = gradients
        self._handles: list[RemovableHandle] = []
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KEYS}
        self.counts: dict[str, dict[str, int]] = {k: {} for k in KEYS}
        self.samples = 0

    def attach(self) -> None:
        self.detach()
        first = True
        for gate in self.graph.gates.values():
            self._handles.append(gate.module.register_forward_hook(self._hook(gate, first)))
            first = False

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _add(self, key: str, name: str, value: torch.Tensor) -> None:
        store = self.sums[key]
        store[name] = store[name] + value if name in store else value
        self.counts[key][name] = self.counts[key].get(name, 0) + 1

    def _hook(self, gate: Gate, count_samples: bool):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            if count_samples:
                self.samples += out.shape[0]
            view = channels_view(gate, out.detach()).float()
            if self.activations:
                act = view.clamp_min(0)
                self._add("act_mean", gate.name, act.mean(dim=(0, 2)))
                self._add("act_nonzero", gate.name, (act > 0).float().mean(dim=(0, 2)))
            if self.gradients and out.requires_grad:
                def grad_hook(grad: torch.Tensor) -> None:
                    prod = view * channels_view(gate, grad.detach()).float()
                    self._add("xdx_abs", gate.name, prod.abs().mean(dim=(0, 2)))
                    self._add("xdx_sq", gate.name, prod.square().mean(dim=(0, 2)))
                    self._add("taylor_output", gate.name, prod.mean(dim=2).abs().mean(dim=0))

                out.register_hook(grad_hook)

        return hook

    def take(self, key: str) -> dict[str, torch.Tensor]:
        """Average of ``key`` per gated layer over the recorded batches, then forget it."""
        result = {n: (s / self.counts[key][n]).cpu() for n, s in self.sums[key].items()}
        self.sums[key], self.counts[key] = {}, {}
        for name, gate in self.graph.gates.items():  # nothing recorded (e.g. frozen layer): no information
            result.setdefault(name, torch.zeros(gate.channels))
        return result

    def take_samples(self) -> int:
        samples, self.samples = self.samples, 0
        return samples
