"""What one batch tells about every gated channel: gate gradients, activations, weight gradients, Hessians.

:class:`Probe` runs a batch through the network with per-sample gates ``z = 1`` on every gated layer's
output, back-propagates the loss (or, label-free, a random vector from the network output) and gathers
the statistics the chosen criteria ``require``:

``"gate"``            ``gate_total`` (sum over samples of ``dE/dz_n``, the gradient of a batch-shared gate),
                      ``gate_squares`` (sum of ``(dE/dz_n)^2``) and ``gate_abs`` (sum of ``|dE/dz_n|``);
``"elementwise"``     ``xdx_abs``/``xdx_sq``: mean over samples and positions of ``|x dx|`` and ``(x dx)^2``
                      for the gated layer's output ``x`` (a pre-activation) and ``dx = dE/dx``;
``"activation"``      ``act_mean``/``act_nonzero``: mean and fraction of non-zeros of ``relu(x)``;
``"param_grad"``      ``param_grads``: gradients of the weight and bias of every layer writing channels;
``"gate_hessian"``    ``gate_hessian``: ``d^2E/dz_c^2`` of batch-shared gates (exact or Hutchinson);
``"weight_hessian"``  ``weight_hessian``: diagonal Hessian of the writers' weights and biases.

``E`` is the mean loss over the batch (so ``dE/dz_n`` is ``1/N`` of the sample's own loss gradient), or
``mean_n <f(x_n), v_n>`` for random output gradients ``v_n`` (standard normal, or unit-normalised).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.dependency import DependencyGraph, Gate
from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.gate_gradients import GateGradients
from lightning_prune.importance.hessian import HessianMethod, hessian_diagonal

STATISTICS = ("gate", "elementwise", "activation", "param_grad", "gate_hessian", "weight_hessian")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def channels_view(gate: Gate, t: torch.Tensor) -> torch.Tensor:
    """``t`` (an output of the gated layer) as ``[N, C, M]``, M positions per channel."""
    if gate.kind == "linear":
        t = t.movedim(-1, 1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _gate_shape(gate: Gate, out: torch.Tensor, per_sample: bool) -> list[int]:
    dim = out.ndim - 1 if gate.kind == "linear" else 1
    shape = [1] * out.ndim
    shape[dim] = out.shape[dim]
    if per_sample:
        shape[0] = out.shape[0]
    return shape


@dataclass
class BatchStatistics:
    """Statistics of one batch for every gated layer (names as in ``graph.gates``), on the CPU."""

    graph: DependencyGraph
    num_samples: int
    loss: float | None = None
    gate_total: dict[str, torch.Tensor] = field(default_factory=dict)
    gate_squares: dict[str, torch.Tensor] = field(default_factory=dict)
    gate_abs: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    xdx_abs: dict[str, torch.Tensor] = field(default_factory=dict)
    xdx_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    act_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    act_nonzero: dict[str, torch.Tensor] = field(default_factory=dict)
    param_grads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    gate_hessian: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_hessian: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def as_gate_gradients(self) -> GateGradients:
        """The batch's gate gradients in the form the callback hands to ``Criterion.step_scores``."""
        grads = GateGradients(self.graph.gates.values(), per_sample=True)
        grads.total = dict(self.gate_total)
        grads.squares = dict(self.gate_squares)
        return grads


