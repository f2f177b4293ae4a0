"""Attention. A multi-head attention with a fused query/key/value ``Linear`` and an output projection
``Linear`` (timm's ``Attention`` of ViT/DeiT, timm's Swin ``WindowAttention``) is traced as one op whose
heads are neurons: head ``h`` owns its query, key and value rows of ``qkv`` and its columns of ``proj``.
Removing it zeroes those rows, so its values are zero and its output is exactly zero (Michel et al. 2019,
"Are Sixteen Heads Really Better than One?"); the compact module keeps fewer heads of the same size.

Each head is scored through the gate on the ``qkv`` output (one gate per channel, its query, key and value
channels summed into the head's score), like any neuron written by several channels. torchvision's Swin is
in :mod:`.torchvision_swin`, ``nn.MultiheadAttention`` in :mod:`.multihead_attention`. torchvision's window
attention function called by a module of your own keeps the channels flowing in and out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune.dependency.channels import ChannelTag
from lightning_prune.ops.layers import _create, _param, _slice_dense
from lightning_prune.ops.registry import OpRule, register_op_rule, tensor_shape


@dataclass(frozen=True)
class HeadLayout:
    """Where a multi-head attention module keeps its heads: the fused ``qkv`` Linear (rows: all query heads,
    then all key heads, then all value heads), the output ``proj`` Linear, and parameters holding one slice
    per head along a dimension (``per_head``: attribute path -> dimension, e.g. a relative position bias
    table)."""

    qkv: str
    proj: str
    num_heads: int
    head_dim: int
    per_head: tuple[tuple[str, int], ...] = ()


class HeadAttention(OpRule):
    """A multi-head attention module traced as one op, its heads prunable (see the module docstring).
    Subclasses say where the heads are (:meth:`layout`) and how to set the module's number of heads."""

    def layout(self, module: nn.Module) -> HeadLayout | str:
        """The module's :class:`HeadLayout`, or why its heads cannot be removed."""
        raise NotImplementedError

    def checked_layout(self, module: nn.Module) -> HeadLayout | str:
        """:meth:`layout`, or why it does not fit the module: ``qkv`` and ``proj`` must be Linear layers of
        ``3 * num_heads * head_dim`` outputs and ``num_heads * head_dim`` inputs."""
        layout = self.layout(module)
        if isinstance(layout, str):
            return layout
        width = layout.num_heads * layout.head_dim
        qkv, proj = module.get_submodule(layout.qkv), module.get_submodule(layout.proj)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
                and qkv.out_features == 3 * width and proj.in_features == width):  # fmt: skip
            return f"{layout.qkv!r} and {layout.proj!r} are no Linear layers of {3 * width} outputs, {width} inputs"
        return layout

    def set_heads(self, module: nn.Module, num_heads: int) -> None:
        module.num_heads = num_heads

    def propagate(self, walker, node):
        name, module = str(node.target), walker.modules[str(node.target)]
        layout = self.checked_layout(module)
        x = walker.value(node.args[0]) if node.args else None
        out_shape = tensor_shape(node)
        if isinstance(layout, str) or not isinstance(x, ChannelTag) or x.dim != x.ndim - 1 or out_shape is None:
            why = layout if isinstance(layout, str) else "it is called on a tensor without channels last"
            return walker.kept_around(node, f"flow into or out of attention {name} ({why})")
        if len(walker.tags_in(node)) > 1:
            return walker.kept_around(node, f"flow into or out of attention {name} (channels in several inputs)")
        return ChannelTag(self.tie_heads(walker, name, module, layout, x), len(out_shape) - 1, len(out_shape))

    def compact(self, builder, node):
        name = str(node.target)
        module = builder.modules[name]
        layout = self.checked_layout(module)
        if builder.calls[name] != 1 or isinstance(layout, str):
            return None
        self.slice_heads(builder, name, module, layout, node.args[0], builder.tag(node))
        return builder.copy(node)

    def tie_heads(self, walker, name: str, module: nn.Module, layout: HeadLayout, x: ChannelTag) -> torch.Tensor:
        """Record attention ``name`` reading the channels of ``x``: ``qkv`` creates the query, key and value
        channels, one neuron per head, ``proj`` reads the values and creates the channels it returns."""
        heads, width = layout.num_heads, layout.num_heads * layout.head_dim
        qkv_name, proj_name = f"{name}.{layout.qkv}", f"{name}.{layout.proj}"
        qkv = walker.use(qkv_name)
        qkv.in_nodes = x.nodes
        rows = _create(walker, qkv, qkv_name, 3 * width)
        qkv.out_nodes = rows
        per_head = rows.reshape(3, heads, layout.head_dim).transpose(0, 1).reshape(heads, -1)
        for h in range(heads):  # a head's query, key and value channels are one neuron
            walker.nodes.union(per_head[h, :1].expand(per_head.shape[1]), per_head[h])
        proj = walker.use(proj_name)
        proj.in_nodes = rows[2 * width:]
        out = _create(walker, proj, proj_name, walker.modules[proj_name].out_features)
        proj.out_nodes = out
        walker.result.scaled[name] = proj.in_nodes  # the attention products: as many as there are value channels
        for path, _ in layout.per_head:  # a layer with one output per head (Swin V2's bias MLP)
            owner = path.rpartition(".")[0]
            if owner and isinstance(module.get_submodule(owner), nn.Linear):
                walker.result.scaled[f"{name}.{owner}"] = proj.in_nodes
        return out

    def slice_heads(self, builder, name: str, module: nn.Module, layout: HeadLayout, x, out: ChannelTag) -> None:
        """Keep the kept heads of attention ``name`` (called on ``x``, returning ``out``): their rows of
        ``qkv``, columns of ``proj`` and slices of the per-head parameters, then :meth:`set_heads`."""
        qkv, proj = module.get_submodule(layout.qkv), module.get_submodule(layout.proj)
        width, size = layout.num_heads * layout.head_dim, layout.head_dim
        columns = builder.kept_inputs(f"{name}.{layout.proj}")  # the kept heads' value channels
        heads = columns[::size] // size
        within = (heads.unsqueeze(1) * size + torch.arange(size)).flatten()
        rows = torch.cat([part * width + within for part in range(3)])
        _slice_dense(qkv, builder.kept[x], rows)
        _slice_dense(proj, columns, builder.kept_positions(out))
        for path, dim in layout.per_head:
            owner, _, attr = path.rpartition(".")
            holder = module.get_submodule(owner)
            value = getattr(holder, attr)
            sliced = value.index_select(dim, heads.to(value.device))
            setattr(holder, attr, _param(sliced, value) if isinstance(value, nn.Parameter) else sliced)
        self.set_heads(module, heads.numel())


