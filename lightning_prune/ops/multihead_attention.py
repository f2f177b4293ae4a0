"""``nn.MultiheadAttention`` with prunable heads (torchvision's ViT, ``nn.Transformer`` layers, user models).

``nn.MultiheadAttention`` hands its packed ``in_proj_weight`` to a function and never calls a layer that
writes the query, key and value channels, so no gate can see a head. Before tracing, each such module (of
exactly torch's class, with one packed projection and no key/value bias or zero attention) becomes a
:class:`HeadsMultiheadAttention`: the same module and state dict, computing the same output, whose ``in_proj``
Linear holds the packed projection's own parameters and is called on a self-attention's input. Its heads are
then neurons like timm's (:class:`~lightning_prune.ops.attention.HeadAttention`), when the module is called
for self-attention (query, key and value one tensor) and its attention weights are not used."""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.dependency.channels import ChannelTag
from lightning_prune.ops.attention import HeadAttention, HeadLayout
from lightning_prune.ops.registry import register_op_rule, tensor_shape


class HeadsMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computing its query, key and value through ``in_proj`` (a Linear holding
    ``in_proj_weight`` and ``in_proj_bias``), ``num_heads`` heads of ``head_dim`` features. Its state dict
    is ``nn.MultiheadAttention``'s (no ``in_proj.*`` keys)."""

    prepared_from = nn.MultiheadAttention
    added_modules = ("in_proj",)
    in_proj: nn.Linear

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (without its fast path)."""
        batched = query.dim() == 3
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")

        def tokens_first(x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, channels)
            return x if batched and self.batch_first else x.transpose(0, 1) if batched else x.unsqueeze(0)

        if query is key and key is value:  # self-attention: one call of in_proj, seen by its gate
            q, k, v = self.in_proj(tokens_first(query)).chunk(3, dim=-1)
        else:
            biases = self.in_proj.bias.chunk(3) if self.in_proj.bias is not None else (None,) * 3
            q, k, v = (F.linear(tokens_first(x), w, b) for x, w, b in zip(
                (query, key, value), self.in_proj.weight.chunk(3), biases))  # fmt: skip
        (batch, length, width), sources = q.shape, k.shape[1]
        q, k, v = (t.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else _float_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # one mask per head
            mask = mask.view(batch, self.num_heads, length, sources)
        padding = _float_mask(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, sources)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            weights = F.dropout(F.softmax(scores if mask is None else scores + mask, dim=-1), p=dropout)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """Loads ``in_proj_weight`` and ``in_proj_bias`` into ``in_proj`` too (the same parameters)."""
        for name in ("weight", "bias"):
            if f"{prefix}in_proj_{name}" in state_dict:
                state_dict[f"{prefix}in_proj.{name}"] = state_dict[f"{prefix}in_proj_{name}"]
        super()._load_from_state_dict(state_dict, prefix, *args)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as an additive one, -inf where it is True."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError("only bool and floating types of masks are supported")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _drop_in_proj(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State dict post-hook: ``in_proj``'s parameters are saved once, as ``in_proj_weight`` and ``in_proj_bias``."""
    for name in ("weight", "bias"):
        state_dict.pop(f"{prefix}in_proj.{name}", None)
    getattr(state_dict, "_metadata", {}).pop(f"{prefix}in_proj", None)


_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@register_op_rule(nn.MultiheadAttention, HeadsMultiheadAttention)  # the subclass too: traced as one op
class MultiheadAttentionHeads(HeadAttention):
    """``nn.MultiheadAttention``: its heads, when it computes through ``in_proj`` (see the module docstring)
    and is called for self-attention on channels-last tokens. Its output is ``(output, weights or None)``."""

    def prepare(self, module):
        if type(module) is nn.MultiheadAttention and not isinstance(self.layout(module), str):
            module.__class__ = HeadsMultiheadAttention
            in_proj = nn.Linear(module.embed_dim, 3 * module.embed_dim, module.in_proj_bias is not None, device="meta")
            in_proj.weight, in_proj.bias = module.in_proj_weight, module.in_proj_bias  # the same parameters
            module.in_proj = in_proj
            module.register_state_dict_post_hook(_drop_in_proj)

    def layout(self, module):
        if type(module) not in (nn.MultiheadAttention, HeadsMultiheadAttention):
            return f"{type(module).__name__} has its own forward"
        if module.in_proj_weight is None:
            return "its query, key and value have projections of their own widths (kdim, vdim)"
        if module.bias_k is not None or module.add_zero_attn:
            return "it adds keys and values to every head (add_bias_kv, add_zero_attn)"
        return HeadLayout("in_proj", "out_proj", module.num_heads, module.head_dim)

    def set_heads(self, module, num_heads):
        module.num_heads = num_heads
        module.in_proj_weight, module.in_proj_bias = module.in_proj.weight, module.in_proj.bias

    def propagate(self, walker, node):
        name, module = str(node.target), walker.modules[str(node.target)]
        meta = node.meta.get("tensor_meta")
        out_shape = tuple(meta[0].shape) if isinstance(meta, tuple) else None
        layout = self.checked_layout(module)
        call = None if isinstance(layout, str) else _arguments(node)  # a subclass may take other arguments
        x = None if call is None else walker.value(call["query"])
        why = layout if isinstance(layout, str) else self._kept_because(walker, node, call, x, out_shape)
        if why is not None:
            reason = f"flow into or out of attention {name} ({why})"
            out = walker.kept_around(node, reason)
            return out if out_shape is None else (ChannelTag(walker.nodes.fresh(out_shape[-1], reason),
                                                             len(out_shape) - 1, len(out_shape)), None)  # fmt: skip
        return ChannelTag(self.tie_heads(walker, name, module, layout, x), len(out_shape) - 1, len(out_shape)), None

    def _kept_because(self, walker, node, call, x, out_shape) -> str | None:
        """Why the heads of this call (of a module with a valid layout) are kept, or None."""
        if not (call["query"] is call["key"] is call["value"]):
            return "its query, key and value are not one tensor"
        if not isinstance(x, ChannelTag) or x.dim != x.ndim - 1 or out_shape is None:
            return "it is called on a tensor without channels last"
        if any(tag is not x for tag in walker.tags_in(node)):
            return "channels in several inputs"
        if len(tensor_shape(call["attn_mask"]) or ()) == 3:
            return "its attention mask holds one mask per head"
        if call["need_weights"] is not False and any(
            user.target is not operator.getitem or (user.args[1] != 0 and user.users) for user in node.users
        ):
            return "its attention weights are used"
        return None

    def compact(self, builder, node):
        name = str(node.target)
        module, value = builder.modules[name], builder.tags.get(node)
        if builder.calls[name] != 1 or f"{name}.out_proj" not in builder.readers or not isinstance(value, tuple):
            return None
        layout = self.checked_layout(module)
        self.slice_heads(builder, name, module, layout, _arguments(node)["query"], value[0])
        return builder.copy(node)


def _arguments(node: fx.Node) -> dict:
    """The arguments of the traced call of an ``nn.MultiheadAttention``, by name, defaults included."""
    bound = _SIGNATURE.bind(None, *node.args, **node.kwargs)
    bound.apply_defaults()
    return bound.arguments
