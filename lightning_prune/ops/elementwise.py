"""Element-wise ops: channel-wise ones (activations, pooling, dropout, stochastic depth, copies) pass
channels through; additions and products of two traced tensors whose channels meet one by one tie them.

Gating (squeeze-and-excitation): ``x * sigmoid(fc2(act(fc1(pool(x)))))``. A sigmoid (or hardsigmoid,
``x + 3``...) makes removed channels non-zero, so its output is tagged ``nonzero`` (see
:mod:`lightning_prune.dependency.channels`); the product with ``x`` ties ``fc2``'s channels to ``x``'s
and is zero at the removed ones again. Layer scale: a product with an untraced tensor broadcast per
channel (a parameter ``gamma``, a per-sample DropPath mask) keeps the channels.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.dependency.channels import ZERO, ChannelTag
from lightning_prune.ops.registry import OpRule, register_op_rule, sole_reader, tensor_shape

_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    # stochastic depth / DropPath: a random 0 or 1/(1-p) per sample; by import path, imported only by users
    "torchvision.ops.stochastic_depth.StochasticDepth", "torchvision.ops.stochastic_depth.stochastic_depth",
    "timm.layers.drop.DropPath", "timm.models.layers.drop.DropPath",
)  # fmt: skip
_CHANNELWISE_FUNCTIONS = (
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardtanh, torch.tanh, F.tanh,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, torch.clone,
)  # fmt: skip
_CHANNELWISE_METHODS = (
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "half", "bfloat16", "to",
    "type_as", "cpu", "cuda", "detach",
)  # fmt: skip
_NONZERO_AT_ZERO = (
    nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus,
    F.logsigmoid, torch.exp, "sigmoid", "sigmoid_", "exp", "exp_",
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
    the compact network runs the op on its compact tensor. Output channel c depends on input channel c
    only, so a ``nonzero`` input stays ``nonzero``."""

    takes_nonzero = True

    def propagate(self, walker, node):
        if node.op == "call_module" and len(node.args) != 1:
            return walker.opaque(node)
        return walker.value(node.args[0])


_DROPOUT_MODULES = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                    F.dropout3d: nn.Dropout3d}  # fmt: skip


@register_op_rule(*_DROPOUT_MODULES)
class FunctionalDropout(ChannelWise):
    """``F.dropout(x, p, training=self.training)``: tracing freezes the mode of the traced step, so the
    compact network calls a dropout module instead, which follows the compact network's own train/eval
    mode. Only where the code passes ``training``: without it, ``F.dropout`` drops in both modes, as written."""

    def compact(self, builder, node):
        args = dict(zip(("input", "p", "training", "inplace"), node.args)) | dict(node.kwargs)
        p, inplace = args.get("p", 0.5), args.get("inplace", False)
        if not (isinstance(args.get("training"), bool) and isinstance(p, (int, float)) and isinstance(inplace, bool)):
            return None
        module = _DROPOUT_MODULES[node.target](p=float(p), inplace=inplace)
        name = f"_compact_dropout_{node.name}"
        builder.root.add_module(name, module)
        return builder.graph.call_module(name, (builder.env[args["input"]],))


@register_op_rule(*_NONZERO_AT_ZERO)
class NonZeroAtZero(OpRule):
    """An element-wise function with ``f(0) != 0`` (sigmoid, hardsigmoid, softplus, exp): channels pass
    through, tagged ``nonzero``; only a product with a tied zero-preserving value may consume it."""

    takes_nonzero = True

    def propagate(self, walker, node):
        x = walker.value(node.args[0]) if node.args else None
        if not isinstance(x, ChannelTag) or (node.op == "call_module" and len(node.args) != 1):
            return walker.opaque(node)
        return walker.made_nonzero(node, x, walker.op_name(node))


