"""Latency-aware pruning: a per-layer latency table measured on the target device, and the choice of
neurons to keep under a latency budget."""

from lightning_prune.latency.selection import LatencySelector
from lightning_prune.latency.table import LatencyTable, LayerLatency

__all__ = ["LatencySelector", "LatencyTable", "LayerLatency"]
