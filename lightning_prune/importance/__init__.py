"""Importance criteria: how much each neuron matters, and a registry to pick one by name."""

from lightning_prune.importance import baselines, taylor  # noqa: F401  (registers the built-in criteria)
from lightning_prune.importance import activation, label_free, second_order, weight_taylor  # noqa: F401  (more criteria)
from lightning_prune.importance import group_magnitude  # noqa: F401  (registers group_magnitude)
from lightning_prune.importance.estimate import ImportanceScores, apply_alive, estimate_importance, prune_once
from lightning_prune.importance.base import Criterion
from lightning_prune.importance.gate_gradients import GateGradients, parameter_gate_gradient
from lightning_prune.importance.registry import available_criteria, get_criterion, register_criterion

__all__ = [
    "Criterion",
    "ImportanceScores",
    "apply_alive",
    "estimate_importance",
    "prune_once",
    "GateGradients",
    "available_criteria",
    "get_criterion",
    "parameter_gate_gradient",
    "register_criterion",
]
