"""The dependency graph: gated layers, the neurons they share, and which parameters hold each neuron."""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from lightning_prune.dependency.channels import ZERO, ChannelNodes
from lightning_prune.dependency.propagation import LayerUse, propagate
from lightning_prune.dependency.trace import trace
from lightning_prune.errors import PruningConfigurationError, UnsupportedModelError
from lightning_prune.ops.layers import KeptLayerNorm

GatePlacement = Literal["after_bn", "before_bn"]
GATE_PLACEMENTS = ("after_bn", "before_bn")


@dataclass(frozen=True)
class Gate:
    """A gated layer: a gate ``z = 1`` multiplies each of its output channels.

    ``neurons[c]`` is the neuron (union-find class) that output channel ``c`` belongs to; channels of
    different layers tied by a residual addition share one neuron. ``sources[c]`` is the Conv/Linear
    filter ``(layer, index)`` that produces the channel, when there is one.
    """

    name: str
    module: nn.Module
    kind: Literal["batchnorm", "conv", "linear"]
    neurons: torch.Tensor
    sources: tuple[tuple[str, int] | None, ...]

    @property
    def channels(self) -> int:
        return self.neurons.numel()

    @property
    def gradient_from_parameters(self) -> bool:
        """dE/dz equals sum(p * dE/dp) over the layer's own (homogeneous) parameters of the channel."""
        return getattr(self.module, "weight", None) is not None


