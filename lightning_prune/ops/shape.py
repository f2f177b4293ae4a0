"""Shape queries (``x.size()``, ``x.shape``, ``x.dim()``, ``x.numel()``): values without channels."""

from __future__ import annotations

from lightning_prune.ops.registry import OpRule, register_op_rule


@register_op_rule("size", "dim", "numel", getattr)
class ShapeQuery(OpRule):
    """No channels. The compact network answers with the full-width tensor's shape, as the original code
    expects it, unless the query cannot see the channel count (the size of another dimension, an
    attribute other than ``shape``)."""

    def propagate(self, walker, node):
        return None

    def compact(self, builder, node):
        tag = builder.tag(node.args[0])
        if tag is None:
            return None
        if node.target is getattr:
            sees_width = node.args[1] == "shape"
        elif node.target == "size":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            sees_width = not isinstance(dim, int) or dim % tag.ndim == tag.dim
        else:
            sees_width = True
        return None if sees_width else builder.copy(node)
