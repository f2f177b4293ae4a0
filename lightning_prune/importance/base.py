"""The interface every importance criterion implements."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lightning_prune.dependency import DependencyGraph
from lightning_prune.importance.gate_gradients import GateGradients


class Criterion:
    """Scores the channels of every gated layer; lower scores are pruned first.

    A *data-driven* criterion (``data_driven = True``) scores each optimizer step from the gate
    gradients of that step (:meth:`step_scores`); the callback averages the steps between two pruning
    steps and smooths across pruning steps. Otherwise :meth:`static_scores` is called at each pruning
    step. Scores are per gate channel; tied channels of several layers add up into one neuron's score.
    """

    name: ClassVar[str] = ""
    data_driven: ClassVar[bool] = True
    per_sample: ClassVar[bool] = False

    def setup(self, graph: DependencyGraph) -> None:
        """Check the criterion can score this graph; raise ``PruningConfigurationError`` if not."""

    def step_scores(self, grads: GateGradients) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is not data-driven")

    def static_scores(self, graph: DependencyGraph) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is data-driven")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
