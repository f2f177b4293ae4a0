"""Pruning mechanics: which neurons go, keeping them gone, and what the smaller network costs."""

from lightning_prune.pruner.cost import CostModel
from lightning_prune.pruner.masking import NeuronMasks, reset_optimizer_state
from lightning_prune.pruner.selection import NeuronSelector, fewest_reaching, neuron_scores

__all__ = ["CostModel", "NeuronMasks", "NeuronSelector", "fewest_reaching", "neuron_scores", "reset_optimizer_state"]
