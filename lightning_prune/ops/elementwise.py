"""Element-wise ops: channel-wise ones (activations, pooling, dropout, copies) pass channels through;
additions and products of two traced tensors whose channels meet one by one tie them."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.dependency.channels import ZERO, ChannelTag
from lightning_prune.ops.registry import OpRule, register_op_rule, tensor_shape

_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)  # fmt: skip
_CHANNELWISE_FUNCTIONS = (
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, torch.clone,
)  # fmt: skip
_CHANNELWISE_METHODS = (
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "half", "bfloat16", "to",
    "type_as", "cpu", "cuda", "detach",
)  # fmt: skip
_SUBTRACT = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_DIVIDE = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_OUT_OF_PLACE = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    "add_": "add", "sub_": "sub", "mul_": "mul",
}  # fmt: skip


@register_op_rule(*_CHANNELWISE_MODULES, *_CHANNELWISE_FUNCTIONS, *_CHANNELWISE_METHODS)
class ChannelWise(OpRule):
    """A removed (zero) channel stays exactly zero through the op: channels pass through unchanged, and
    the compact network runs the op on its compact tensor."""

    def propagate(self, walker, node):
        if node.op == "call_module" and len(node.args) != 1:
            return walker.opaque(node)
        return walker.value(node.args[0])


@register_op_rule(
    operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"
)
class Add(OpRule):
    """A residual connection: the channels of the two operands are tied one by one."""

    def propagate(self, walker, node):
        operands = [walker.value(a) for a in node.args[:2]]
        tags = [t for t in operands if isinstance(t, ChannelTag)]
        if len(tags) == 2 and tags[0].aligned(tags[1]):
            walker.nodes.union(tags[0].nodes, tags[1].nodes, residual=True)
            merged = torch.where(tags[0].nodes == ZERO, tags[1].nodes, tags[0].nodes)
            walker.nodes.record_merge(merged, torch.where(tags[0].nodes == ZERO, tags[0].nodes, tags[1].nodes))
            return ChannelTag(merged, tags[0].dim, tags[0].ndim)
        return walker.opaque(node, "addition of a constant or of broadcast channels")

    def compact(self, builder, node):
        """Each operand brought to the output's kept channels: ``index_add`` where one already has them."""
        found = _binary_tags(builder, node)
        if found is None or len(node.args) != 2 or node.kwargs:
            return None
        out, a, b = found
        subtract = node.target in _SUBTRACT
        kept = builder.kept_positions(out)
        same_a, same_b = torch.equal(builder.kept[a], kept), torch.equal(builder.kept[b], kept)
        shape_a, shape_b = tensor_shape(a), tensor_shape(b)
        if same_a and same_b:
            target = _OUT_OF_PLACE.get(node.target, node.target)
            return builder.copy(node, (builder.env[a], builder.env[b]), {}, target=target)
        if shape_a is not None and shape_a == shape_b and (same_a or (same_b and not subtract)):
            main, other = (a, b) if same_a else (b, a)
            lookup = {p: i for i, p in enumerate(kept.tolist())}
            index = builder.buffer(torch.tensor([lookup[p] for p in builder.kept[other].tolist()], dtype=torch.long))
            kwargs = {"alpha": -1} if subtract else {}
            args = (builder.env[main], out.dim, index, builder.env[other])
            return builder.graph.call_method("index_add", args, kwargs)
        fn = operator.sub if subtract else operator.add
        return builder.graph.call_function(fn, (builder.at(a, kept), builder.at(b, kept)))


@register_op_rule(
    operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div, "mul", "mul_", "div", "div_"
)
class Mul(OpRule):
    """Scaling by a number keeps zeros; a product of two traced tensors ties their channels."""

    def propagate(self, walker, node):
        operands = [walker.value(a) for a in node.args[:2]]
        tags = [t for t in operands if isinstance(t, ChannelTag)]
        numbers = [a for a in node.args[:2] if isinstance(a, (int, float))]
        divides = node.target in _DIVIDE
        if len(tags) == 1 and len(numbers) == 1 and (not divides or isinstance(operands[0], ChannelTag)):
            return tags[0]
        if len(tags) == 2 and tags[0].aligned(tags[1]) and not divides:
            walker.nodes.union(tags[0].nodes, tags[1].nodes)
            return tags[0]
        return walker.opaque(node, "multiplication or division by a tensor")

    def compact(self, builder, node):
        """A product of two traced tensors multiplies their kept channels; scaling runs as it is."""
        found = _binary_tags(builder, node)
        if found is None or node.target in _DIVIDE or len(node.args) != 2 or node.kwargs:
            return None
        out, a, b = found
        if out.size != builder.tag(a).size or out.size != builder.tag(b).size:
            return None
        kept = builder.kept_positions(out)
        target = _OUT_OF_PLACE.get(node.target, node.target)
        return builder.copy(node, (builder.at(a, kept), builder.at(b, kept)), {}, target=target)


def _binary_tags(builder, node: fx.Node) -> tuple[ChannelTag, fx.Node, fx.Node] | None:
    """The output tag and the two operands of an element-wise op whose channels meet one by one (the
    graph tied them); else None."""
    out = builder.tag(node)
    args = node.args[:2]
    if out is None or len(args) != 2 or not all(builder.tag(a) is not None for a in args):
        return None
    if not (builder.tag(args[0]).aligned(builder.tag(args[1])) and out.dim == builder.tag(args[0]).dim):
        return None
    return out, args[0], args[1]
