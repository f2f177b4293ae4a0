"""Walk a traced graph and give every tensor's channels their nodes (see :mod:`.channels`).

Each op is handled by its rule in :mod:`lightning_prune.ops`: channel-creating layers (Conv, Linear),
channel-wise layers and ops (BatchNorm, activations, pooling: a removed channel stays exactly zero
through them), ties (addition, multiplication of two traced tensors), re-indexing (concatenation,
flatten, channel slicing and zero padding). An op without a rule blocks the channels that flow into it,
so an unknown op can make pruning more conservative but never wrong. A value whose removed channels are
not zero (``ChannelTag.nonzero``, after a sigmoid) has its channels blocked when it reaches an op whose
rule does not declare ``takes_nonzero``: the check is here, in :meth:`ChannelWalker.visit`, not in each
rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from lightning_prune.dependency.channels import ChannelNodes, ChannelTag
from lightning_prune.ops.registry import find_op_rule, sole_reader, tensor_shape


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
    # module -> nodes: the module's own FLOPs (besides its Conv/Linear layers) scale with their kept share
    scaled: dict[str, torch.Tensor] = field(default_factory=dict)
    # parameter -> (dimension, nodes): a parameter whose slices along that dimension are the nodes' channels
    parameters: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)


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

    def fresh_for(self, node: fx.Node, reason: str | None, last: bool = False) -> ChannelTag | None:
        """Fresh nodes (blocked for ``reason``) for the channels of ``node``'s output: on dimension 1, or
        on the last one (``last``, channels-last)."""
        shape = tensor_shape(node)
        if shape is None or len(shape) < 2:
            return None
        dim = len(shape) - 1 if last else 1
        return ChannelTag(self.nodes.fresh(shape[dim], reason), dim, len(shape))

    def opaque(self, node: fx.Node, what: str | None = None) -> ChannelTag | None:
        """An op (``what``, by default its name) no rule handles: block everything flowing in, give the
        output blocked nodes (no channels at all when nothing traced flows in: a new or constant tensor),
        on the last dimension when every input has its channels on its last one, of three or more (a
        channels-last block)."""
        return self.kept_around(node, f"flow into unsupported op {what or self.op_name(node)} ({self.where(node)})")

    def kept_around(self, node: fx.Node, reason: str) -> ChannelTag | None:
        """:meth:`opaque` with the given ``reason``: the channels in and out of ``node`` are kept."""
        tags = self.tags_in(node)
        for tag in tags:
            self.nodes.block(tag.nodes, reason)
        return self.fresh_for(node, reason, all(t.dim == t.ndim - 1 > 1 for t in tags)) if tags else None

    def where(self, node: fx.Node) -> str:
        """Where ``node`` runs: the module it calls, else the innermost module whose forward it is in."""
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack), "") or "the top-level forward"

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

    def parameter_channels(self, arg: Any, like: ChannelTag) -> ChannelTag | None:
        """Fresh nodes for the channels of a parameter (``arg``: a ``get_attr`` node, or its ``expand``) that an
        op meets one by one with the traced channels ``like`` (``x + pos_embed``, a class token concatenated to
        the tokens), recorded as written by the parameter; None for anything else, or for a parameter read
        elsewhere (its removed slices are zeroed and cut out)."""
        attr = arg.args[0] if isinstance(arg, fx.Node) and arg.op == "call_method" and arg.target == "expand" else arg
        if not isinstance(attr, fx.Node) or not sole_reader(attr) or len(arg.users) != 1:
            return None
        target, shape = str(attr.target), tensor_shape(arg)
        try:
            param = self.gm.get_parameter(target)
        except AttributeError:
            return None
        dim = like.dim - (like.ndim - param.dim())  # dimensions line up from the right
        if shape is None or len(shape) != like.ndim or shape[like.dim] != like.size or dim < 0:
            return None
        if param.shape[dim] != like.size:
            return None
        nodes = self.nodes.fresh(like.size)
        self.result.parameters[target] = (dim, nodes)
        self.env[attr] = ChannelTag(nodes, dim, param.dim())
        self.env[arg] = ChannelTag(nodes, like.dim, like.ndim)
        return self.env[arg]

    # -- dispatch ----------------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.fresh_for(node, f"are the network input {node.name}")
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for tag in self.tags_in(node):
                self.nodes.block(tag.nodes, "reach the network output")
            return None
        rule = find_op_rule(node, self.modules)
        if rule is None:
            return self.opaque(node)
        if not rule.takes_nonzero:
            self.settle_nonzero(node)
        return rule.propagate(self, node)

    def settle_nonzero(self, node: fx.Node) -> None:
        """Block the channels of every input of ``node`` whose removed channels are not zero: never
        removed, they make it an ordinary value for this op (and the later ones)."""
        for arg in node.all_input_nodes:
            tag = self.env.get(arg)
            if isinstance(tag, ChannelTag) and tag.nonzero:
                reason = f"are the output of {tag.nonzero}, read by {self.op_name(node)} ({self.where(node)})"
                self.nodes.block(tag.nodes, reason)
                self.env[arg] = replace(tag, nonzero=None)

    def made_nonzero(self, node: fx.Node, tag: ChannelTag, what: str) -> ChannelTag:
        """``tag`` after ``what`` (``node``), an element-wise op that turns zero into a non-zero value:
        the same nodes, marked ``nonzero``; structurally zero channels (``ZERO``) become blocked constants."""
        reason = f"are constants that {what} ({self.where(node)}) makes of structurally zero channels"
        nodes = self.nodes.constants_for_zero(tag.nodes, reason)
        self.nodes.scaling.update(nodes.tolist())
        return replace(tag, nodes=nodes, nonzero=f"{what} in {self.where(node)}")

