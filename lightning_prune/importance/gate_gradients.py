"""Gradients of the loss with respect to gates ``z = 1`` placed on each gated layer's output.

Two ways to get them, with the same result:

* from the layer's own parameters: a gate on the output of a layer whose output is linear in its
  weight and bias (BatchNorm's gamma/beta, a Conv/Linear filter) has
  ``dE/dz_c = sum_p p * dE/dp`` over the parameters of channel ``c``. This reads gradients that the
  backward pass computes anyway, so it costs nothing, and under DDP they are already averaged over ranks.
* from explicit gates: a forward hook multiplies the output by a per-sample gate of ones and autograd
  gives ``dE/dz`` for each sample. Needed for per-sample criteria and for layers without parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.dependency import Gate


def parameter_gate_gradient(gate: Gate) -> torch.Tensor:
    """``dE/dz`` per channel, from the gated layer's parameter gradients (zero where none)."""
    weight = gate.module.weight
    dtype = _accumulation_dtype(weight.dtype)
    total = torch.zeros(gate.channels, dtype=dtype, device=weight.device)
    for param in (weight, getattr(gate.module, "bias", None)):
        if param is None or param.grad is None:
            continue
        prod = param.detach().to(dtype) * param.grad.to(dtype)
        total += prod.reshape(prod.shape[0], -1).sum(1)
    return total


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_dim(gate: Gate, ndim: int) -> int:
    return ndim - 1 if gate.kind == "linear" else 1


class GateGradients:
    """Accumulates, for one optimizer step, the gate gradient summed over the step's samples (``total``)
    and, if asked, the sum over samples of the squared per-sample gate gradient (``squares``).

    ``collect`` runs after every backward (so accumulated micro-batches add up), ``finish`` once before
    the optimizer step; ``scale`` undoes AMP loss scaling, ``world_size`` turns per-rank losses into the
    loss of the global batch.
    """

    def __init__(self, gates: Iterable[Gate], per_sample: bool = False, force_hooks: bool = False) -> None:
        self.gates = {g.name: g for g in gates}
        self.per_sample = per_sample
        self.hooked = {n for n, g in self.gates.items() if per_sample or force_hooks or not g.gradient_from_parameters}
        # where the totals come from explicit gates: elsewhere parameter gradients hold them already
        # (under DDP averaged over ranks, so they need no communication even for per-sample criteria)
        self.hook_totals = {n for n in self.hooked if force_hooks or not self.gates[n].gradient_from_parameters}
        self._handles: list[RemovableHandle] = []
        self._live: dict[str, list[torch.Tensor]] = {n: [] for n in self.hooked}
        self.total: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self._hook_total: dict[str, torch.Tensor] = {}

    # -- explicit gates ------------------------------------------------------------------------------------
    def attach(self) -> None:
        for name in self.hooked:
            self._handles.append(self.gates[name].module.register_forward_hook(self._gate_hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for live in self._live.values():
            live.clear()

    def _gate_hook(self, name: str):
        gate = self.gates[name]

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not (module.training and torch.is_grad_enabled()):
                return None
            dim = _channel_dim(gate, out.ndim)
            shape = [1] * out.ndim
            shape[0], shape[dim] = out.shape[0], out.shape[dim]
            z = torch.ones(shape, device=out.device, dtype=_accumulation_dtype(out.dtype), requires_grad=True)
            self._live[name].append(z)
            return out * z

        return hook

    # -- accumulation --------------------------------------------------------------------------------------
    def collect(self, scale: float = 1.0, world_size: int = 1) -> None:
        """Read the gradients of the backward that just ran."""
        for name, gate in self.gates.items():
            if name not in self.hook_totals:
                # parameter gradients already hold the sum over accumulated micro-batches
                self.total[name] = parameter_gate_gradient(gate) / scale
            if name not in self.hooked:
                continue
            for z in self._live[name]:
                if z.grad is None:
                    continue
                per_sample = z.grad.reshape(z.shape[0], -1) / scale
                if name in self.hook_totals:
                    self._add(self._hook_total, name, per_sample.sum(0))
                if self.per_sample:
                    self._add(self.squares, name, (per_sample / world_size).square().sum(0))
            self._live[name].clear()

    def finish(self, world_size: int = 1) -> bool:
        """Complete the step's gradients (summing hook results over ranks); False if none was collected.

        Under DDP the explicit-gate sums (``total`` of gates without parameter gradients, ``squares``)
        of all ranks are added in one ``all_reduce`` of one flat tensor, laid out in the same order on
        every rank (zeros for a gate this rank saw no gradient for), then totals are divided by
        ``world_size``; per-sample gradients were divided by it before squaring in :meth:`collect`.
        """
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            keys = [(self._hook_total, n) for n in sorted(self.hook_totals)]
            if self.per_sample:
                keys += [(self.squares, n) for n in sorted(self.hooked)]
            if keys:
                parts = [store[n] if n in store else self._zeros(n) for store, n in keys]
                flat = torch.cat(parts)
                dist.all_reduce(flat)
                for (store, n), chunk in zip(keys, flat.split([p.numel() for p in parts])):
                    store[n] = chunk
        for name, value in self._hook_total.items():
            self.total[name] = value / world_size
        return bool(self.total)

    def _zeros(self, name: str) -> torch.Tensor:
        """Stand-in for a gate that got no gradient on this rank: the dtype every rank agrees on."""
        gate = self.gates[name]
        ref = next((t for t in (*gate.module.parameters(), *gate.module.buffers()) if t.is_floating_point()), None)
        dtype = _accumulation_dtype(ref.dtype) if ref is not None else torch.float32
        return torch.zeros(gate.channels, dtype=dtype, device=ref.device if ref is not None else "cpu")

    def reset(self) -> None:
        self.total, self.squares, self._hook_total = {}, {}, {}

    @staticmethod
    def _add(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        store[name] = store[name] + value if name in store else value.detach().to(_accumulation_dtype(value.dtype))
