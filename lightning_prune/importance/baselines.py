"""Baseline criteria that need no gradients: filter norm, BatchNorm scale, random."""

from __future__ import annotations

from typing import Any

import torch

from lightning_prune.dependency import DependencyGraph
from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.base import Criterion
from lightning_prune.importance.registry import register_criterion


@register_criterion("weight_norm")
class WeightNorm(Criterion):
    """l2 norm of the Conv/Linear filter producing each channel (zero where no filter produces it)."""

    data_driven = False

    def static_scores(self, graph: DependencyGraph) -> dict[str, torch.Tensor]:
        norms: dict[str, torch.Tensor] = {}
        scores = {}
        for name, gate in graph.gates.items():
            values = []
            for source in gate.sources:
                if source is None:
                    values.append(0.0)
                    continue
                layer, index = source
                if layer not in norms:
                    weight = graph.modules[layer].weight.detach().float()
                    norms[layer] = weight.reshape(weight.shape[0], -1).norm(dim=1).cpu()
                values.append(float(norms[layer][index]))
            scores[name] = torch.tensor(values)
        return scores


@register_criterion("bn_scale")
class BatchNormScale(Criterion):
    """|gamma| of the BatchNorm channels of each neuron (Liu et al., network slimming)."""

    data_driven = False

    def setup(self, graph: DependencyGraph) -> None:
        covered = torch.zeros(graph.num_neurons, dtype=torch.bool)
        for gate in graph.gates.values():
            if gate.kind == "batchnorm" and gate.module.weight is not None:
                covered[gate.neurons] = True
        missing = sorted(
            name for name, gate in graph.gates.items() if (graph.prunable[gate.neurons] & ~covered[gate.neurons]).any()
        )
        if missing:
            raise PruningConfigurationError(
                f"criterion 'bn_scale' needs an affine BatchNorm on every prunable channel; these layers have "
                f"none: {', '.join(missing[:10])}. Ignore them (`ignored_modules`) or pick another criterion."
            )

    def static_scores(self, graph: DependencyGraph) -> dict[str, torch.Tensor]:
        return {
            name: gate.module.weight.detach().abs().float().cpu()
            if gate.kind == "batchnorm"
            else torch.zeros(gate.channels)
            for name, gate in graph.gates.items()
        }


@register_criterion("random")
class RandomScore(Criterion):
    """Uniform random scores, from a seeded generator saved with the checkpoint."""

    data_driven = False

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def static_scores(self, graph: DependencyGraph) -> dict[str, torch.Tensor]:
        return {name: torch.rand(gate.channels, generator=self.generator) for name, gate in graph.gates.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
