"""Walk a traced graph and give every tensor's channels their nodes (see :mod:`.channels`).

Each op is classified: channel-creating layers (Conv, Linear), channel-wise layers (BatchNorm),
zero-preserving element-wise ops and pooling (a removed channel stays exactly zero through them),
ties (addition, multiplication of two traced tensors), re-indexing (concatenation, flatten, channel
slicing and zero padding). Anything else blocks the channels that flow into it, so an unknown op can
make pruning more conservative but never wrong.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.dependency.channels import ZERO, ChannelNodes, ChannelTag

_ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)  # fmt: skip
_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, torch.clone,
}  # fmt: skip
_ZERO_PRESERVING_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "half", "bfloat16", "to",
    "type_as", "cpu", "cuda", "detach",
}  # fmt: skip
_ADD_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_MUL_METHODS = {"mul", "mul_", "div", "div_"}
_SHAPE_METHODS = {"size", "dim", "numel"}
_FLATTEN = {torch.flatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_REDUCE = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}


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
    walker = _Walker(gm)
    for node in gm.graph.nodes:
        walker.env[node] = walker.visit(node)
    walker.result.values = walker.env
    return walker.result


def _shape(node: Any) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


class _Walker:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.result = Propagation(ChannelNodes())
        self.nodes = self.result.nodes
        self.env: dict[fx.Node, Any] = {}

    # -- helpers -----------------------------------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.env.get(arg)
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a) for a in arg)
        return None

    def tags_in(self, node: fx.Node) -> list[ChannelTag]:
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
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return ChannelTag(self.nodes.fresh(shape[1], reason), 1, len(shape))

    def opaque(self, node: fx.Node, what: str) -> ChannelTag | None:
        """Unknown op: block everything flowing in, give the output blocked nodes."""
        reason = f"flows into unsupported op {what} ({node.name})"
        for tag in self.tags_in(node):
            self.nodes.block(tag.nodes, reason)
        return self.fresh_for(node, reason)

    def use(self, name: str) -> LayerUse:
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
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        if node.op == "call_function":
            return self.visit_function(node)
        if node.op == "call_method":
            return self.visit_method(node)
        return self.opaque(node, node.op)

    def visit_module(self, node: fx.Node, module: nn.Module) -> Any:
        name = str(node.target)
        x = self.value(node.args[0]) if node.args else None
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            return self.conv(node, name, module, x)
        if isinstance(module, nn.Linear):
            return self.linear(node, name, module, x)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self.batchnorm(node, name, x)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, module.start_dim, module.end_dim)
        if isinstance(module, _ZERO_PRESERVING_MODULES) and len(node.args) == 1:
            return x
        return self.opaque(node, type(module).__name__)

    def visit_function(self, node: fx.Node) -> Any:
        fn = node.target
        if fn is operator.getitem:
            return self.getitem(node)
        if fn in _ADD_FUNCTIONS:
            return self.add(node)
        if fn in _MUL_FUNCTIONS:
            return self.mul(node)
        if fn in _ZERO_PRESERVING_FUNCTIONS:
            return self.value(node.args[0])
        if fn in _FLATTEN:
            return self.flatten(node, self.value(node.args[0]), *self.flatten_dims(node))
        if fn is torch.cat or fn is torch.concat:
            return self.cat(node)
        if fn is F.pad:
            return self.pad(node)
        if fn in _REDUCE:
            return self.reduce(node)
        if fn is getattr:
            return None
        return self.opaque(node, getattr(fn, "__name__", str(fn)))

    def visit_method(self, node: fx.Node) -> Any:
        method = node.target
        if method in _SHAPE_METHODS:
            return None
        if method in _ZERO_PRESERVING_METHODS:
            return self.value(node.args[0])
        if method in _ADD_METHODS:
            return self.add(node)
        if method in _MUL_METHODS:
            return self.mul(node)
        if method == "flatten":
            return self.flatten(node, self.value(node.args[0]), *self.flatten_dims(node))
        if method in _RESHAPE_METHODS:
            return self.reshape(node)
        if method in _REDUCE_METHODS:
            return self.reduce(node)
        return self.opaque(node, f".{method}()")

    # -- layers ------------------------------------------------------------------------------------------
    def conv(self, node: fx.Node, name: str, conv: nn.modules.conv._ConvNd, x: Any) -> Any:
        use = self.use(name)
        if not isinstance(x, ChannelTag) or x.dim != 1:
            return self.opaque(node, f"{type(conv).__name__} on an untracked input")
        use.in_nodes = x.nodes
        if conv.groups == 1:
            out = self.nodes.fresh(conv.out_channels)
            use.creates = True
            for ch, n in enumerate(out.tolist()):
                self.result.creator[n] = (name, ch)
        elif conv.groups == conv.in_channels == conv.out_channels:
            out = self.nonzero_constant(x.nodes, f"depthwise {name} sees a zero-padded channel")
        else:
            reason = f"grouped convolution {name} (groups={conv.groups})"
            self.nodes.block(x.nodes, reason)
            out = self.nodes.fresh(conv.out_channels, reason)
        use.out_nodes = out
        return ChannelTag(out, 1, x.ndim)

    def linear(self, node: fx.Node, name: str, linear: nn.Linear, x: Any) -> Any:
        use = self.use(name)
        if not isinstance(x, ChannelTag) or x.dim != x.ndim - 1:
            return self.opaque(node, f"Linear {name} on an untracked or non-feature dimension")
        use.in_nodes = x.nodes
        out = self.nodes.fresh(linear.out_features)
        use.creates = True
        for ch, n in enumerate(out.tolist()):
            self.result.creator[n] = (name, ch)
        use.out_nodes = out
        return ChannelTag(out, x.ndim - 1, x.ndim)

    def batchnorm(self, node: fx.Node, name: str, x: Any) -> Any:
        use = self.use(name)
        if not isinstance(x, ChannelTag) or x.dim != 1:
            return self.opaque(node, f"BatchNorm {name} on an untracked input")
        out = self.nonzero_constant(x.nodes, f"BatchNorm {name} sees a zero-padded channel")
        use.in_nodes = use.out_nodes = out
        return ChannelTag(out, 1, x.ndim)

    def nonzero_constant(self, nodes: torch.Tensor, reason: str) -> torch.Tensor:
        """A layer with a bias turns structurally-zero channels into constants: give them blocked nodes."""
        zero = nodes == ZERO
        if not zero.any():
            return nodes
        nodes = nodes.clone()
        nodes[zero] = self.nodes.fresh(int(zero.sum()), reason)
        return nodes

    # -- element-wise ------------------------------------------------------------------------------------
    def add(self, node: fx.Node) -> Any:
        operands = [self.value(a) for a in node.args[:2]]
        tags = [t for t in operands if isinstance(t, ChannelTag)]
        if len(tags) == 2 and tags[0].aligned(tags[1]):
            self.nodes.union(tags[0].nodes, tags[1].nodes, residual=True)
            merged = torch.where(tags[0].nodes == ZERO, tags[1].nodes, tags[0].nodes)
            self.nodes.record_merge(merged, torch.where(tags[0].nodes == ZERO, tags[0].nodes, tags[1].nodes))
            return ChannelTag(merged, tags[0].dim, tags[0].ndim)
        return self.opaque(node, "addition of a constant or of broadcast channels")

    def mul(self, node: fx.Node) -> Any:
        """Scaling by a number keeps zeros; a product of two traced tensors ties their channels."""
        operands = [self.value(a) for a in node.args[:2]]
        tags = [t for t in operands if isinstance(t, ChannelTag)]
        numbers = [a for a in node.args[:2] if isinstance(a, (int, float))]
        divides = node.target in (operator.truediv, operator.itruediv, torch.div, "div", "div_")
        if len(tags) == 1 and len(numbers) == 1 and (not divides or isinstance(operands[0], ChannelTag)):
            return tags[0]
        if len(tags) == 2 and tags[0].aligned(tags[1]) and not divides:
            self.nodes.union(tags[0].nodes, tags[1].nodes)
            return tags[0]
        return self.opaque(node, "multiplication or division by a tensor")

    # -- re-indexing -------------------------------------------------------------------------------------
    def flatten_dims(self, node: fx.Node) -> tuple[int, int]:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        return int(start), int(end)

    def flatten(self, node: fx.Node, x: Any, start: int, end: int) -> Any:
        if not isinstance(x, ChannelTag):
            return self.opaque(node, "flatten")
        start, end = start % x.ndim, end % x.ndim
        if x.dim < start:
            return ChannelTag(x.nodes, x.dim, x.ndim - (end - start))
        if x.dim == start == 1:
            in_shape = _shape(node.args[0])
            inner = math.prod(in_shape[2 : end + 1]) if in_shape is not None else 1
            return ChannelTag(x.nodes.repeat_interleave(inner), 1, x.ndim - (end - start))
        return self.opaque(node, "flatten across the channel dimension")

    def reshape(self, node: fx.Node) -> Any:
        x = self.value(node.args[0])
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if not isinstance(x, ChannelTag) or in_shape is None or out_shape is None or x.dim != 1:
            return self.opaque(node, f".{node.target}()")
        if len(out_shape) >= 2 and tuple(out_shape[:2]) == tuple(in_shape[:2]):
            return ChannelTag(x.nodes, 1, len(out_shape))
        if len(out_shape) == 2 and out_shape[0] == in_shape[0] and out_shape[1] == math.prod(in_shape[1:]):
            return ChannelTag(x.nodes.repeat_interleave(math.prod(in_shape[2:])), 1, 2)
        return self.opaque(node, f".{node.target}() across the channel dimension")

    def reduce(self, node: fx.Node) -> Any:
        x = self.value(node.args[0])
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        if not isinstance(x, ChannelTag) or dims is None:
            return self.opaque(node, f"reduction {node.target}")
        dims = [d % x.ndim for d in ((dims,) if isinstance(dims, int) else dims)]
        if x.dim in dims or 0 in dims:
            return self.opaque(node, f"reduction {node.target} over the channel or batch dimension")
        return ChannelTag(x.nodes, x.dim, x.ndim if keepdim else x.ndim - len(dims))

    def cat(self, node: fx.Node) -> Any:
        parts = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        values = [self.value(p) for p in parts]
        if not values or not all(isinstance(v, ChannelTag) for v in values):
            return self.opaque(node, "concatenation with an untracked tensor")
        ndim = values[0].ndim
        if dim % ndim == values[0].dim and all(v.dim == values[0].dim for v in values):
            return ChannelTag(torch.cat([v.nodes for v in values]), values[0].dim, ndim)
        for other in values[1:]:
            if other.size != values[0].size:
                return self.opaque(node, "concatenation of mismatched channels")
            self.nodes.union(values[0].nodes, other.nodes)
        return values[0]

    def pad(self, node: fx.Node) -> Any:
        x = self.value(node.args[0])
        pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if not isinstance(x, ChannelTag) or not isinstance(pad, (tuple, list)):
            return self.opaque(node, "pad")
        if mode == "constant" and value not in (None, 0, 0.0):
            return self.opaque(node, "pad with a non-zero value")
        pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
        channel_pair = x.ndim - 1 - x.dim
        if channel_pair >= len(pairs):
            return x
        if mode != "constant" or any(not isinstance(p, int) for p in pairs[channel_pair]):
            return self.opaque(node, "non-constant pad of the channel dimension")
        left, right = pairs[channel_pair]
        kept = x.nodes[max(-left, 0) : x.size - max(-right, 0)]
        before = torch.full((max(left, 0),), ZERO, dtype=torch.long)
        after = torch.full((max(right, 0),), ZERO, dtype=torch.long)
        return ChannelTag(torch.cat([before, kept, after]), x.dim, x.ndim)

    def getitem(self, node: fx.Node) -> Any:
        container, index = self.value(node.args[0]), node.args[1]
        if isinstance(container, (tuple, list)) and isinstance(index, int):
            return container[index]
        if not isinstance(container, ChannelTag):
            return None if container is None and _shape(node) is None else self.opaque(node, "indexing")
        x = container
        idx = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) or not isinstance(i, (slice, type(Ellipsis), type(None))) for i in idx):
            return self.opaque(node, "advanced indexing")
        if any(i is None for i in idx):
            return self.opaque(node, "indexing that adds dimensions")
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (x.ndim - len(idx) + 1) + idx[at + 1 :]
        if len(idx) <= x.dim:
            return x
        if any(isinstance(v, fx.Node) for s in idx for v in (s.start, s.stop, s.step)):
            return self.opaque(node, "slicing with traced bounds")
        return ChannelTag(x.nodes[idx[x.dim]], x.dim, x.ndim)
