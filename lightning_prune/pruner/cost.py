"""FLOPs and parameters of the network as it will be once removed neurons are physically cut out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune.dependency import DependencyGraph
from lightning_prune.dependency.trace import as_call_args


class CostModel:
    """Counts FLOPs once with ``torch.utils.flop_counter`` on the example input, per layer, then scales
    every Conv/Linear layer's count by its fraction of remaining input and output channels, and the other
    FLOPs of a module listed in ``graph.scaled`` (an attention's products) by its neurons' kept fraction.

    FLOPs are per example (the count for the example batch divided by its size), counted as
    ``torch.utils.flop_counter`` does (a multiply-add is 2 FLOPs).
    """

    def __init__(self, model: nn.Module, example_input: Any, graph: DependencyGraph, prefix: str = "") -> None:
        self.graph = graph
        args, kwargs = as_call_args(example_input)
        batch = next((a.shape[0] for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), 1)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the counter can't see inside MultiheadAttention's fast path
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(*args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for m, training in modes.items():
                m.training = training
        self.total_flops = counter.get_total_flops() / batch
        per_module = {  # keys are "<RootClass>.<qualified name>"
            prefix + key.partition(".")[2]: sum(ops.values()) / batch for key, ops in counter.get_flop_counts().items()
        }
        self.layer_flops = {name: flops for name, flops in per_module.items() if name in graph.readers}
        # the products of a module whose own FLOPs (not its submodules') scale with some neurons (attention
        # and its heads)
        self.scaled_flops = {
            name: flops - sum(f for inner, f in per_module.items() if inner.rpartition(".")[0] == name)
            for name, flops in per_module.items()
            if name in graph.scaled
        }
        self._fixed_flops = self.total_flops - sum(self.layer_flops.values()) - sum(self.scaled_flops.values())
        self._layer_params = {
            name: sum(p.numel() for p in graph.modules[name].parameters(recurse=False))
            for name in set(graph.readers) | set(graph.writers)
        }
        self._other_params = sum(p.numel() for p in model.parameters()) - sum(self._layer_params.values())

    def _fractions(self, name: str, padded: torch.Tensor) -> tuple[float, float]:
        """(kept input fraction, kept output fraction) of layer ``name``; ``padded`` is the alive mask
        with a last False entry, so that index -1 (a structurally zero channel) reads as removed."""
        inputs = self.graph.readers.get(name)
        outputs = self.graph.writers.get(name)
        fin = float(padded[inputs].float().mean()) if inputs is not None and inputs.numel() else 1.0
        fout = float(padded[outputs].float().mean()) if outputs is not None and outputs.numel() else 1.0
        module = self.graph.modules[name]
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels > 1:
            fin = 1.0  # depthwise: each filter reads its own channel, counted by the output fraction
        return fin, fout

    def flops(self, alive: torch.Tensor) -> int:
        """FLOPs per example, a whole number (the fractions of channels kept only scale exact counts)."""
        total = self._fixed_flops
        padded = torch.cat([alive, torch.tensor([False])])
        for name, base in self.layer_flops.items():
            fin, fout = self._fractions(name, padded)
            total += base * fin * fout
        for name, base in self.scaled_flops.items():
            total += base * float(padded[self.graph.scaled[name]].float().mean())
        return round(total)

    def params(self, alive: torch.Tensor) -> int:
        total = self._other_params
        padded = torch.cat([alive, torch.tensor([False])])
        for name, count in self._layer_params.items():
            module = self.graph.modules[name]
            fin, fout = self._fractions(name, padded)
            weight = getattr(module, "weight", None)
            weight_count = weight.numel() if isinstance(weight, torch.Tensor) else 0
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                total += round(weight_count * fin * fout) + round((count - weight_count) * fout)
            else:  # channel-wise layers: BatchNorm
                total += round(count * fout)
        return int(total)