@register_op_rule("timm.layers.attention.Attention")
class TimmAttention(HeadAttention):
    """timm's ``Attention`` (ViT, DeiT): its heads, unless a norm or gate over all heads follows them."""

    def layout(self, module):
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity) or getattr(module, "gate", None):
            return "a norm or gate over all heads follows them"
        if not hasattr(module, "attn_dim"):
            return "this timm version reshapes its output to the input width"
        return HeadLayout("qkv", "proj", module.num_heads, module.head_dim)

    def set_heads(self, module, num_heads):
        module.num_heads, module.attn_dim = num_heads, num_heads * module.head_dim


@register_op_rule("timm.models.swin_transformer.WindowAttention")
class TimmWindowAttention(HeadAttention):
    """timm's Swin ``WindowAttention``: its heads, each with its column of the relative position bias table."""

    def layout(self, module):
        heads = module.num_heads
        return HeadLayout("qkv", "proj", heads, module.qkv.out_features // (3 * heads),
                          per_head=(("relative_position_bias_table", 1),))  # fmt: skip


@register_op_rule("torchvision.models.swin_transformer.shifted_window_attention")
class KeptAttention(OpRule):
    """Attention whose heads are not pruned (torchvision's window attention function called by a module of your
    own) is one op: the channels flowing in and out are kept. Its output has its channels on the last dimension."""

    def propagate(self, walker, node):
        return walker.kept_around(node, f"flow into or out of attention {walker.where(node)}")
