"""Ops that move channels around: flatten, reshape, expand, unsqueeze, reductions, concatenation, zero
padding, slicing, splitting (``chunk``, ``split``, ``tensor_split``). Those that only move values (flatten,
reshape, expand, unsqueeze, splitting) keep a ``nonzero`` tag (a sigmoid gate reshaped to ``(B, C, 1, 1)``
before its product)."""

from __future__ import annotations

import itertools
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.dependency.channels import ZERO, ChannelTag
from lightning_prune.ops.layout import channel_shuffle
from lightning_prune.ops.registry import OpRule, register_op_rule, tensor_shape


@register_op_rule(nn.Flatten, torch.flatten, "flatten")
class Flatten(OpRule):
    """Flattening the channels with the dimensions after them repeats each channel's node over its positions."""

    takes_nonzero = True

    def propagate(self, walker, node):
        x = walker.value(node.args[0]) if node.args else None
        if node.op == "call_module":
            module = walker.modules[node.target]
            start, end = module.start_dim, module.end_dim
        else:
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        if not isinstance(x, ChannelTag):
            return walker.opaque(node, "flatten")
        start, end = int(start) % x.ndim, int(end) % x.ndim
        ndim = x.ndim - (end - start)
        if x.dim < start:
            return x.moved(ndim=ndim)
        if x.dim > end:
            return x.moved(dim=x.dim - (end - start), ndim=ndim)
        if x.dim == start:
            in_shape = tensor_shape(node.args[0])
            inner = math.prod(in_shape[start + 1 : end + 1]) if in_shape is not None else 1
            return x.moved(x.nodes.repeat_interleave(inner), start, ndim)
        return walker.opaque(node, "flatten across the channel dimension")