@dataclass
class DependencyGraph:
    """What pruning a neuron touches.

    ``writers`` maps every layer whose parameters produce channels (Conv/Linear filters, BatchNorm and
    LayerNorm channels, depthwise filters) to the neuron of each output channel; ``readers`` maps every Conv/Linear
    to the neuron of each input feature (``-1`` for a structurally zero input).
    """

    gates: dict[str, Gate]
    num_neurons: int
    prunable: torch.Tensor  # bool per neuron
    residual: torch.Tensor  # bool per neuron: tied by an addition
    blocked: dict[int, str]  # neuron -> why it can't be pruned
    writers: dict[str, torch.Tensor]
    readers: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]
    traced: fx.GraphModule  # the traced network (names without ``prefix``)
    channel_neurons: dict[fx.Node, Any]  # fx node -> ChannelTag of raw nodes, see ``neuron_of_node``
    neuron_of_node: torch.Tensor  # raw channel node id -> neuron id
    causes: dict[str, int] = field(default_factory=dict)  # reason -> neurons it keeps (``blocked``: the first)
    # module -> neurons: its own FLOPs besides its Conv/Linear layers (attention scores) scale with their kept share
    scaled: dict[str, torch.Tensor] = field(default_factory=dict)
    # parameter -> (dimension, neurons): its slices along that dimension write those neurons (a class token)
    parameters: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)

    def neurons_of(self, raw: torch.Tensor) -> torch.Tensor:
        """The neuron of each raw channel node id (a ``ChannelTag``'s ``nodes``); ``-1`` for a structurally
        zero channel."""
        return _neurons_of(self.neuron_of_node, raw)

    @property
    def prefix(self) -> str:
        """The prefix the graph's names carry: ``modules`` maps ``prefix + name`` for every submodule, and
        the traced network itself is ``prefix + ""``, the shortest key."""
        return min(self.modules, key=len) if self.modules else ""

    def alive_from_masks(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bool per neuron, False for every neuron some gate mask marks as removed."""
        alive = torch.ones(self.num_neurons, dtype=torch.bool)
        for name, mask in masks.items():
            gate = self.gates[name]
            alive[gate.neurons[~mask.to("cpu", torch.bool)]] = False
        return alive

    @property
    def num_prunable(self) -> int:
        return int(self.prunable.sum())

    def describe(self, causes: int = 10) -> str:
        """A summary line, then one line per reason neurons are kept (the ``causes`` most frequent): a neuron
        kept for several reasons (flowing into every LayerNorm of a transformer's residual stream) is
        counted under each."""
        tied = int((self.prunable & self.residual).sum())
        lines = [
            f"{len(self.gates)} gated layers, {self.num_prunable} prunable neurons "
            f"({tied} tied across layers by residual additions), {len(self.blocked)} neurons kept by rule"
        ]
        counts = Counter(self.causes).most_common()
        lines += [f"  {count:,} neurons {reason}" for reason, count in counts[:causes]]
        if len(counts) > causes:
            rest = sum(count for _, count in counts[causes:])
            lines.append(f"  and {len(counts) - causes} more causes ({rest:,} neurons)")
        return "\n".join(lines)


def build_dependency_graph(
    model: nn.Module,
    example_input: Any,
    *,
    placement: GatePlacement = "after_bn",
    ignored_modules: Iterable[str] = (),
    leaf_modules: Iterable[str] = (),
    prune_residual: bool = True,
    prefix: str = "",
) -> DependencyGraph:
    """Trace ``model`` on ``example_input`` and find its gates and neurons.

    Names are qualified module names of ``model``, prefixed by ``prefix`` (e.g. ``"model."`` when
    ``model`` is an attribute of a LightningModule); ``ignored_modules`` and ``leaf_modules`` may be given
    with or without it. Raises :class:`UnsupportedModelError` when nothing can be pruned, and
    :class:`PruningConfigurationError` for a module name that ``model`` does not have.
    """
    if placement not in GATE_PLACEMENTS:
        raise PruningConfigurationError(f"gate placement must be one of {GATE_PLACEMENTS}, got {placement!r}")
    ignored = tuple(module_names(model, ignored_modules, prefix, "ignored_modules"))
    gm = trace(model, example_input, module_names(model, leaf_modules, prefix, "leaf_modules"))
    prop = propagate(gm)
    nodes = prop.nodes
    for name, use in prop.layers.items():
        if use.calls > 1:
            for tensor in (use.in_nodes, use.out_nodes):
                if tensor is not None:
                    nodes.block(tensor, f"are read or written by {name}, called {use.calls} times")
        if use.out_nodes is not None and any(name == i or name.startswith(i + ".") for i in ignored):
            nodes.block(use.out_nodes, f"are written by the ignored module {name}")

    dense, num_neurons = nodes.classes()

    def neurons_of(raw: torch.Tensor) -> torch.Tensor:
        return _neurons_of(dense, raw)

    gate_uses = _gate_uses(prop.layers, placement, nodes)
    gates = {
        prefix + name: Gate(
            name=prefix + name,
            module=use.module,
            kind=_kind(use.module),
            neurons=neurons_of(use.out_nodes),
            sources=tuple(
                (prefix + src[0], src[1]) if (src := prop.creator.get(n)) is not None else None
                for n in use.out_nodes.tolist()
            ),
        )
        for name, use in gate_uses.items()
    }
    gated = torch.zeros(num_neurons, dtype=torch.bool)
    for gate in gates.values():
        gated[gate.neurons] = True
    blocked: dict[int, str] = {}
    for node, reason in nodes.blocked.items():
        blocked.setdefault(int(dense[node]), reason)
    causes = {reason: len(set(dense[ids].tolist())) for reason, ids in nodes.causes.items() if ids}
    residual = torch.zeros(num_neurons, dtype=torch.bool)
    if nodes.residual:
        residual[dense[torch.tensor(sorted(nodes.residual))]] = True
    prunable = gated.clone()
    if blocked:
        prunable[torch.tensor(sorted(blocked))] = False
    if not prune_residual:
        prunable &= ~residual
    # a layer none of whose channels can go (the output layer, ignored layers) is not gated
    gates = {name: gate for name, gate in gates.items() if prunable[gate.neurons].any()}

    writers, readers = {}, {}
    for name, use in prop.layers.items():
        if use.out_nodes is not None and (use.creates or _is_channelwise(use)):
            writers[prefix + name] = neurons_of(use.out_nodes)
        if use.in_nodes is not None and isinstance(use.module, (nn.modules.conv._ConvNd, nn.Linear)):
            readers[prefix + name] = neurons_of(use.in_nodes)

    graph = DependencyGraph(
        gates=gates,
        num_neurons=num_neurons,
        prunable=prunable,
        residual=residual,
        blocked=blocked,
        writers=writers,
        readers=readers,
        modules={prefix + n: m for n, m in model.named_modules()},
        traced=gm,
        channel_neurons=prop.values,
        neuron_of_node=dense,
        causes=causes,
        scaled={prefix + name: neurons_of(raw) for name, raw in prop.scaled.items()},
        parameters={prefix + name: (dim, neurons_of(raw)) for name, (dim, raw) in prop.parameters.items()},
    )
    if graph.num_prunable == 0:
        reasons = Counter(blocked.values()).most_common(5)
        detail = "; ".join(f"{r} ({k} neurons)" for r, k in reasons) or "no BatchNorm, Conv or Linear layer found"
        raise UnsupportedModelError(f"no prunable layer in {type(model).__name__}: {detail}")
    return graph


def _neurons_of(dense: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    return torch.where(raw == ZERO, torch.full_like(raw, -1), dense[raw.clamp(min=0)])


def module_names(model: nn.Module, names: Iterable[str], prefix: str = "", what: str = "module name") -> list[str]:
    """``names`` as qualified names within ``model``: each one given as such or with ``prefix`` in front.

    Raises :class:`PruningConfigurationError` naming every unknown name and the closest existing ones
    (a typo would otherwise silently leave the layer it meant pruned, or traced)."""
    known = {n for n, _ in model.named_modules() if n}
    resolved, unknown = [], []
    for name in names:
        relative = name[len(prefix):] if prefix and name.startswith(prefix) else name
        (resolved if relative in known else unknown).append(relative if relative in known else name)
    if unknown:
        candidates = sorted(known | {prefix + n for n in known})

        def hint(name: str) -> str:
            close = difflib.get_close_matches(name, candidates, n=3)
            return f"{name!r}: did you mean {', '.join(map(repr, close))}?" if close else f"{name!r}: no similar name"

        with_prefix = f" (optionally prefixed by {prefix!r})" if prefix else ""
        raise PruningConfigurationError(
            f"{what}: no module named {', '.join(map(repr, unknown))} in {type(model).__name__} "
            f"({'; '.join(map(hint, unknown))}). Give qualified names as in `named_modules()`{with_prefix}."
        )
    return resolved


def _kind(module: nn.Module) -> Literal["batchnorm", "conv", "linear"]:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    return "linear" if isinstance(module, nn.Linear) else "conv"


def _is_channelwise(use: LayerUse) -> bool:
    return isinstance(use.module, (nn.modules.batchnorm._BatchNorm, KeptLayerNorm)) or (
        isinstance(use.module, nn.modules.conv._ConvNd) and use.module.groups > 1
    )


def _gate_uses(layers: dict[str, LayerUse], placement: GatePlacement, nodes: ChannelNodes) -> dict[str, LayerUse]:
    """BatchNorm outputs, and Conv/Linear outputs that reach no BatchNorm, even through additions
    (``after_bn``); every Conv/Linear output (``before_bn``). Not the Conv/Linear outputs that only
    scale other channels (the excitation of a squeeze-and-excitation block): their neurons are gated
    where the channels they scale are."""
    creators = {
        n: u
        for n, u in layers.items()
        if u.creates and u.out_nodes is not None and not set(u.out_nodes.tolist()) <= nodes.scaling
    }
    if placement == "before_bn":
        return creators
    norms = {
        n: u
        for n, u in layers.items()
        if isinstance(u.module, nn.modules.batchnorm._BatchNorm) and u.out_nodes is not None
    }
    covered = set().union(*(nodes.reaching(u.out_nodes) for u in norms.values())) if norms else set()
    uncovered = {n: u for n, u in creators.items() if not set(u.out_nodes.tolist()) <= covered}
    return {**norms, **uncovered}
