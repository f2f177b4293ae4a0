"""Shape queries (``x.size()``, ``x.shape``, ``x.dim()``, ``x.numel()``) and new tensors
(``x.new_empty(shape)``): values without channels."""

from __future__ import annotations

from lightning_prune.ops.registry import OpRule, register_op_rule


@register_op_rule("size", "dim", "numel", getattr)
class ShapeQuery(OpRule):
    """No channels. The compact network answers with the full-width tensor's shape, as the original code
    expects it, unless the query cannot see the channel count (the size of another dimension, an
    attribute other than ``shape``)."""

    takes_nonzero = True  # reads no values

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


@register_op_rule("new_empty", "new_zeros", "new_ones", "new_full")
class NewTensor(OpRule):
    """A new tensor of the dtype and device of a traced one (DropPath's random mask): no channels, none
    of the traced tensor's values read."""

    takes_nonzero = True

    def propagate(self, walker, node):
        return None

    def compact(self, builder, node):
        return builder.copy(node)
