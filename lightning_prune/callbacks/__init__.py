"""Lightning callbacks."""

from lightning_prune.callbacks.taylor_pruning import TaylorPruningCallback

__all__ = ["TaylorPruningCallback"]
