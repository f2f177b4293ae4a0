"""Op rules: everything the library knows about one op, taught once.

An :class:`OpRule` holds both halves of an op's knowledge: ``propagate`` says how channels flow through
it in the dependency analysis (:mod:`lightning_prune.dependency.propagation`), ``compact`` how to rewrite
it in the compact network (:mod:`lightning_prune.compaction.compact`). Rules are found by module type,
function or tensor method name; :func:`register_op_rule` adds one for your own modules or functions.
Built-in families: :mod:`.layers` (Conv, Linear, BatchNorm, LayerNorm, GroupNorm), :mod:`.attention` (heads),
:mod:`.torchvision_swin` (torchvision's Swin heads), :mod:`.multihead_attention` (``nn.MultiheadAttention``'s
heads), :mod:`.torch_transformer` (``nn.TransformerEncoder`` traced through), :mod:`.elementwise`
(activations, pooling, additions, products), :mod:`.reindexing` (flatten, reshape, reductions,
concatenation, padding, slicing, channel split), :mod:`.layout` (permute, transpose, channel shuffle) and
:mod:`.shape` (shape queries). An op without a rule blocks the channels flowing into it.
"""

from lightning_prune.ops.registry import OpRule, find_op_rule, register_op_rule
from lightning_prune.ops import attention, elementwise, layers, layout, reindexing, shape  # noqa: E402, F401
from lightning_prune.ops import multihead_attention, torch_transformer, torchvision_swin  # noqa: E402, F401

__all__ = ["OpRule", "find_op_rule", "register_op_rule"]
