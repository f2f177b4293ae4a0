"""Walk a traced graph and give every tensor's channels their nodes (see :mod:`.channels`).

Each op is handled by its rule in :mod:`lightning_prune.ops`: channel-creating layers (Conv, Linear),
channel-wise layers and ops (BatchNorm, activations, pooling: a removed channel stays exactly zero
through them), ties (addition, multiplication of two traced tensors), re-indexing (concatenation,
flatten, channel slicing and zero padding). An op without a rule blocks the channels that flow into it,
so an unknown op can make pruning more conservative but never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lightning_prune.dependency.channels import ChannelNodes, ChannelTag
from lightning_prune.ops.registry import find_op_rule, tensor_shape


@dataclass
class LayerUse:
    """How one Conv/Linear/BatchNorm module meets the channel nodes."""

    module: nn.Module
    in_nodes: torch.Tensor | None = None
    out_nodes: torch.Tensor | None = None
    creates: bool = False  # allocates fresh output nodes (Conv/Linear with groups == 1)
    calls: int = 0


@dataclass
class Propagation:
    """Result of a walk: the node allocator and the layers that read or write channels."""

    nodes: ChannelNodes
    layers: dict[str, LayerUse] = field(default_factory=dict)
    creator: dict[int, tuple[str, int]] = field(default_factory=dict)  # fresh node -> (layer, channel)
    values: dict[fx.Node, Any] = field(default_factory=dict)  # fx node -> ChannelTag (or nested, or None)


def propagate(gm: fx.GraphModule) -> Propagation:
    """Assign channel nodes to every value of ``gm`` (traced by :func:`..trace.trace`)."""
    walker = ChannelWalker(gm)
    for node in gm.graph.nodes:
        walker.env[node] = walker.visit(node)
    walker.result.values = walker.env
    return walker.result


class ChannelWalker:
    """Gives every value of a traced graph its channel tag, op by op through the op rules."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.result = Propagation(ChannelNodes())
        self.nodes = self.result.nodes
        self.env: dict[fx.Node, Any] = {}

    # -- helpers -----------------------------------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        """The channel tag of a traced value (nested for tuples and lists; None for anything else)."""
        if isinstance(arg, fx.Node):
            return self.env.get(arg)
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a) for a in arg)
        return None

    def tags_in(self, node: fx.Node) -> list[ChannelTag]:
        """The channel tags of every input of ``node``."""
        found: list[ChannelTag] = []

        def collect(v: Any) -> None:
            if isinstance(v, ChannelTag):
                found.append(v)
            elif isinstance(v, (tuple, list)):
                for item in v:
                    collect(item)

        for arg in list(node.args) + list(node.kwargs.values()):
            collect(self.value(arg))
        return found

    def fresh_for(self, node: fx.Node, reason: str | None) -> ChannelTag | None:
        """Fresh nodes (blocked for ``reason``) for the channels (dimension 1) of ``node``'s output."""
        shape = tensor_shape(node)
        if shape is None or len(shape) < 2:
            return None
        return ChannelTag(self.nodes.fresh(shape[1], reason), 1, len(shape))

    def opaque(self, node: fx.Node, what: str | None = None) -> ChannelTag | None:
        """An op (``what``, by default its name) no rule handles: block everything flowing in, give the
        output blocked nodes."""
        reason = f"flows into unsupported op {what or self.op_name(node)} ({node.name})"
        for tag in self.tags_in(node):
            self.nodes.block(tag.nodes, reason)
        return self.fresh_for(node, reason)

    def op_name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return type(self.modules[node.target]).__name__
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return f".{node.target}()" if node.op == "call_method" else node.op

    def use(self, name: str) -> LayerUse:
        """The record of layer ``name``, counting this call."""
        entry = self.result.layers.setdefault(name, LayerUse(self.modules[name]))
        entry.calls += 1
        return entry

    # -- dispatch ----------------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.fresh_for(node, "network input")
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for tag in self.tags_in(node):
                self.nodes.block(tag.nodes, "network output")
            return None
        rule = find_op_rule(node, self.modules)
        return rule.propagate(self, node) if rule is not None else self.opaque(node)
