"""lightning-prune: structural pruning guided by importance estimation, as a PyTorch Lightning callback."""

from lightning_prune.callbacks import TaylorPruningCallback
from lightning_prune.compaction import CompactionError, CompactModelMismatchError, compact, load_compact, save_compact
from lightning_prune.compaction import PruningMasks, optimize_for_inference
from lightning_prune.dependency import DependencyGraph, build_dependency_graph
from lightning_prune.errors import PruningConfigurationError, UnsupportedModelError, UnsupportedStrategyError
from lightning_prune.importance import Criterion, ImportanceScores, available_criteria, get_criterion, register_criterion
from lightning_prune.importance import estimate_importance, prune_once
from lightning_prune.latency import LatencySelector, LatencyTable
from lightning_prune.ops import OpRule, register_op_rule
from lightning_prune.recalibration import recalibrate_batchnorm

__version__ = "0.1.0"

__all__ = [
    "CompactModelMismatchError",
    "CompactionError",
    "Criterion",
    "DependencyGraph",
    "ImportanceScores",
    "LatencySelector",
    "LatencyTable",
    "OpRule",
    "PruningConfigurationError",
    "PruningMasks",
    "TaylorPruningCallback",
    "UnsupportedModelError",
    "UnsupportedStrategyError",
    "available_criteria",
    "build_dependency_graph",
    "compact",
    "estimate_importance",
    "get_criterion",
    "load_compact",
    "optimize_for_inference",
    "prune_once",
    "recalibrate_batchnorm",
    "register_criterion",
    "register_op_rule",
    "save_compact",
]
