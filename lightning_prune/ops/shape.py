"""Shape queries (``x.size()``, ``x.shape``, ``x.dim()``, ``x.numel()``) and new tensors
(``x.new_empty(shape)``): values without channels."""

from __future__ import annotations

from lightning_prune.ops.registry import OpRule, register_op_rule


@register_op_rule("size", "dim", "numel", getattr)
class ShapeQuery(OpRule):
    """No channels. The compact network answers with the full-width tensor's shape, as the original code
    expects it, read from a full-width view of one kept channel (``narrow``, then ``expand``: nothing is
    copied), unless the query cannot see the channel count (the size of another dimension, an attribute
    other than ``shape``)."""

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
        if not sees_width:
            return builder.copy(node)
        x = node.args[0]
        if builder.kept[x].numel() in (0, tag.size):  # nothing to rebuild, or no channel to expand
            return None
        sizes = [-1] * tag.ndim
        sizes[tag.dim] = tag.size
        one = builder.graph.call_method("narrow", (builder.env[x], tag.dim, 0, 1))
        full = builder.graph.call_method("expand", (one, *sizes))
        return builder.copy(node, (full, *builder.map_args(node.args[1:])))


@register_op_rule("new_empty", "new_zeros", "new_ones", "new_full")
class NewTensor(OpRule):
    """A new tensor of the dtype and device of a traced one (DropPath's random mask): no channels, none
    of the traced tensor's values read."""

    takes_nonzero = True

    def propagate(self, walker, node):
        return None

    def compact(self, builder, node):
        return builder.copy(node)
