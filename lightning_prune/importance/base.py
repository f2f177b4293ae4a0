"""The interface every importance criterion implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lightning_prune.dependency import DependencyGraph
from lightning_prune.importance.gate_gradients import GateGradients

if TYPE_CHECKING:  # pragma: no cover
    from lightning_prune.importance.statistics import BatchStatistics


class Criterion:
    """Scores the channels of every gated layer; lower scores are pruned first.

    A *data-driven* criterion (``data_driven = True``) scores each optimizer step from the gate
    gradients of that step (:meth:`step_scores`); the callback averages the steps between two pruning
    steps and smooths across pruning steps. Otherwise :meth:`static_scores` is called at each pruning
    step. Scores are per gate channel; tied channels of several layers add up into one neuron's score.

    Outside a Trainer, :func:`~lightning_prune.importance.estimate_importance` feeds every criterion
    the :class:`~lightning_prune.importance.statistics.BatchStatistics` of each batch through
    :meth:`batch_scores`; ``requires`` names the statistics it needs (see ``statistics.STATISTICS``),
    ``gradient``/``normalize_gradient`` say which output gradient is back-propagated (``"loss"``: the
    loss'; ``"random"``: a random vector, no labels needed; normalised per example if asked).
    :meth:`finalize` post-processes the scores averaged over batches (e.g. a per-layer normalisation).
    """

    name: ClassVar[str] = ""
    data_driven: ClassVar[bool] = True
    per_sample: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset({"gate"})
    gradient: str = "loss"
    normalize_gradient: bool = False

    def setup(self, graph: DependencyGraph) -> None:
        """Check the criterion can score this graph; raise ``PruningConfigurationError`` if not.

        The graph is kept (``self.graph``) for criteria that read parameters or their gradients.
        """
        self.graph = graph

    def detach(self) -> None:
        """Remove any hook :meth:`setup` installed (criteria that record activations in the callback)."""

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is not data-driven")

    def static_scores(self, graph: DependencyGraph) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is data-driven")

    def batch_scores(self, stats: BatchStatistics) -> dict[str, torch.Tensor]:
        """Scores from one batch's statistics (standalone estimation). By default the callback path:
        :meth:`step_scores` on the batch's gate gradients, or :meth:`static_scores`."""
        if not self.data_driven:
            return self.static_scores(stats.graph)
        return self.step_scores(stats.as_gate_gradients())

    def finalize(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Post-process scores averaged over batches (identity by default)."""
        return scores

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
