"""Ops that reorder dimensions (``permute``, ``transpose``): the channels move to another dimension,
channels-last blocks (``x.permute(0, 2, 3, 1)`` before a LayerNorm and Linear layers, ``flatten(2).transpose(1, 2)``
before a transformer). The compact network runs them as they are. A channel shuffle (ShuffleNet: ``view`` splitting
the channels in two dimensions, ``transpose`` of those, ``view`` merging them back) permutes the channels; the
compact network gathers its kept channels in their shuffled order instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from lightning_prune.dependency.channels import ChannelTag
from lightning_prune.ops.registry import OpRule, register_op_rule, tensor_shape

_SWAPS = (torch.transpose, "transpose", torch.swapaxes, "swapaxes")


@register_op_rule(torch.permute, "permute", *_SWAPS)
class Permute(OpRule):
    """Output dimension ``i`` is input dimension ``order[i]``: the channels go where their dimension goes."""

    takes_nonzero = True  # moves values only

    def propagate(self, walker, node):
        if (shuffle := channel_shuffle(node, walker.value)) is not None:
            return shuffle.propagate(walker, node)
        x = walker.value(node.args[0]) if node.args else None
        order = _order(node, x.ndim) if isinstance(x, ChannelTag) else None
        if order is None:
            return walker.opaque(node)
        return x.moved(dim=order.index(x.dim))

    def compact(self, builder, node):
        shuffle = channel_shuffle(node, builder.tag)
        return shuffle.compact(builder, node) if shuffle is not None else None


@dataclass(frozen=True)
class ChannelShuffle:
    """``view`` splitting dimension ``dim`` of ``source`` in two, ``transpose`` of the two, ``contiguous()``
    (optional) and ``view``/``reshape`` back to the shape of ``source`` (the ``steps``, each the only user of
    the one before): output channel ``i`` is channel ``order[i]`` of ``source``."""

    source: fx.Node
    steps: tuple[fx.Node, ...]
    dim: int
    order: torch.Tensor

    def propagate(self, walker, node):
        """The values between the steps carry no channels; the last step's are the source's, permuted."""
        if node is not self.steps[-1]:
            return None
        tag = walker.value(self.source)
        return tag.moved(tag.nodes[self.order])

    def compact(self, builder, node):
        """The first step gathers the output's kept channels in their shuffled order; the others pass it on."""
        if node is not self.steps[0]:
            return builder.env[node.args[0]]
        kept = builder.kept_positions(builder.tag(self.steps[-1]))
        return builder.gather(builder.env[self.source], builder.kept[self.source], self.order[kept], self.dim)


def channel_shuffle(node: fx.Node, tag_of: Callable[[fx.Node], Any]) -> ChannelShuffle | None:
    """The channel shuffle ``node`` is a step of, when it permutes channels: those of its source, whose tag
    ``tag_of`` gives, lie on the dimension it splits. Else None."""
    first = node
    for _ in range(4):  # the first step is at most three inputs back
        shuffle = _shuffle_from(first)
        if shuffle is not None:
            tag = tag_of(shuffle.source)
            tracked = isinstance(tag, ChannelTag) and tag.dim == shuffle.dim
            return shuffle if node in shuffle.steps and tracked else None
        if not first.args or not isinstance(first.args[0], fx.Node):
            return None
        first = first.args[0]
    return None


def _shuffle_from(split: fx.Node) -> ChannelShuffle | None:
    """The channel shuffle starting at ``split``, or None."""
    if not _is_reshape(split) or not isinstance(split.args[0], fx.Node):
        return None
    transpose = _only_user(split)
    if transpose is None or transpose.target not in _SWAPS or transpose.args[0] is not split:
        return None
    steps, merge = (split, transpose), _only_user(transpose)
    if merge is not None and merge.op == "call_method" and merge.target == "contiguous":
        steps, merge = (*steps, merge), _only_user(merge)
    source, parts = split.args[0], tensor_shape(split)
    shape = tensor_shape(source)
    if merge is None or not _is_reshape(merge) or shape is None or parts is None or len(parts) != len(shape) + 1:
        return None
    order = _order(transpose, len(parts))
    swapped = [d for d, o in enumerate(order or ()) if d != o]
    if len(swapped) != 2 or swapped[1] != swapped[0] + 1 or tensor_shape(merge) != shape:
        return None
    dim = swapped[0]
    if parts[:dim] != shape[:dim] or parts[dim + 2 :] != shape[dim + 1 :] or parts[dim] * parts[dim + 1] != shape[dim]:
        return None
    order = torch.arange(shape[dim]).view(parts[dim], parts[dim + 1]).t().reshape(-1)
    return ChannelShuffle(source, (*steps, merge), dim, order)


def _is_reshape(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("view", "reshape") and bool(node.args)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _order(node, ndim: int) -> list[int] | None:
    """The input dimension of each output dimension, negative dimensions normalised; None when unknown."""
    args, kwargs = node.args[1:], node.kwargs
    if node.target in (torch.permute, "permute"):
        dims = kwargs.get("dims", args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args)
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return None
        return [d % ndim for d in dims]
    pair = (kwargs.get("dim0", args[0] if args else None), kwargs.get("dim1", args[1] if len(args) > 1 else None))
    if not all(isinstance(d, int) for d in pair):
        return None
    order = list(range(ndim))
    a, b = (d % ndim for d in pair)
    order[a], order[b] = order[b], order[a]
    return order
