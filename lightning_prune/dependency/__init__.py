"""Dependency analysis: which channels are neurons, and which neurons are tied together."""

from lightning_prune.dependency.graph import GATE_PLACEMENTS, DependencyGraph, Gate, build_dependency_graph

__all__ = ["GATE_PLACEMENTS", "DependencyGraph", "Gate", "build_dependency_graph"]