@register_op_rule("view", "reshape")
class Reshape(OpRule):
    """A reshape that keeps the batch dimension and the channels, whole or flattened with every dimension after
    them (``(B, C, H, W) -> (B, C, H * W)``, ``(B, H, W, C) -> (B, H * W, C)``, ``(B, C, H, W) -> (B, C * H * W)``);
    in the compact network the size of the channel dimension is rewritten."""

    takes_nonzero = True

    def propagate(self, walker, node):
        if (shuffle := channel_shuffle(node, walker.value)) is not None:
            return shuffle.propagate(walker, node)
        x = walker.value(node.args[0])
        moved = _reshaped(x, tensor_shape(node.args[0]), tensor_shape(node)) if isinstance(x, ChannelTag) else None
        if moved is None:
            return walker.opaque(node, f".{node.target}() across the channel or batch dimension")
        dim, inner, ndim = moved
        return x.moved(x.nodes.repeat_interleave(inner) if inner > 1 else None, dim, ndim)

    def compact(self, builder, node):
        if (shuffle := channel_shuffle(node, builder.tag)) is not None:
            return shuffle.compact(builder, node)
        x = node.args[0]
        out, x_tag = builder.tag(node), builder.tag(x)
        if out is None or x_tag is None or _reshaped(x_tag, tensor_shape(x), tensor_shape(node)) is None:
            return None
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        sizes = list(builder.map_args(tuple(sizes)))
        if len(sizes) != out.ndim:
            return None
        if not (isinstance(sizes[out.dim], int) and sizes[out.dim] == -1):
            if any(isinstance(s, int) and s == -1 for s in sizes):
                return None
            sizes[out.dim] = builder.kept[x].numel() * (out.size // x_tag.size)
        return builder.copy(node, (builder.env[x], *sizes), {})


def _reshaped(x: ChannelTag, in_shape, out_shape) -> tuple[int, int, int] | None:
    """Where a reshape from ``in_shape`` to ``out_shape`` puts the channels of ``x``: (dimension, positions
    per channel, rank), or None when it splits them, merges them with a dimension before them, or moves the
    batch dimension."""
    if in_shape is None or out_shape is None or len(out_shape) < 2 or out_shape[0] != in_shape[0] or x.dim < 1:
        return None
    before = math.prod(in_shape[: x.dim])
    for dim in range(1, len(out_shape)):
        if math.prod(out_shape[:dim]) != before:
            continue
        if out_shape[dim] == in_shape[x.dim]:
            return dim, 1, len(out_shape)
        if dim == len(out_shape) - 1 and out_shape[dim] == math.prod(in_shape[x.dim :]):
            return dim, math.prod(in_shape[x.dim + 1 :]), len(out_shape)
    return None


@register_op_rule("expand", "expand_as")
class Expand(OpRule):
    """Broadcasting to a larger shape (``scale.expand_as(x)``): the channels move to the same dimension
    counted from the right; the compact network expands to its own channel count."""

    takes_nonzero = True

    def propagate(self, walker, node):
        x, out_shape = walker.value(node.args[0]), tensor_shape(node)
        if not isinstance(x, ChannelTag) or out_shape is None:
            return walker.opaque(node, f".{node.target}()")
        dim = x.dim + len(out_shape) - x.ndim
        if out_shape[dim] != x.size:
            return walker.opaque(node, f".{node.target}() of the channel dimension")
        return x.moved(dim=dim, ndim=len(out_shape))

    def compact(self, builder, node):
        out, x = builder.tag(node), node.args[0]
        if out is None or builder.tag(x) is None or node.kwargs:
            return None
        if node.target == "expand_as":
            other = builder.tag(node.args[1])
            if other is None or other.dim != out.dim or other.size != out.size:
                return None
            return builder.copy(node, (builder.env[x], builder.at(node.args[1], builder.kept[x])), {})
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        sizes = list(builder.map_args(tuple(sizes)))
        sizes[out.dim] = -1  # keep the compact channel count
        return builder.copy(node, (builder.env[x], *sizes), {})


@register_op_rule(torch.unsqueeze, "unsqueeze")
class Unsqueeze(OpRule):
    """A new dimension of size 1: the channels move one dimension right when it is inserted before them."""

    takes_nonzero = True

    def propagate(self, walker, node):
        x = walker.value(node.args[0])
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if not isinstance(x, ChannelTag) or not isinstance(dim, int):
            return walker.opaque(node, "unsqueeze")
        dim %= x.ndim + 1
        return x.moved(dim=x.dim + (dim <= x.dim), ndim=x.ndim + 1)


@register_op_rule(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax")
class Reduce(OpRule):
    """A reduction over positions keeps the channels; over the channels or the batch it blocks them."""

    def propagate(self, walker, node):
        x = walker.value(node.args[0])
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        if not isinstance(x, ChannelTag) or dims is None:
            return walker.opaque(node, f"reduction {node.target}")
        dims = [d % x.ndim for d in ((dims,) if isinstance(dims, int) else dims)]
        if x.dim in dims or 0 in dims:
            return walker.opaque(node, f"reduction {node.target} over the channel or batch dimension")
        if keepdim:
            return ChannelTag(x.nodes, x.dim, x.ndim)
        return ChannelTag(x.nodes, x.dim - sum(d < x.dim for d in dims), x.ndim - len(dims))  # (B, N, C) -> (B, C)


@register_op_rule(torch.cat, torch.concat)
class Cat(OpRule):
    """Along the channels: the parts' channels one after the other (DenseNet); along another dimension: the
    parts' channels are tied one by one, a parameter's too (a class token before the tokens)."""

    def propagate(self, walker, node):
        parts = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        values = [walker.value(p) for p in parts]
        like = next((v for v in values if isinstance(v, ChannelTag)), None)
        if like is not None and isinstance(dim, int) and dim % like.ndim != like.dim:
            values = [walker.parameter_channels(p, like) if v is None else v for p, v in zip(parts, values)]
        if not values or not all(isinstance(v, ChannelTag) for v in values):
            return walker.opaque(node, "concatenation with an untracked tensor")
        ndim = values[0].ndim
        if dim % ndim == values[0].dim and all(v.dim == values[0].dim for v in values):
            return ChannelTag(torch.cat([v.nodes for v in values]), values[0].dim, ndim)
        for other in values[1:]:
            if other.size != values[0].size:
                return walker.opaque(node, "concatenation of mismatched channels")
            walker.nodes.union(values[0].nodes, other.nodes)
        return values[0]

    def compact(self, builder, node):
        out = builder.tag(node)
        parts = node.args[0]
        if out is None or not isinstance(parts, (list, tuple)) or not all(builder.tag(p) is not None for p in parts):
            return None
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        kept = builder.kept_positions(out)
        if dim % out.ndim == out.dim and sum(builder.tag(p).size for p in parts) == out.size:
            offsets, joined = 0, []
            for p in parts:
                joined.append(builder.kept[p] + offsets)
                offsets += builder.tag(p).size
            return builder.copy(node) if torch.equal(torch.cat(joined), kept) else None
        return builder.copy(node, (type(parts)(builder.at(p, kept) for p in parts), *builder.map_args(node.args[1:])))


@register_op_rule(F.pad)
class Pad(OpRule):
    """Zero padding of the channels adds structurally-zero channels (option-A shortcuts); in the compact
    network it becomes a gather of the kept channels."""

    def propagate(self, walker, node):
        x = walker.value(node.args[0])
        pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if not isinstance(x, ChannelTag) or not isinstance(pad, (tuple, list)):
            return walker.opaque(node, "pad")
        if mode == "constant" and value not in (None, 0, 0.0):
            return walker.opaque(node, "pad with a non-zero value")
        pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
        channel_pair = x.ndim - 1 - x.dim
        if channel_pair >= len(pairs):
            return x
        if mode != "constant" or any(not isinstance(p, int) for p in pairs[channel_pair]):
            return walker.opaque(node, "non-constant pad of the channel dimension")
        left, right = pairs[channel_pair]
        kept = x.nodes[max(-left, 0) : x.size - max(-right, 0)]
        before = torch.full((max(left, 0),), ZERO, dtype=torch.long)
        after = torch.full((max(right, 0),), ZERO, dtype=torch.long)
        return ChannelTag(torch.cat([before, kept, after]), x.dim, x.ndim)

    def compact(self, builder, node):
        out, x = builder.tag(node), node.args[0]
        x_tag = builder.tag(x)
        pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
        if out is None or x_tag is None or not isinstance(pad, (list, tuple)) or out is x_tag:
            return None
        pairs = [list(pad[i : i + 2]) for i in range(0, len(pad), 2)]
        channel = x_tag.ndim - 1 - x_tag.dim
        if channel >= len(pairs) or not all(isinstance(p, int) for p in pairs[channel]):
            return None
        left = pairs[channel][0]
        mapped = list(builder.map_args(tuple(pad)))  # the other dimensions' pads may be computed (traced)
        pairs = [mapped[i : i + 2] for i in range(0, len(mapped), 2)]
        pairs[channel] = [0, 0]
        flat = [p for pair in pairs for p in pair]
        value = builder.env[x]
        if any(flat):
            args = list(builder.map_args(node.args))
            kwargs = dict(builder.map_args(node.kwargs))
            if "pad" in kwargs:
                kwargs["pad"] = type(pad)(flat)
            else:
                args[1] = type(pad)(flat)
            value = builder.copy(node, tuple(args), kwargs)
        return builder.gather(value, builder.kept[x], builder.kept_positions(out) - left, x_tag.dim)


@register_op_rule(operator.getitem)
class GetItem(OpRule):
    """An item of a tuple, or basic indexing: a slice of the channels keeps those channels, an integer index of
    another dimension drops it (``x[:, 0]``, the class token)."""

    def propagate(self, walker, node):
        container, index = walker.value(node.args[0]), node.args[1]
        if isinstance(container, (tuple, list)) and isinstance(index, int):
            return container[index]
        if not isinstance(container, ChannelTag):
            return None if container is None and tensor_shape(node) is None else walker.opaque(node, "indexing")
        x = container
        idx = index if isinstance(index, tuple) else (index,)
        basic = (int, slice, type(Ellipsis), type(None))
        if any(isinstance(i, (fx.Node, bool)) or not isinstance(i, basic) for i in idx):
            return walker.opaque(node, "advanced indexing")
        if any(i is None for i in idx):
            return walker.opaque(node, "indexing that adds dimensions")
        idx = _expand_ellipsis(idx, x.ndim)
        if len(idx) > x.dim and isinstance(idx[x.dim], int):
            return walker.opaque(node, "indexing of one channel")
        if any(isinstance(v, fx.Node) for s in idx if isinstance(s, slice) for v in (s.start, s.stop, s.step)):
            return walker.opaque(node, "slicing with traced bounds")
        before, dropped = _dropped(idx, x.dim)
        nodes = x.nodes[idx[x.dim]] if len(idx) > x.dim else x.nodes
        return x.moved(nodes, x.dim - before, x.ndim - dropped)

    def compact(self, builder, node):
        """A gather of the kept channels, after the slicing of the other dimensions."""
        x, index = node.args
        out, x_tag = builder.tag(node), builder.tag(x)
        if out is None or x_tag is None or out is x_tag:
            return None
        idx = _expand_ellipsis(index if isinstance(index, tuple) else (index,), x_tag.ndim)
        if len(idx) <= x_tag.dim or not isinstance(idx[x_tag.dim], slice):
            return None
        positions = torch.arange(x_tag.size)[idx[x_tag.dim]]
        rest = idx[: x_tag.dim] + (slice(None),) + idx[x_tag.dim + 1 :]
        value = builder.env[x]
        if any(s != slice(None) for s in rest):
            value = builder.copy(node, (value, builder.map_args(rest)), {})  # traced bounds: their compact nodes
        return builder.gather(value, builder.kept[x], positions[builder.kept_positions(out)], out.dim)


@register_op_rule(torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split")
class Split(OpRule):
    """Parts along the channels (``x1, x2 = x.chunk(2, dim=1)``) hold their slices of the channels; along another
    dimension, all of them. Only when the parts are used as items of the tuple. In the compact network the kept
    channels are split at each part's own count of them."""

    takes_nonzero = True  # moves values only

    def propagate(self, walker, node):
        x, dim = walker.value(node.args[0]), _split_dim(node)
        sizes = _part_sizes(node, dim % x.ndim) if isinstance(x, ChannelTag) and isinstance(dim, int) else None
        if sizes is None or not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users):
            return walker.opaque(node)
        if dim % x.ndim != x.dim:
            return tuple(x for _ in sizes)
        starts = itertools.accumulate(sizes, initial=0)
        return tuple(x.moved(x.nodes[start : start + size]) for start, size in zip(starts, sizes))

    def compact(self, builder, node):
        x, parts = node.args[0], builder.tags.get(node)
        x_tag = builder.tag(x)
        if x_tag is None or not isinstance(parts, tuple):
            return None
        dim = _split_dim(node) % x_tag.ndim
        if dim != x_tag.dim:
            return builder.copy(node, (builder.at(x, builder.kept_positions(x_tag)), *builder.map_args(node.args[1:])))
        kept = [builder.kept_positions(part) for part in parts]
        starts = itertools.accumulate((part.size for part in parts), initial=0)
        value = builder.at(x, torch.cat([positions + start for positions, start in zip(kept, starts)]))
        return builder.graph.call_function(torch.split, (value, [k.numel() for k in kept]), {"dim": dim})


def _split_dim(node: fx.Node):
    return node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)


def _part_sizes(node: fx.Node, dim: int) -> list[int] | None:
    """The size of each part on dimension ``dim`` (from the example forward), or None."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, (tuple, list)) or not all(hasattr(m, "shape") and len(m.shape) > dim for m in meta):
        return None
    return [int(m.shape[dim]) for m in meta]


def _dropped(idx: tuple, dim: int) -> tuple[int, int]:
    """How many dimensions an index drops (integers) before dimension ``dim``, and in all."""
    ints = [isinstance(i, int) for i in idx]
    return sum(ints[:dim]), sum(ints)


def _expand_ellipsis(idx: tuple, ndim: int) -> tuple:
    if Ellipsis not in idx:
        return idx
    at = idx.index(Ellipsis)
    return idx[:at] + (slice(None),) * (ndim - len(idx) + 1) + idx[at + 1 :]
