"""``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` traced through.

torch.fx keeps every ``torch.nn`` module as one op, and these two could not be traced anyway: their forward
chooses a fused fast path on the values of its inputs. Before tracing, each module of exactly torch's class
becomes a subclass computing torch's own general path (the one taken in training): the same module, state
dict and results (the fast path aside), whose attention (:mod:`.multihead_attention`: heads) and
feed-forward layers (hidden neurons) the analysis then sees."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.ops.registry import OpRule, register_op_rule


class TracedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without its fast path: self-attention and feed-forward blocks, each
    with its residual connection, normalised before (``norm_first``) or after."""

    prepared_from = nn.TransformerEncoderLayer

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class TracedTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without its fast path (no nested tensors): its layers in turn, then its norm."""

    prepared_from = nn.TransformerEncoder

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        out = src
        for layer in self.layers:  # a causal mask given without is_causal is applied as the mask it is
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return out if self.norm is None else self.norm(out)


_TRACED = {nn.TransformerEncoderLayer: TracedTransformerEncoderLayer, nn.TransformerEncoder: TracedTransformerEncoder}


@register_op_rule(nn.TransformerEncoderLayer, nn.TransformerEncoder)
class TorchTransformer(OpRule):
    """Prepares torch's encoder layers to be traced through; a subclass of yours with its own forward stays
    one op whose channels are kept."""

    def prepare(self, module):
        traced = _TRACED.get(type(module))
        if traced is not None:
            module.__class__ = traced

    def propagate(self, walker, node):
        what = type(walker.modules[str(node.target)]).__name__
        return walker.kept_around(node, f"flow into or out of {what} {node.target} (a forward of its own)")