@register_op_rule(
    operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"
)
class Add(OpRule):
    """A residual connection: the channels of the two operands are tied one by one. A parameter added to the
    channels one by one (a position embedding) is tied to them, as a writer of their neurons."""

    def propagate(self, walker, node):
        operands = [walker.value(a) for a in node.args[:2]]
        tags = [t for t in operands if isinstance(t, ChannelTag)]
        if len(tags) == 1 and len(operands) == 2:
            traced = 0 if isinstance(operands[0], ChannelTag) else 1
            if tensor_shape(node) == tensor_shape(node.args[traced]):
                param = walker.parameter_channels(node.args[1 - traced], tags[0])
                tags += [param] if param is not None else []
        if len(tags) == 2 and tags[0].aligned(tags[1]):
            walker.nodes.union(tags[0].nodes, tags[1].nodes, residual=True)
            merged = torch.where(tags[0].nodes == ZERO, tags[1].nodes, tags[0].nodes)
            walker.nodes.record_merge(merged, torch.where(tags[0].nodes == ZERO, tags[0].nodes, tags[1].nodes))
            return ChannelTag(merged, tags[0].dim, tags[0].ndim)
        if len(tags) == 1 and any(isinstance(a, (int, float)) for a in node.args[:2]):
            return walker.made_nonzero(node, tags[0], "addition of a number")  # hard sigmoid: relu6(x + 3) / 6
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
    """Scaling by a number, or by an untraced tensor broadcast into the traced one (layer scale, a
    DropPath mask), keeps zeros; a product of two traced tensors ties their channels. A product of a
    ``nonzero`` value (a sigmoid gate) with a zero-preserving one is zero at the removed channels."""

    takes_nonzero = True

    def propagate(self, walker, node):
        operands = [walker.value(a) for a in node.args[:2]]
        tags = [t for t in operands if isinstance(t, ChannelTag)]
        numbers = [a for a in node.args[:2] if isinstance(a, (int, float))]
        divides = node.target in _DIVIDE
        if len(tags) == 1 and len(numbers) == 1 and (not divides or isinstance(operands[0], ChannelTag)):
            return tags[0]
        if len(tags) == 2 and tags[0].aligned(tags[1]) and not divides:
            walker.nodes.union(tags[0].nodes, tags[1].nodes)
            return next((t for t in tags if not t.nonzero), tags[0])
        if len(tags) == 1 and not divides and _scale_of(node, lambda a: isinstance(walker.value(a), ChannelTag)):
            return tags[0]
        return walker.opaque(node, "multiplication or division by a tensor")

    def compact(self, builder, node):
        """A product of two traced tensors multiplies their kept channels; a scale per channel is sliced to
        them; scaling by a number runs as it is."""
        if node.target in _DIVIDE or len(node.args) != 2 or node.kwargs:
            return None
        found = _binary_tags(builder, node)
        if found is None:
            return _compact_scale(builder, node)
        out, a, b = found
        if out.size != builder.tag(a).size or out.size != builder.tag(b).size:
            return None
        kept = builder.kept_positions(out)
        target = _OUT_OF_PLACE.get(node.target, node.target)
        return builder.copy(node, (builder.at(a, kept), builder.at(b, kept)), {}, target=target)


def _scale_of(node: fx.Node, traced: Callable[[Any], bool]) -> tuple[fx.Node, fx.Node] | None:
    """(traced operand, scale) of a product whose other operand is an untraced tensor broadcast into the
    traced one without changing its shape (``x * gamma`` with ``gamma`` of shape ``(C, 1, 1)``, ``x * mask``)."""
    args = node.args[:2]
    for x, scale in (args, args[::-1]):
        if traced(x) and isinstance(scale, fx.Node) and not traced(scale) and tensor_shape(scale) is not None:
            return (x, scale) if tensor_shape(x) == tensor_shape(node) else None
    return None


def _compact_scale(builder, node: fx.Node) -> fx.Node | None:
    """``x * scale`` with ``scale`` broadcast per channel: the scale at the kept channels (its parameter
    sliced when this product is its only use), or as it is when it has one value for all channels."""
    found = _scale_of(node, lambda a: builder.tag(a) is not None)
    out = builder.tag(node)
    if found is None or out is None:
        return None
    x, scale = found
    shape = tensor_shape(scale)
    dim = out.dim - (out.ndim - len(shape))
    if dim < 0 or shape[dim] == 1 or _slice_attribute(builder, scale, dim, builder.kept[x]):
        return builder.copy(node)
    sliced = builder.gather(builder.env[scale], torch.arange(out.size), builder.kept[x], dim)
    return builder.copy(node, tuple(sliced if a is scale else builder.env[a] for a in node.args), {})


def _slice_attribute(builder, scale: fx.Node, dim: int, kept: torch.Tensor) -> bool:
    """Slice the parameter or buffer a ``get_attr`` node reads in the compact model, when nothing else
    reads it (no other node, no module called as a whole)."""
    if not sole_reader(scale):
        return False
    owner_name, _, attr = str(scale.target).rpartition(".")
    owner = builder.root.get_submodule(owner_name)
    value = getattr(owner, attr)
    sliced = value.detach().index_select(dim, kept.to(value.device)).clone()
    if isinstance(value, nn.Parameter):
        setattr(owner, attr, nn.Parameter(sliced, requires_grad=value.requires_grad))
    elif attr in owner._buffers:
        owner._buffers[attr] = sliced
    else:
        setattr(owner, attr, sliced)
    return True


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