def writer_parameters(graph: DependencyGraph) -> dict[str, dict[str, torch.Tensor]]:
    """Weight and bias of every layer that writes channels, whose rows belong to neurons."""
    params: dict[str, dict[str, torch.Tensor]] = {}
    for name in graph.writers:
        module = graph.modules[name]
        found = {
            attr: p for attr in ("weight", "bias") if isinstance(p := getattr(module, attr, None), nn.Parameter)
        }
        if found:
            params[name] = found
    return params


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: ``(x, y)`` pairs, dicts with ``"x"``/``"y"`` or bare inputs."""
    if isinstance(batch, dict):
        return batch.get("x", batch.get("input")), batch.get("y", batch.get("target"))
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        return batch[0], None
    return batch, None


class Probe:
    """Collects :class:`BatchStatistics` of batches for the requested statistics."""

    def __init__(
        self,
        model: nn.Module,
        graph: DependencyGraph,
        requires: Iterable[str],
        *,
        gradient: str = "loss",
        normalize_gradient: bool = False,
        loss_fn: LossFn | None = None,
        hessian: HessianMethod = "auto",
        hessian_samples: int = 16,
        seed: int = 0,
        prefix: str = "",
    ) -> None:
        self.requires = set(requires)
        unknown = self.requires - set(STATISTICS)
        if unknown:
            raise PruningConfigurationError(f"unknown statistics {sorted(unknown)}; known: {STATISTICS}")
        if gradient not in ("loss", "random"):
            raise PruningConfigurationError(f"gradient must be 'loss' or 'random', got {gradient!r}")
        self.model = model
        self.graph = graph
        self.gradient = gradient
        self.normalize_gradient = normalize_gradient
        self.loss_fn = loss_fn or F.cross_entropy
        self.hessian = hessian
        self.hessian_samples = hessian_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.writers = writer_parameters(graph) if self.requires & {"param_grad", "weight_hessian"} else {}

    # -- the objective --------------------------------------------------------------------------------------
    def _output_gradient(self, out: torch.Tensor, y: Any) -> tuple[torch.Tensor, float | None]:
        """``dE/d output`` for the batch, and the mean loss when labels are given."""
        n = out.shape[0]
        loss = None
        if self.gradient == "random":
            v = torch.randn(out.shape, generator=self.generator).to(out)
            if y is not None:
                with torch.no_grad():
                    loss = float(self.loss_fn(out.detach(), y))
        else:
            if y is None:
                raise PruningConfigurationError(
                    "this criterion back-propagates the loss, so batches need targets; use gradient='random' "
                    "(or an activation criterion) for unlabeled data"
                )
            out_leaf = out.detach().requires_grad_(True)
            with torch.enable_grad():
                value = self.loss_fn(out_leaf, y)
                (v,) = torch.autograd.grad(value, out_leaf)
            loss = float(value.detach())
            if not self.normalize_gradient:
                return v, loss
            v = v * n  # per-example gradient of the example's own loss
        if self.normalize_gradient:
            norms = v.reshape(n, -1).norm(dim=1).clamp_min(1e-12)
            v = v / norms.view(-1, *([1] * (v.ndim - 1)))
        return v / n, loss

    # -- first-order pass -----------------------------------------------------------------------------------
    def collect(self, batch: Any) -> BatchStatistics:
        x, y = split_batch(batch)
        device = next(self.model.parameters()).device
        x = _to(x, device)
        y = _to(y, device)
        first = self.requires & {"gate", "elementwise", "activation", "param_grad"}
        stats = BatchStatistics(self.graph, num_samples=_batch_size(x))
        v = None
        if first:
            v = self._first_order(x, y, stats)
        if self.requires & {"gate_hessian", "weight_hessian"}:
            self._second_order(x, y, stats, v)
        return stats

    def _first_order(self, x: Any, y: Any, stats: BatchStatistics) -> torch.Tensor:
        need_grad = bool(self.requires & {"gate", "elementwise", "param_grad"})
        gates: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(gate: Gate):
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
                view = channels_view(gate, out.detach())
                stats.positions[gate.name] = view.shape[2]
                if "activation" in self.requires:
                    act = view.clamp_min(0)
                    stats.act_mean[gate.name] = act.mean(dim=(0, 2)).float().cpu()
                    stats.act_nonzero[gate.name] = (act > 0).float().mean(dim=(0, 2)).cpu()
                if not need_grad or not self.requires & {"gate", "elementwise"}:
                    return None
                z = torch.ones(_gate_shape(gate, out, True), device=out.device, dtype=out.dtype, requires_grad=True)
                gates[gate.name] = z
                gated = out * z
                if "elementwise" in self.requires:
                    # on the gated output, whose gradient the gate's needs (that of ``out`` may never be
                    # computed, e.g. in the first gated layer): with z = 1 the two gradients are equal
                    def grad_hook(grad: torch.Tensor, view=view) -> None:
                        prod = view * channels_view(gate, grad.detach())
                        stats.xdx_abs[gate.name] = prod.abs().mean(dim=(0, 2)).float().cpu()
                        stats.xdx_sq[gate.name] = prod.square().mean(dim=(0, 2)).float().cpu()

                    gated.register_hook(grad_hook)
                return gated

            return hook

        for gate in self.graph.gates.values():
            handles.append(gate.module.register_forward_hook(make_hook(gate)))
        params = [p for layer in self.writers.values() for p in layer.values()]
        saved = [p.grad for p in params]
        try:
            with torch.enable_grad() if need_grad else torch.no_grad():
                if need_grad and not _any_requires_grad(x):
                    # gradients must flow even when the network's parameters are frozen
                    x = _requires_grad(x)
                out = _call(self.model, x)
            if not need_grad:
                if y is not None:
                    stats.loss = float(self.loss_fn(out.detach(), y))
                return None
            v, stats.loss = self._output_gradient(out, y)
            targets = list(gates.values()) + params
            grads = torch.autograd.grad(out, targets, grad_outputs=v, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for (name, z), g in zip(gates.items(), grads[: len(gates)]):
            if "gate" not in self.requires:
                break
            g = torch.zeros_like(z) if g is None else g
            per_sample = g.reshape(g.shape[0], -1).float().cpu()
            stats.gate_total[name] = per_sample.sum(0)
            stats.gate_squares[name] = per_sample.square().sum(0)
            stats.gate_abs[name] = per_sample.abs().sum(0)
        it = iter(grads[len(gates):])
        for layer, ps in self.writers.items():
            stats.param_grads[layer] = {}
            for attr, p in ps.items():
                g = next(it)
                stats.param_grads[layer][attr] = (torch.zeros_like(p) if g is None else g).detach().float().cpu()
        for p, s in zip(params, saved):
            p.grad = s
        return v

    # -- second-order pass ----------------------------------------------------------------------------------
    def _second_order(self, x: Any, y: Any, stats: BatchStatistics, v: torch.Tensor | None) -> None:
        zs: dict[str, torch.Tensor] = {}
        handles = []
        if "gate_hessian" in self.requires:
            def make_hook(gate: Gate):
                def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                    z = torch.ones(_gate_shape(gate, out, False), device=out.device, dtype=out.dtype, requires_grad=True)
                    zs[gate.name] = z
                    return out * z

                return hook

            for gate in self.graph.gates.values():
                handles.append(gate.module.register_forward_hook(make_hook(gate)))
        layers = list(self.writers.items()) if "weight_hessian" in self.requires else []
        params = [p for _, ps in layers for p in ps.values()]
        try:
            with torch.enable_grad():
                out = _call(self.model, x)
                if self.gradient == "random" or self.normalize_gradient:
                    if v is None:
                        v, _ = self._output_gradient(out.detach(), y)
                    objective = (out * v).sum()  # a fixed output gradient: E = <f(x), v>
                else:
                    objective = self.loss_fn(out, y)
        finally:
            for h in handles:
                h.remove()
        names = list(zs)
        diag = hessian_diagonal(objective, [zs[n] for n in names] + params, self.hessian, self.hessian_samples,
                                self.generator)  # fmt: skip
        for name, d in zip(names, diag[: len(names)]):
            stats.gate_hessian[name] = d.reshape(-1).cpu()
        it = iter(diag[len(names):])
        for layer, ps in layers:
            stats.weight_hessian[layer] = {attr: next(it).cpu() for attr in ps}


def _call(model: nn.Module, x: Any) -> torch.Tensor:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _batch_size(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    values = x.values() if isinstance(x, dict) else x
    return next(v.shape[0] for v in values if isinstance(v, torch.Tensor))


def _any_requires_grad(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _requires_grad(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().requires_grad_(True)
    return x
