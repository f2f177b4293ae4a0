"""Criteria from the activations of each gated layer.

* ``taylor_output`` (Molchanov et al., ICLR 2017): ``|mean over positions of x * dE/dx|`` per example,
  averaged over examples, then l2-normalised per layer. ``x`` is the gated layer's output; since
  ``relu(x) * d relu(x) = x * dx`` elementwise, it equals the product taken after the ReLU.
* ``activation_mean``: mean of ``relu(x)`` over examples and positions.
* ``apoz`` (Hu et al., 2016): scores ``1 - APoZ``, the fraction of *non*-zeros of ``relu(x)``, so the
  channels most often zero are pruned first.

The non-linearity is taken to be a ReLU following the gated layer (BatchNorm output, or Conv/Linear
output without BatchNorm). In the callback they record the training forwards/backwards through hooks.
"""

from __future__ import annotations

import torch

from lightning_prune.dependency import DependencyGraph
from lightning_prune.importance.base import Criterion
from lightning_prune.importance.gate_gradients import GateGradients
from lightning_prune.importance.recorder import ActivationRecorder
from lightning_prune.importance.registry import register_criterion
from lightning_prune.importance.statistics import BatchStatistics


class RecordingCriterion(Criterion):
    """A criterion that, in the callback, records activations (and their gradients) with hooks."""

    record_gradients = True
    record_activations = False

    def setup(self, graph: DependencyGraph) -> None:
        super().setup(graph)
        self._recorder = ActivationRecorder(graph, self.record_activations, self.record_gradients)
        self._recorder.attach()

    def detach(self) -> None:
        if getattr(self, "_recorder", None) is not None:
            self._recorder.detach()

    def _check_callback(self) -> None:
        from lightning_prune.errors import PruningConfigurationError

        if self.gradient != "loss" or self.normalize_gradient:
            raise PruningConfigurationError(
                f"{self.name}: random or normalised output gradients are only available in estimate_importance; "
                "inside the training loop the gradient is the training loss'"
            )


@register_criterion("taylor_output")
class TaylorOutput(RecordingCriterion):
    requires = frozenset({"gate"})

    def batch_scores(self, stats: BatchStatistics) -> dict[str, torch.Tensor]:
        # gate_abs sums |dE/dz_n| = |sum_positions x dx| (of the mean loss) over the batch
        return {n: v / stats.positions[n] for n, v in stats.gate_abs.items()}

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        self._check_callback()
        return self.finalize(self._recorder.take("taylor_output"))

    def finalize(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: s / s.norm().clamp_min(1e-30) for n, s in scores.items()}


@register_criterion("activation_mean")
class ActivationMean(RecordingCriterion):
    requires = frozenset({"activation"})
    record_gradients, record_activations = False, True

    def batch_scores(self, stats: BatchStatistics) -> dict[str, torch.Tensor]:
        return dict(stats.act_mean)

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        return self._recorder.take("act_mean")


@register_criterion("apoz")
class APoZ(RecordingCriterion):
    requires = frozenset({"activation"})
    record_gradients, record_activations = False, True

    def batch_scores(self, stats: BatchStatistics) -> dict[str, torch.Tensor]:
        return dict(stats.act_nonzero)

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        return self._recorder.take("act_nonzero")
