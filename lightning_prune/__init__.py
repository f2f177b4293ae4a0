"""lightning-prune: structural pruning guided by importance estimation, as a PyTorch Lightning callback."""

from lightning_prune.callbacks import TaylorPruningCallback
from lightning_prune.dependency import DependencyGraph, build_dependency_graph
from lightning_prune.errors import PruningConfigurationError, UnsupportedModelError, UnsupportedStrategyError
from lightning_prune.importance import Criterion, available_criteria, get_criterion, register_criterion

__version__ = "0.1.0"

__all__ = [
    "Criterion",
    "DependencyGraph",
    "PruningConfigurationError",
    "TaylorPruningCallback",
    "UnsupportedModelError",
    "UnsupportedStrategyError",
    "available_criteria",
    "build_dependency_graph",
    "get_criterion",
    "register_criterion",
]
