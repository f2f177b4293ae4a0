"""Importance without a Trainer: score every prunable neuron on some batches, and prune once.

>>> scores = estimate_importance(model, loader, criterion="taylor_fo_bn", num_batches=8)
>>> masks = prune_once(model, scores, fraction=0.1)
>>> small = lightning_prune.compact(model, masks)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn

from lightning_prune.compaction.compact import PruningMasks, alive_from_masks, masks_from_alive
from lightning_prune.dependency import DependencyGraph, build_dependency_graph
from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.base import Criterion
from lightning_prune.importance.hessian import HessianMethod
from lightning_prune.importance.registry import get_criterion
from lightning_prune.importance.statistics import LossFn, Probe, split_batch
from lightning_prune.pruner import NeuronMasks, NeuronSelector, neuron_scores


@dataclass
class ImportanceScores:
    """Scores of one criterion: per gated channel (``gates``) and per neuron (``neurons``, the sum of its
    channels; ``nan`` for neurons that can't be pruned)."""

    criterion: str
    gates: dict[str, torch.Tensor]
    neurons: torch.Tensor
    graph: DependencyGraph
    placement: str = "after_bn"  # where the gates sit (which layers the masks of prune_once name)

    @property
    def prunable(self) -> torch.Tensor:
        return self.graph.prunable


def graph_for(model: nn.Module, example: Any, **kwargs: Any) -> DependencyGraph:
    """The dependency graph of ``model`` traced on ``example`` (a batch, or its inputs)."""
    x, _ = split_batch(example)
    return build_dependency_graph(model, x, **kwargs)


def estimate_importance(
    model: nn.Module,
    dataloader: Iterable[Any],
    criterion: str | Criterion | Sequence[str | Criterion] = "taylor_fo_bn",
    num_batches: int | None = None,
    *,
    graph: DependencyGraph | None = None,
    criterion_kwargs: dict[str, Any] | None = None,
    gradient: str | None = None,
    normalize_gradient: bool | None = None,
    loss_fn: LossFn | None = None,
    train_mode: bool = False,
    hessian: HessianMethod = "auto",
    hessian_samples: int = 16,
    seed: int = 0,
    gate_placement: str = "after_bn",
    alive: torch.Tensor | None = None,
) -> ImportanceScores | dict[str, ImportanceScores]:
    """Scores of every prunable neuron under ``criterion`` (a name, an instance, or a list of them).

    Averages the criterion's per-batch scores over ``num_batches`` batches (all if ``None``) of
    ``dataloader``; batches are ``(inputs, targets)`` or bare inputs (fine for label-free criteria:
    ``activation_mean``, ``apoz``, ``weight_norm``, ``bn_scale``, ``random`` and any criterion with
    ``gradient="random"``). The network runs in eval mode (BatchNorm uses its running statistics)
    unless ``train_mode`` (batch statistics; the running statistics are restored afterwards).
    ``gradient``/``normalize_gradient`` override the criteria's own choice of output gradient. Neurons
    already removed (``alive`` False) score ``nan``. Returns one :class:`ImportanceScores`, or a dict by
    criterion name when given a list.
    """
    single = isinstance(criterion, (str, Criterion))
    criteria = [get_criterion(c, **(criterion_kwargs or {})) for c in ([criterion] if single else criterion)]
    batches = list(islice(iter(dataloader), num_batches)) if num_batches is not None else list(dataloader)
    if not batches:
        raise PruningConfigurationError("estimate_importance needs at least one batch")
    if graph is None:
        graph = graph_for(model, batches[0], placement=gate_placement)
    for c in criteria:
        if gradient is not None and c.data_driven:
            c.gradient = gradient
        if normalize_gradient is not None and c.data_driven:
            c.normalize_gradient = bool(normalize_gradient)
        c.setup(graph)
        c.detach()  # no training-loop hooks here

    modes = {m: m.training for m in model.modules()}
    # in train mode BatchNorm would update its running statistics: keep them as they were
    buffers = {
        (m, k): b.clone()
        for m in model.modules()
        if train_mode and isinstance(m, nn.modules.batchnorm._BatchNorm)
        for k, b in m.named_buffers(recurse=False)
    }
    model.train(train_mode)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in criteria]
    try:
        # one probe per kind of output gradient, each collecting what its criteria need
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, c in enumerate(criteria):
            if c.data_driven:
                groups.setdefault((c.gradient, c.normalize_gradient), []).append(i)
            else:
                sums[i] = c.static_scores(graph)
        for (grad_mode, normalize), members in groups.items():
            requires = set().union(*(criteria[i].requires for i in members))
            probe = Probe(
                model, graph, requires, gradient=grad_mode, normalize_gradient=normalize, loss_fn=loss_fn,
                hessian=hessian, hessian_samples=hessian_samples, seed=seed,
            )  # fmt: skip
            for batch in batches:
                stats = probe.collect(batch)
                for i in members:
                    for name, value in criteria[i].batch_scores(stats).items():
                        value = value.detach().float().cpu()
                        sums[i][name] = sums[i][name] + value if name in sums[i] else value
            for i in members:
                sums[i] = criteria[i].finalize({n: v / len(batches) for n, v in sums[i].items()})
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for (m, k), b in buffers.items():
                getattr(m, k).copy_(b)
    results = {}
    for c, scores in zip(criteria, sums):
        neurons = neuron_scores(graph, scores)
        mask = graph.prunable if alive is None else graph.prunable & alive
        neurons[~mask] = float("nan")
        results[c.name if c.name not in results else f"{c.name}#{len(results)}"] = ImportanceScores(
            c.name, scores, neurons, graph, gate_placement
        )
    return next(iter(results.values())) if single else results


def prune_once(
    model: nn.Module,
    scores: ImportanceScores | torch.Tensor,
    *,
    num: int | None = None,
    fraction: float | None = None,
    graph: DependencyGraph | None = None,
    alive: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    min_channels: int = 1,
) -> PruningMasks:
    """Remove the ``num`` (or ``fraction`` of the prunable) lowest-scoring neurons by zeroing their
    parameters (filters, biases, BatchNorm gamma/beta/running mean).

    Returns the masks of every gated layer after pruning, ready for :func:`lightning_prune.compact`
    (they record how the network was traced); pass them back as ``alive=`` to prune further in steps
    (a bool-per-neuron vector works too).
    """
    placement = "after_bn"
    if isinstance(scores, ImportanceScores):
        graph = graph or scores.graph
        values, placement = scores.neurons, scores.placement
    else:
        values = scores
    if graph is None:
        raise PruningConfigurationError("prune_once needs the dependency graph with raw neuron scores")
    if (num is None) == (fraction is None):
        raise PruningConfigurationError("give exactly one of num and fraction")
    if num is None:
        num = round(fraction * graph.num_prunable)
    if alive is None:
        alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    elif isinstance(alive, Mapping):
        alive = alive_from_masks(graph, alive)
    else:
        alive = alive.clone()
    values = torch.nan_to_num(values.double(), nan=float("inf"))
    chosen = NeuronSelector(graph, min_channels).select(values, alive, num)
    alive[chosen] = False
    apply_alive(graph, alive)
    return masks_from_alive(graph, alive, placement)


def apply_alive(graph: DependencyGraph, alive: torch.Tensor) -> None:
    """Zero the parameters of every neuron ``alive`` marks as removed."""
    masks = NeuronMasks(graph)
    masks.update(~alive)
    masks.zero_parameters()
