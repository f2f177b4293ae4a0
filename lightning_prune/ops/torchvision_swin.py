"""torchvision's Swin and Swin V2 window attention with prunable heads.

torchvision's ``ShiftedWindowAttention`` hands its weights to a function that derives the head size from
the embedding width and never calls its ``qkv`` and ``proj`` layers, so no gate can see a head and no head
can go. Before tracing, each such module (of exactly torchvision's class, not a subclass of yours) becomes
a :class:`HeadsWindowAttention`: the same module, the same parameters and state dict, the same output,
computed by :func:`window_attention`, which calls ``qkv`` and ``proj`` and is told the head size. Its heads
are then neurons like timm's (:class:`~lightning_prune.ops.attention.HeadAttention`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from lightning_prune.dependency.channels import ZERO, ChannelTag
from lightning_prune.ops.attention import HeadAttention, HeadLayout
from lightning_prune.ops.registry import OpRule, register_op_rule


def window_attention(
    x: torch.Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    bias: torch.Tensor,
    window_size: list[int],
    shift_size: list[int],
    num_heads: int,
    head_dim: int,
    logit_scale: torch.Tensor | None = None,
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """Shifted-window multi-head attention on ``x`` of shape ``(B, H, W, C)``, as torchvision's
    ``shifted_window_attention`` computes it (cosine attention with ``logit_scale`` for V2, whose key bias
    is dropped), with ``num_heads`` heads of ``head_dim`` features however wide ``x`` is."""
    batch, height, width, _ = x.shape
    (wh, ww), (sh, sw) = window_size, list(shift_size)
    x = F.pad(x, (0, 0, 0, -width % ww, 0, -height % wh))
    padded_h, padded_w = x.shape[1], x.shape[2]
    sh, sw = (0 if wh >= padded_h else sh), (0 if ww >= padded_w else sw)  # one window: nothing to shift
    if sh + sw > 0:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    rows, cols, tokens = padded_h // wh, padded_w // ww, wh * ww
    windows = x.view(batch, rows, wh, cols, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens, x.shape[-1])

    y = qkv(windows)
    if logit_scale is not None and qkv.bias is not None:  # Swin V2 has no key bias: take it out again
        n = num_heads * head_dim
        y = y - F.pad(qkv.bias[n : 2 * n], (n, n))
    q, k, v = y.reshape(y.shape[0], tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + bias
    if sh + sw > 0:  # tokens from different regions of a shifted window do not attend to each other
        mask = _shift_mask(padded_h, padded_w, (wh, ww), (sh, sw), attn.dtype, attn.device)
        attn = (attn.view(batch, rows * cols, num_heads, tokens, tokens) + mask[None, :, None]).flatten(0, 1)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(-1, tokens, num_heads * head_dim)
    out = F.dropout(proj(out), p=dropout, training=training)

    out = out.view(batch, rows, cols, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    if sh + sw > 0:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :height, :width].contiguous()


def _shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int], dtype, device):
    """``(windows, tokens, tokens)``: -100 between tokens of a window that come from different regions of
    the shifted map, 0 within a region (the regions torchvision labels)."""
    region = torch.zeros(height, width, device=device)
    (wh, ww), (sh, sw) = window, shift
    for i, rs in enumerate((slice(0, -wh), slice(-wh, -sh), slice(-sh, None))):
        for j, cs in enumerate((slice(0, -ww), slice(-ww, -sw), slice(-sw, None))):
            region[rs, cs] = 3 * i + j
    region = region.view(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differs = region.unsqueeze(1) != region.unsqueeze(2)
    return torch.zeros(differs.shape, dtype=dtype, device=device).masked_fill(differs, -100.0)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return window_attention(
        x, self.qkv, self.proj, self.get_relative_position_bias(), self.window_size, self.shift_size,
        self.num_heads, self.head_dim, getattr(self, "logit_scale", None), self.attention_dropout, self.dropout,
        self.training,
    )  # fmt: skip


class HeadsWindowAttention(ShiftedWindowAttention):
    """torchvision's Swin window attention computed by :func:`window_attention` (``head_dim`` features per
    head, whatever the embedding width)."""

    prepared_from = ShiftedWindowAttention
    head_dim: int
    forward = _forward


class HeadsWindowAttentionV2(ShiftedWindowAttentionV2):
    """torchvision's Swin V2 window attention computed by :func:`window_attention`."""

    prepared_from = ShiftedWindowAttentionV2
    head_dim: int
    forward = _forward


_HEADS = {ShiftedWindowAttention: HeadsWindowAttention, ShiftedWindowAttentionV2: HeadsWindowAttentionV2}


@register_op_rule(ShiftedWindowAttention)
class TorchvisionWindowAttention(HeadAttention):
    """torchvision's Swin (V1 and V2) window attention: its heads, each with its column of the relative
    position bias table (V1) or its row of the bias MLP's output layer and its logit scale (V2)."""

    def prepare(self, module):
        heads = _HEADS.get(type(module))
        if heads is not None:
            module.head_dim = module.qkv.out_features // (3 * module.num_heads)
            module.__class__ = heads

    def layout(self, module):
        if not isinstance(module, tuple(_HEADS.values())):
            return f"{type(module).__name__} has its own forward"
        per_head = (("logit_scale", 0), ("cpb_mlp.2.weight", 0)) if isinstance(module, ShiftedWindowAttentionV2) else (
            ("relative_position_bias_table", 1),)  # fmt: skip
        return HeadLayout("qkv", "proj", module.num_heads, module.head_dim, per_head)

    def set_heads(self, module, num_heads):
        module.num_heads = num_heads
        if isinstance(module, ShiftedWindowAttentionV2):
            module.cpb_mlp[2].out_features = num_heads


@register_op_rule("torchvision.models.swin_transformer._patch_merging_pad")
class PatchMergingPad(OpRule):
    """torchvision's patch merging: the four pixels of each 2x2 patch side by side on the channels, so the
    output's channels are the input's four times over, and the function runs as it is on the kept ones."""

    def propagate(self, walker, node):
        x = walker.value(node.args[0])
        if not isinstance(x, ChannelTag) or x.dim != x.ndim - 1 or (x.nodes == ZERO).any():
            return walker.opaque(node)
        return ChannelTag(x.nodes.repeat(4), x.dim, x.ndim)

    def compact(self, builder, node):
        x = node.args[0]
        kept, width = builder.kept[x], builder.tag(x).size
        if not torch.equal(builder.kept_positions(builder.tag(node)), torch.cat([kept + i * width for i in range(4)])):
            return None
        return builder.copy(node)

