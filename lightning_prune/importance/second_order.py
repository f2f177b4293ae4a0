"""Second-order criteria: Taylor on gates with a diagonal Hessian, and Optimal Brain Damage.

* ``taylor_so`` (Molchanov et al., CVPR 2019, Eq. 4 on gates): removing a gate moves ``z`` from 1 to 0,
  ``E(z=0) - E(z=1) ~ -g + h/2``, so the importance is ``(g - h/2)^2`` with ``g = dE/dz`` and
  ``h = d^2E/dz^2`` (the diagonal of the gates' Hessian).
* ``obd`` (LeCun et al., 1990): the saliency of a weight is ``h_ii w_i^2 / 2``; a neuron's saliency sums
  those of its parameters (the rows of the layers writing its channels). ``form="signed"`` keeps the sum
  as OBD prescribes (a negative saliency means the quadratic model predicts a loss *decrease*),
  ``form="squared"`` squares it, as the squared oracle of Molchanov et al. does.

Which Hessian diagonal is used where:

* :func:`~lightning_prune.importance.estimate_importance`: the exact diagonal when the network is small
  (at most ``hessian.EXACT_MAX_ENTRIES`` entries), Hutchinson's estimate with Rademacher vectors
  otherwise (``hessian="exact" | "hutchinson"`` forces one), from double backwards on each batch.
* :class:`~lightning_prune.TaylorPruningCallback`: the training loop frees the graph after backward, so
  no double backward is possible. ``taylor_so`` then uses the empirical Fisher diagonal of the gates,
  ``h ~ N * sum_n (dE/dz_n)^2`` from per-sample gate gradients (``dE/dz_n`` being ``1/N`` of the sample's
  own gradient), and ``obd`` the diagonal of the minibatch Fisher, ``h_ii ~ N * (dE/dw_i)^2`` (an
  unbiased-in-expectation estimate of ``F_ii / N + mean^2``, exact up to scale near a minimum). Both are
  Gauss-Newton-type approximations: non-negative, unlike the true Hessian.
"""

from __future__ import annotations

import torch

from lightning_prune.dependency import DependencyGraph
from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.base import Criterion
from lightning_prune.importance.gate_gradients import GateGradients
from lightning_prune.importance.recorder import ActivationRecorder
from lightning_prune.importance.registry import register_criterion
from lightning_prune.importance.statistics import BatchStatistics, writer_parameters
from lightning_prune.importance.weight_taylor import live_parameter_gradients, per_neuron, row_sum, spread_to_gates


class _CountsSamples(Criterion):
    """Counts the training samples between two ``step_scores`` calls (for Fisher scaling in the callback)."""

    def setup(self, graph: DependencyGraph) -> None:
        super().setup(graph)
        self._recorder = ActivationRecorder(graph, activations=False, gradients=False)
        self._recorder.attach()

    def detach(self) -> None:
        if getattr(self, "_recorder", None) is not None:
            self._recorder.detach()

    def _samples(self) -> int:
        return max(1, self._recorder.take_samples()) if getattr(self, "_recorder", None) is not None else 1


@register_criterion("taylor_so")
class TaylorSO(_CountsSamples):
    """``(g - h/2)^2`` on gates, with ``h`` the diagonal Hessian of the gates (Fisher in the callback)."""

    requires = frozenset({"gate", "gate_hessian"})
    per_sample = True

    def batch_scores(self, stats: BatchStatistics) -> dict[str, torch.Tensor]:
        return {n: (g - 0.5 * stats.gate_hessian[n]).square() for n, g in stats.gate_total.items()}

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        n = self._samples()
        return {name: (g - 0.5 * n * grads.squares[name].to(g.device)).square() for name, g in grads.total.items()}


@register_criterion("obd")
class OptimalBrainDamage(_CountsSamples):
    """Sum over a neuron's parameters of ``h_ii w_i^2 / 2``: ``signed`` (OBD) or ``squared``."""

    requires = frozenset({"weight_hessian"})

    def __init__(self, form: str = "signed") -> None:
        if form not in ("signed", "squared"):
            raise PruningConfigurationError(f"obd form must be 'signed' or 'squared', got {form!r}")
        self.form = form

    def _scores(self, graph: DependencyGraph, hessians: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        params = writer_parameters(graph)
        values = {}
        for layer, diag in hessians.items():
            rows = None
            for attr, h in diag.items():
                w = params[layer][attr].detach().float().to(h.device)
                part = row_sum(0.5 * h * w.square())
                rows = part if rows is None else rows + part
            values[layer] = rows
        neuron = per_neuron(graph, values)
        if self.form == "squared":
            neuron = neuron.square()
        return spread_to_gates(graph, neuron)

    def batch_scores(self, stats: BatchStatistics) -> dict[str, torch.Tensor]:
        return self._scores(stats.graph, stats.weight_hessian)

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        n = self._samples()
        fisher = {
            layer: {attr: n * g.square() for attr, g in layer_grads.items()}
            for layer, layer_grads in live_parameter_gradients(self.graph).items()
        }
        return self._scores(self.graph, fisher)


def weight_saliency(stats: BatchStatistics) -> dict[str, dict[str, torch.Tensor]]:
    """OBD saliency ``h_ii w_i^2 / 2`` of every individual weight of the writer layers."""
    params = writer_parameters(stats.graph)
    return {
        layer: {attr: 0.5 * h * params[layer][attr].detach().float().cpu().square() for attr, h in diag.items()}
        for layer, diag in stats.weight_hessian.items()
    }
