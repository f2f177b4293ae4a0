"""Layers with parameters per channel: Conv and Linear create channels, BatchNorm and depthwise Conv pass
them through. In the compact network their weights are sliced to the kept channels. Linear acts on the last
dimension of a tensor of any rank (channels-last blocks, transformers), a 1x1 convolution there.

A LayerNorm over the channels (the last dimension; ConvNeXt's ``LayerNorm2d``: dimension 1) becomes a
:class:`KeptLayerNorm`, whose statistics leave out the removed channels: its channels are prunable. GroupNorm,
and other LayerNorm subclasses with their own forward, keep the channels that flow through them (see
:class:`Normalization`); attention is in :mod:`.attention`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models.convnext import LayerNorm2d

from lightning_prune.dependency.channels import ZERO, ChannelTag
from lightning_prune.ops.registry import OpRule, register_op_rule


@register_op_rule(nn.modules.conv._ConvNd)
class Conv(OpRule):
    """``groups == 1``: fresh output channels; depthwise: the input's channels; other groups (ResNeXt, RegNet):
    fresh output channels, and channel i of every group tied to channel i of the others on both sides, so
    the compact convolution keeps its groups with fewer channels in each; one input channel per group
    with a channel multiplier blocks both sides."""

    def propagate(self, walker, node):
        conv = walker.modules[node.target]
        if conv.transposed:
            return walker.opaque(node)
        name, x = str(node.target), _input(walker, node)
        use = walker.use(name)
        if not isinstance(x, ChannelTag) or x.dim != 1:
            return walker.opaque(node, f"{type(conv).__name__} on an untracked input")
        use.in_nodes = x.nodes
        if conv.groups == 1:
            out = _create(walker, use, name, conv.out_channels)
        elif conv.groups == conv.in_channels == conv.out_channels:
            out = walker.nodes.constants_for_zero(x.nodes, f"are constants that depthwise {name} makes of zero padding")
        elif conv.in_channels > conv.groups:  # the same channels go in every group: shapes stay valid
            _tie_groups(walker, x.nodes, conv.groups)
            out = _create(walker, use, name, conv.out_channels)
            _tie_groups(walker, out, conv.groups)
        else:
            reason = f"flow into or out of grouped convolution {name} (one input channel per group)"
            walker.nodes.block(x.nodes, reason)
            out = walker.nodes.fresh(conv.out_channels, reason)
        use.out_nodes = out
        return ChannelTag(out, 1, x.ndim)

    def compact(self, builder, node):
        conv = builder.layer(node)
        if conv is None:
            return None
        x, out_kept = node.args[0], builder.kept_positions(builder.tag(node))
        if out_kept.numel() == 0:
            return _removed(builder, node, conv, channelwise=conv.groups > 1)
        if conv.transposed or builder.tag(x).dim != 1:
            return None
        if conv.groups == 1:
            if builder.kept[x].numel() == 0:
                return None
            _slice_dense(conv, builder.kept[x], out_kept)
            return builder.copy(node, (builder.env[x],), {})
        if conv.groups == conv.in_channels == conv.out_channels:
            _slice_depthwise(conv, out_kept)
            return builder.copy(node, (builder.at(x, out_kept),), {})
        in_group = _same_in_every_group(builder.kept[x], conv.in_channels, conv.groups)
        if in_group is None or _same_in_every_group(out_kept, conv.out_channels, conv.groups) is None:
            return None
        _slice_dense(conv, in_group, out_kept)  # a grouped weight's columns are the positions inside a group
        conv.in_channels = in_group.numel() * conv.groups
        return builder.copy(node, (builder.env[x],), {})


@register_op_rule(nn.Linear)
class Linear(OpRule):
    """Fresh output features, from the features of the input's last dimension."""

    def propagate(self, walker, node):
        name, x = str(node.target), _input(walker, node)
        use = walker.use(name)
        if not isinstance(x, ChannelTag):
            return walker.opaque(node, f"Linear {name} on an untracked input")
        if x.dim != x.ndim - 1:  # e.g. (batch, tokens, features) taken for channels on dimension 1: kept
            walker.nodes.block(x.nodes, f"flow into Linear {name}, which mixes another dimension")
        else:
            use.in_nodes = x.nodes
        out = _create(walker, use, name, walker.modules[name].out_features)
        use.out_nodes = out
        return ChannelTag(out, x.ndim - 1, x.ndim)

    def compact(self, builder, node):
        linear = builder.layer(node)
        if linear is None:
            return None
        x, out_kept = node.args[0], builder.kept_positions(builder.tag(node))
        if out_kept.numel() == 0:
            return _removed(builder, node, linear, channelwise=False)
        x_tag = builder.tag(x)
        inputs = builder.kept[x] if x_tag.dim == x_tag.ndim - 1 else torch.arange(linear.in_features)
        _slice_dense(linear, inputs, out_kept)
        return builder.copy(node, (builder.env[x],), {})


