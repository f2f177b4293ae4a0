"""Attention heads are neurons: timm's ``Attention`` (ViT, DeiT) and Swin ``WindowAttention`` lose whole heads,
the compact module keeps fewer heads of the same size and equals the masked one, and the FLOPs the cost model
predicts (attention products included) are the compact network's."""

from __future__ import annotations

import pytest
import torch
from test_ops_gating import assert_compact_equals_masked, prune_neurons

from helpers import fit_to_half_flops, heads_of, predicted_equals_counted
from lightning_prune import build_dependency_graph, compact

timm = pytest.importorskip("timm")


def tiny_vit(**options):
    """A 2-block timm ViT, 4 heads of 12 features, on 32x32 images (16 patches)."""
    from timm.models.vision_transformer import VisionTransformer

    config = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4, "num_classes": 10}
    return VisionTransformer(**{**config, **options})


def test_a_vit_head_is_one_neuron_and_the_compact_attention_keeps_fewer_heads() -> None:
    torch.manual_seed(0)
    model = tiny_vit().double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    heads = heads_of(graph, "blocks.0.attn")
    assert len(heads) == 4 and graph.prunable[heads].all()
    per_channel = graph.gates["blocks.0.attn.qkv"].neurons.reshape(3, 4, 12)  # query, key, value rows of each head
    assert (per_channel == per_channel[:, :, :1]).all() and (per_channel == per_channel[:1]).all()
    assert graph.readers["blocks.0.attn.proj"].reshape(4, 12).unique(dim=1).flatten().tolist() == heads
    removed = [heads[1], heads[3], heads_of(graph, "blocks.1.attn")[0]]
    masks = prune_neurons(model, graph, removed)
    compacted = compact(model, masks)
    attn = compacted.get_submodule("blocks.0.attn")
    assert (attn.num_heads, attn.attn_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 24, 72, 24)
    assert compacted.get_submodule("blocks.1.attn").num_heads == 3
    kept = torch.cat([torch.arange(0, 12), torch.arange(24, 36)])
    assert torch.equal(attn.qkv.weight[:24], model.blocks[0].attn.qkv.weight[kept])  # the query rows of heads 0, 2
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted_equals_counted(model, compacted, graph, masks, x)


def test_swin_window_attention_slices_the_relative_position_bias_of_its_heads() -> None:
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=32,
                              window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4)).double().eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    heads = heads_of(graph, "layers.1.blocks.1.attn")  # a shifted window block: its mask is a traced input
    assert len(heads) == 4 and graph.prunable[heads].all()
    masks = prune_neurons(model, graph, [heads[0], heads[2]])
    compacted = compact(model, masks)
    attn = compacted.get_submodule("layers.1.blocks.1.attn")
    table = model.get_submodule("layers.1.blocks.1.attn").relative_position_bias_table
    assert attn.num_heads == 2 and torch.equal(attn.relative_position_bias_table, table[:, [1, 3]])
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted_equals_counted(model, compacted, graph, masks, x)


def test_heads_followed_by_a_norm_over_all_heads_are_kept_with_the_reason() -> None:
    model = tiny_vit(depth=1)
    model.blocks[0].attn = timm.layers.Attention(48, num_heads=4, scale_norm=True, norm_layer=torch.nn.LayerNorm)
    graph = build_dependency_graph(model.eval(), torch.randn(2, 3, 32, 32))
    assert "blocks.0.attn.qkv" not in graph.gates
    assert any("a norm or gate over all heads follows them" in reason for reason in graph.causes)


def test_a_user_rule_for_an_own_attention_module_prunes_its_heads_or_names_a_wrong_layout() -> None:
    from lightning_prune.ops import register_op_rule
    from lightning_prune.ops.attention import HeadAttention, HeadLayout

    class MyAttention(timm.layers.Attention):  # a user's own class (here: timm's, renamed)
        pass

    @register_op_rule(MyAttention)
    class MyAttentionHeads(HeadAttention):
        head_dim = 12

        def layout(self, module):
            return HeadLayout("qkv", "proj", module.num_heads, self.head_dim)

    model = tiny_vit(depth=1)
    model.blocks[0].attn = MyAttention(48, num_heads=4)
    x = torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model.eval(), x)
    assert len(heads_of(graph, "blocks.0.attn")) == 4
    MyAttentionHeads.head_dim = 10  # a layout that does not fit the module
    graph = build_dependency_graph(model, x)
    assert "blocks.0.attn.qkv" not in graph.gates
    assert any("'qkv' and 'proj' are no Linear layers of 120 outputs, 40 inputs" in r for r in graph.causes)


def test_callback_removes_vit_heads_in_a_module_without_forward(tmp_path) -> None:
    torch.manual_seed(0)
    module, compacted = fit_to_half_flops(tiny_vit(), tmp_path)
    heads = [compacted.get_submodule(f"blocks.{i}.attn").num_heads for i in range(2)]
    assert sum(heads) < 8, f"no head removed: {heads}"
    x = torch.randn(4, 3, 32, 32)
    assert_compact_equals_masked(module.net.eval(), compacted, x, dtypes=(torch.float32,))
