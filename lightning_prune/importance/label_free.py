"""Taylor criteria on pre-activations with loss or random gradients (Sapkota & Bhattarai, 2023).

``taylor_fo_abs`` is the mean of ``|x * dx|`` and ``taylor_fo_sq`` the mean of ``(x * dx)^2`` over
examples and positions, ``x`` being the gated layer's output (the pre-activation) and ``dx`` the
gradient back-propagated to it. With ``gradient="random"`` the network output's gradient is a standard
normal vector per example instead of the loss gradient (no labels needed); ``normalize_gradient=True``
scales each example's output gradient to unit norm (with either mode).
"""

from __future__ import annotations

import torch

from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.activation import RecordingCriterion
from lightning_prune.importance.gate_gradients import GateGradients
from lightning_prune.importance.registry import register_criterion
from lightning_prune.importance.statistics import BatchStatistics


class _ElementwiseTaylor(RecordingCriterion):
    requires = frozenset({"elementwise"})
    key = ""

    def __init__(self, gradient: str = "loss", normalize_gradient: bool = False) -> None:
        if gradient not in ("loss", "random"):
            raise PruningConfigurationError(f"gradient must be 'loss' or 'random', got {gradient!r}")
        self.gradient = gradient
        self.normalize_gradient = bool(normalize_gradient)

    def batch_scores(self, stats: BatchStatistics) -> dict[str, torch.Tensor]:
        return dict(getattr(stats, self.key))

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        self._check_callback()
        return self._recorder.take(self.key)


@register_criterion("taylor_fo_abs")
class TaylorFOAbs(_ElementwiseTaylor):
    key = "xdx_abs"


@register_criterion("taylor_fo_sq")
class TaylorFOSq(_ElementwiseTaylor):
    key = "xdx_sq"
