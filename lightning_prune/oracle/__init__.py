"""The oracle: true importance of neurons by removing them, and oracle-based pruning references."""

from lightning_prune.oracle.combinatorial import (
    CombinatorialResult,
    GreedyOracleResult,
    combinatorial_oracle,
    greedy_oracle_pruning,
)
from lightning_prune.oracle.greedy import OracleScores, SuffixRunner, oracle_importance, subset_losses

__all__ = [
    "CombinatorialResult",
    "GreedyOracleResult",
    "OracleScores",
    "SuffixRunner",
    "combinatorial_oracle",
    "greedy_oracle_pruning",
    "oracle_importance",
    "subset_losses",
]
