"""Ops that reorder dimensions (``permute``, ``transpose``): the channels move to another dimension,
channels-last blocks (``x.permute(0, 2, 3, 1)`` before a LayerNorm and Linear layers, ``flatten(2).transpose(1, 2)``
before a transformer). The compact network runs them as they are."""

from __future__ import annotations

import torch

from lightning_prune.dependency.channels import ChannelTag
from lightning_prune.ops.registry import OpRule, register_op_rule


@register_op_rule(torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes")
class Permute(OpRule):
    """Output dimension ``i`` is input dimension ``order[i]``: the channels go where their dimension goes."""

    takes_nonzero = True  # moves values only

    def propagate(self, walker, node):
        x = walker.value(node.args[0]) if node.args else None
        order = _order(node, x.ndim) if isinstance(x, ChannelTag) else None
        if order is None:
            return walker.opaque(node)
        return x.moved(dim=order.index(x.dim))


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
