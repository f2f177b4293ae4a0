"""Taylor importance on gates (Molchanov et al., CVPR 2019)."""

from __future__ import annotations

import torch

from lightning_prune.importance.base import Criterion
from lightning_prune.importance.gate_gradients import GateGradients
from lightning_prune.importance.registry import register_criterion


@register_criterion("taylor_fo_bn")
class TaylorFOBN(Criterion):
    """``(dE/dz)^2`` with ``dE/dz`` summed over the minibatch (the group contribution, Eq. 7/8 on gates)."""

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        return {name: g.square() for name, g in grads.total.items()}


@register_criterion("taylor_fo_bn_fg")
class TaylorFOBNFullGradient(Criterion):
    """Full gradient: the per-sample ``(dE_n/dz)^2`` summed over the minibatch."""

    per_sample = True

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        return dict(grads.squares)
