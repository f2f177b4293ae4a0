"""The oracle: the true change of the loss when a neuron (or a set of neurons) is removed.

Molchanov et al. (CVPR 2019, Eq. 3) define the importance of a neuron as ``(E(W) - E(W | neuron
removed))^2`` on given data; :func:`oracle_importance` returns it, and the signed change
``E(W | removed) - E(W)`` (positive when removing the neuron hurts).

Removing a neuron zeroes its channels at every gated layer holding it (the same effect as zeroing its
filters and BatchNorm parameters). Only what follows the first of those layers changes, so
:class:`SuffixRunner` runs the traced network once per batch, keeping the values alive at each gated
layer, and for every neuron re-runs only the *suffix* after its first gated layer from those cached
values. A neuron of the last layers costs a fraction of a forward pass instead of a whole one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.dependency import DependencyGraph, build_dependency_graph
from lightning_prune.importance.statistics import _to, split_batch

SumLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sum_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


class SuffixRunner:
    """Runs the traced network with sets of neurons removed, reusing activations before the first change."""

    def __init__(self, graph: DependencyGraph, loss_fn: SumLoss | None = None, reuse_activations: bool = True) -> None:
        self.graph = graph
        self.loss_fn = loss_fn or _sum_cross_entropy
        self.reuse = reuse_activations
        gm = graph.traced
        self.gm = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        self.last_use = [0] * len(self.nodes)
        for i, node in enumerate(self.nodes):
            for inp in node.all_input_nodes:
                self.last_use[index[inp]] = max(self.last_use[index[inp]], i)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        gate_index = {}
        by_target = {n.target: i for i, n in enumerate(self.nodes) if n.op == "call_module"}
        for name in graph.gates:
            target = name if name in by_target else name.split(".", 1)[-1]
            while target not in by_target and "." in target:
                target = target.split(".", 1)[1]
            gate_index[name] = by_target[target]
        # neuron -> [(node index, channel dim, channels)]
        self.sites: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for name, gate in graph.gates.items():
            dim = -1 if gate.kind == "linear" else 1
            for neuron in gate.neurons.unique().tolist():
                channels = torch.nonzero(gate.neurons == neuron).flatten()
                self.sites.setdefault(neuron, []).append((gate_index[name], dim, channels))

    def _zero_map(self, neurons: Iterable[int]) -> dict[int, list[tuple[int, torch.Tensor]]]:
        zero: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for neuron in neurons:
            for i, dim, channels in self.sites.get(neuron, ()):
                zero.setdefault(i, []).append((dim, channels))
        return zero

    @staticmethod
    def _apply_zero(value: torch.Tensor, zeros: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        for dim, channels in zeros:
            value = value.index_fill(dim % value.ndim, channels.to(value.device), 0.0)
        return value

    def _exec(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"unexpected fx node {node.op}")

    def _run(self, env: dict[fx.Node, Any], start: int, zero: dict[int, list[tuple[int, torch.Tensor]]],
             on_node: Callable[[int, dict], None] | None = None) -> Any:  # fmt: skip
        """Compute nodes ``start..end`` into ``env`` (freed as they die); return the network output."""
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            value = self._exec(node, env)
            if i in zero:
                value = self._apply_zero(value, zero[i])
            env[node] = value
            if on_node is not None:
                on_node(i, env)
            if node.op == "output":
                return value
            for inp in node.all_input_nodes:
                if self._last[inp] <= i:
                    env.pop(inp, None)
        raise RuntimeError("the traced graph has no output")

    @torch.no_grad()
    def evaluate(
        self, x: Any, y: torch.Tensor, candidates: Sequence[Iterable[int]], removed: Iterable[int] = ()
    ) -> tuple[float, list[float]]:
        """Summed loss on ``(x, y)`` with ``removed`` neurons gone, then with each candidate set also gone."""
        self._last = {n: self.last_use[i] for i, n in enumerate(self.nodes)}
        base_zero = self._zero_map(removed)
        cands = [sorted(set(c)) for c in candidates]
        starts: dict[int, list[int]] = {}
        for j, c in enumerate(cands):
            zmap = self._zero_map(c)
            first = min(zmap) if zmap else len(self.nodes) - 1
            starts.setdefault(first if self.reuse else -1, []).append(j)
        losses = [0.0] * len(cands)
        inputs = list(x) if isinstance(x, (tuple, list)) else [x]

        def fresh_env() -> dict[fx.Node, Any]:
            return {p: v for p, v in zip(self.placeholders, inputs)}

        def run_suffix(i: int, env: dict[fx.Node, Any]) -> None:
            for j in starts.get(i, ()):
                zmap = self._zero_map(cands[j])
                for k, zs in base_zero.items():
                    zmap.setdefault(k, []).extend(zs)
                if i < 0:  # no reuse: the whole network again
                    out = self._run(fresh_env(), 0, zmap)
                else:
                    sub = dict(env)
                    sub[self.nodes[i]] = self._apply_zero(env[self.nodes[i]], zmap.pop(i))
                    out = self._run(sub, i + 1, zmap)
                losses[j] = float(self.loss_fn(out, y))

        run_suffix(-1, {})
        out = self._run(fresh_env(), 0, base_zero, on_node=run_suffix)
        return float(self.loss_fn(out, y)), losses


@dataclass
class OracleScores:
    """Oracle importance per neuron (``nan`` where not evaluated): ``signed = E(W | removed) - E(W)``,
    ``squared = signed^2`` (Eq. 3); ``base_loss`` is ``E(W)`` (mean over the examples)."""

    signed: torch.Tensor
    squared: torch.Tensor
    base_loss: float
    seconds: float
    evaluations: int
    examples: int


def _batches(data: Iterable[Any], num_batches: int | None) -> list[Any]:
    out = []
    for i, b in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        out.append(b)
    return out


def oracle_importance(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    graph: DependencyGraph | None = None,
    alive: torch.Tensor | None = None,
    neurons: Sequence[int] | None = None,
    loss_fn: SumLoss | None = None,
    reuse_activations: bool = True,
    gate_placement: str = "after_bn",
) -> OracleScores:
    """Greedy oracle: the loss change of removing each alive prunable neuron alone (given the removed ones).

    ``loss_fn(out, y)`` must return the loss *summed* over the batch (default: cross-entropy). The network
    runs in eval mode. ``reuse_activations=False`` runs the whole network for every neuron (for timing).
    """
    batches = _batches(data, num_batches)
    start = time.perf_counter()
    device = next(model.parameters()).device
    if graph is None:
        graph = build_dependency_graph(model, _to(split_batch(batches[0])[0], device), placement=gate_placement)
    alive = torch.ones(graph.num_neurons, dtype=torch.bool) if alive is None else alive
    removed = torch.nonzero(~alive).flatten().tolist()
    if neurons is None:
        neurons = torch.nonzero(alive & graph.prunable).flatten().tolist()
    runner = SuffixRunner(graph, loss_fn, reuse_activations)
    base, losses, count = _mean_losses(model, batches, runner, [[n] for n in neurons], removed)
    signed = torch.full((graph.num_neurons,), float("nan"), dtype=torch.float64)
    signed[torch.tensor(neurons, dtype=torch.long)] = losses - base
    return OracleScores(signed, signed.square(), base, time.perf_counter() - start,
                        len(neurons) * len(batches), count)  # fmt: skip


def _mean_losses(
    model: nn.Module, batches: list[Any], runner: SuffixRunner, subsets: Sequence[Iterable[int]], removed: list[int]
) -> tuple[float, torch.Tensor, int]:
    """Mean loss over ``batches`` (eval mode) with ``removed`` gone, and with each subset also gone;
    and the number of examples."""
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    base_total, totals, count = 0.0, torch.zeros(len(subsets), dtype=torch.float64), 0
    try:
        for batch in batches:
            x, y = split_batch(batch)
            x, y = _to(x, device), _to(y, device)
            base, losses = runner.evaluate(x, y, subsets, removed)
            base_total += base
            totals += torch.tensor(losses, dtype=torch.float64)
            count += y.shape[0]
    finally:
        for m, training in modes.items():
            m.training = training
    return base_total / count, totals / count, count


def subset_losses(
    model: nn.Module,
    data: Iterable[Any],
    subsets: Sequence[Iterable[int]],
    *,
    graph: DependencyGraph,
    removed: Iterable[int] = (),
    loss_fn: SumLoss | None = None,
    num_batches: int | None = None,
) -> tuple[float, torch.Tensor]:
    """Mean loss with ``removed`` gone (first) and with each subset of neurons also gone."""
    runner = SuffixRunner(graph, loss_fn)
    base, losses, _ = _mean_losses(model, _batches(data, num_batches), runner, subsets, list(removed))
    return base, losses