@register_op_rule(nn.modules.batchnorm._BatchNorm)
class BatchNorm(OpRule):
    """Channel-wise: the input's channels, each with its own statistics and affine parameters."""

    def propagate(self, walker, node):
        name, x = str(node.target), _input(walker, node)
        use = walker.use(name)
        if not isinstance(x, ChannelTag) or x.dim != 1:
            return walker.opaque(node, f"BatchNorm {name} on an untracked input")
        out = walker.nodes.constants_for_zero(x.nodes, f"are constants that BatchNorm {name} makes of zero padding")
        use.in_nodes = use.out_nodes = out
        return ChannelTag(out, 1, x.ndim)

    def compact(self, builder, node):
        bn = builder.layer(node)
        if bn is None:
            return None
        x, out_kept = node.args[0], builder.kept_positions(builder.tag(node))
        if out_kept.numel() == 0:
            return _removed(builder, node, bn, channelwise=True)
        if builder.tag(x).dim != 1:
            return None
        _slice_batchnorm(bn, out_kept)
        return builder.copy(node, (builder.at(x, out_kept),), {})


class KeptLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension whose mean and variance cover only the channels ``kept`` marks
    (a bool per channel, a non-persistent buffer; None: all of them, exactly ``nn.LayerNorm``). Any other channel
    outputs ``0 * weight + bias``, which the masks zero: the masked network computes what the compact one, a
    LayerNorm over the kept channels only, does."""

    prepared_from = nn.LayerNorm
    channel_dim = -1
    kept: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        idx = torch.nonzero(self.kept).flatten().to(x.device)
        weight = self.weight[idx] if self.weight is not None else None
        bias = self.bias[idx] if self.bias is not None else None
        y = F.layer_norm(x.index_select(-1, idx), (idx.numel(),), weight, bias, self.eps)
        base = torch.zeros_like(y[..., :1]).expand(x.shape) if self.bias is None else self.bias.expand(x.shape)
        return base.to(y.dtype).index_copy(-1, idx, y)


class KeptLayerNorm2d(KeptLayerNorm):
    """ConvNeXt's ``LayerNorm2d`` (torchvision's and timm's: a LayerNorm over dimension 1 of ``(B, C, H, W)``)
    as a :class:`KeptLayerNorm`."""

    prepared_from = LayerNorm2d  # both are named LayerNorm2d: the architecture fingerprint reads the name
    channel_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


_TIMM_LAYER_NORM = "timm.layers.norm.LayerNorm"  # F.layer_norm, unless timm's fast norm is on
_LAYER_NORM_2D = ("torchvision.models.convnext.LayerNorm2d", "timm.layers.norm.LayerNorm2d")


@register_op_rule(
    nn.LayerNorm, nn.GroupNorm, F.layer_norm, F.group_norm, _TIMM_LAYER_NORM, KeptLayerNorm, *_LAYER_NORM_2D
)
class Normalization(OpRule):
    """LayerNorm or GroupNorm over the channels: every output channel depends on the statistics of all of
    them, so a removed (zeroed) channel is not the same as a channel cut out. A :class:`KeptLayerNorm` (what
    :meth:`prepare` makes of ``nn.LayerNorm`` and timm's ``LayerNorm`` over one dimension) leaves the removed
    channels out of its statistics: channel-wise, like BatchNorm. Any other one keeps its channels, which go
    through as they are; a LayerNorm over other dimensions is opaque."""

    def prepare(self, module):
        path = f"{type(module).__module__}.{type(module).__qualname__}"
        fast = getattr(module, "_fast_norm", False)
        plain = type(module) is nn.LayerNorm or (path == _TIMM_LAYER_NORM and not fast)
        kept = KeptLayerNorm if plain else KeptLayerNorm2d if path in _LAYER_NORM_2D and not fast else None
        if kept is not None and len(module.normalized_shape) == 1:
            module.__class__ = kept
            module.register_buffer("kept", None, persistent=False)

    def propagate(self, walker, node):
        x = _input(walker, node)
        module = walker.modules[node.target] if node.op == "call_module" else None
        plain_call = len(node.args) == 1 and not node.kwargs
        if (isinstance(module, KeptLayerNorm) and isinstance(x, ChannelTag) and plain_call
                and x.dim == module.channel_dim % x.ndim and not (x.nodes == ZERO).any()):  # fmt: skip
            use = walker.use(str(node.target))
            use.in_nodes = use.out_nodes = x.nodes
            return x
        kind = _normalizes_channels(walker, node, x) if isinstance(x, ChannelTag) else None
        if kind is None:
            return walker.opaque(node)
        reason = f"flow into {kind} {walker.where(node)}"
        walker.nodes.block(x.nodes, reason)
        return x.moved(walker.nodes.constants_for_zero(x.nodes, reason))

    def compact(self, builder, node):
        ln = builder.layer(node) if node.op == "call_module" else None
        x = node.args[0]
        if not isinstance(ln, KeptLayerNorm) or builder.tag(node) is not builder.tag(x):  # not channel-wise
            return None
        kept = builder.kept_positions(builder.tag(node))
        if kept.numel() == 0:
            return _removed(builder, node, ln, channelwise=True)
        _slice_layernorm(ln, kept)
        return builder.copy(node, (builder.at(x, kept),), {})


def _normalizes_channels(walker, node: fx.Node, x: ChannelTag) -> str | None:
    """``"LayerNorm"`` or ``"GroupNorm"`` when the statistics of ``node`` mix the channels of ``x``, else None."""
    module = walker.modules[node.target] if node.op == "call_module" else None
    if isinstance(module, nn.GroupNorm) or node.target is F.group_norm:
        return "GroupNorm" if x.dim == 1 else None
    if module is not None:
        shape = module.normalized_shape
    else:
        shape = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else None)
    shape = (shape,) if isinstance(shape, int) else shape
    return "LayerNorm" if isinstance(shape, (tuple, list)) and x.dim >= x.ndim - len(shape) else None


def _tie_groups(walker, nodes: torch.Tensor, groups: int) -> None:
    """Tie channel i of every group of ``nodes`` to channel i of the first group."""
    per_group = nodes.reshape(groups, -1)
    for g in range(1, groups):
        walker.nodes.union(per_group[0], per_group[g])


def _same_in_every_group(kept: torch.Tensor, channels: int, groups: int) -> torch.Tensor | None:
    """The positions within a group that ``kept`` keeps, when it keeps the same ones in every group."""
    size = channels // groups
    if kept.numel() == 0 or kept.numel() % groups:
        return None
    per_group = kept.reshape(groups, -1)
    within = per_group[0]
    offsets = torch.arange(groups).unsqueeze(1) * size
    return within if torch.equal(per_group, within.unsqueeze(0) + offsets) else None


def _input(walker, node: fx.Node) -> Any:
    return walker.value(node.args[0]) if node.args else None


def _create(walker, use, name: str, n: int) -> torch.Tensor:
    """``n`` fresh output channels of layer ``name``, recorded as created by it."""
    out = walker.nodes.fresh(n)
    use.creates = True
    for ch, node in enumerate(out.tolist()):
        walker.result.creator[node] = (name, ch)
    return out


def _removed(builder, node: fx.Node, layer: nn.Module, channelwise: bool) -> fx.Node:
    """Every output channel removed (DenseNet layers can lose all of theirs): a zero-width tensor."""
    x, dim = node.args[0], builder.tag(node).dim
    if channelwise or builder.kept[x].numel() == 0:  # same shape as the input
        return builder.graph.call_method("narrow", (builder.env[x], dim, 0, 0))
    # run a one-channel stand-in only for the output's shape (stride, padding, dilation)
    _slice_dense(layer, builder.kept[x], torch.zeros(1, dtype=torch.long))
    return builder.graph.call_method("narrow", (builder.copy(node, (builder.env[x],), {}), dim, 0, 0))


# The layers below belong to the builder's own deep copy of the model: they are sliced in place.


def _param(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _slice_dense(layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
    """Keep rows ``outputs`` and columns ``inputs`` of a Conv or Linear weight, and its bias (a grouped Conv's
    columns are the positions inside a group: its ``in_channels`` is then ``groups`` times ``inputs``)."""
    dev = layer.weight.device
    layer.weight = _param(layer.weight[outputs.to(dev)][:, inputs.to(dev)], layer.weight)
    if layer.bias is not None:
        layer.bias = _param(layer.bias[outputs.to(dev)], layer.bias)
    if isinstance(layer, nn.Linear):
        layer.in_features, layer.out_features = inputs.numel(), outputs.numel()
    else:
        layer.in_channels, layer.out_channels = inputs.numel(), outputs.numel()


def _slice_depthwise(conv: nn.modules.conv._ConvNd, channels: torch.Tensor) -> None:
    idx = channels.to(conv.weight.device)
    conv.weight = _param(conv.weight[idx], conv.weight)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[idx], conv.bias)
    conv.in_channels = conv.out_channels = conv.groups = channels.numel()


def _slice_batchnorm(bn: nn.modules.batchnorm._BatchNorm, channels: torch.Tensor) -> None:
    for attr in ("weight", "bias"):
        value = getattr(bn, attr)
        if isinstance(value, nn.Parameter):
            setattr(bn, attr, _param(value[channels.to(value.device)], value))
    for attr in ("running_mean", "running_var"):
        value = getattr(bn, attr)
        if isinstance(value, torch.Tensor):
            setattr(bn, attr, value[channels.to(value.device)].clone())
    bn.num_features = channels.numel()


def _slice_layernorm(ln: KeptLayerNorm, channels: torch.Tensor) -> None:
    for attr in ("weight", "bias"):
        value = getattr(ln, attr)
        if isinstance(value, nn.Parameter):
            setattr(ln, attr, _param(value[channels.to(value.device)], value))
    ln.normalized_shape = (channels.numel(),)
    ln.kept = None
