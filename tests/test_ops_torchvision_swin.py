"""torchvision's Swin and Swin V2 window attention: made visible without changing what it computes, its heads
are neurons, the compact module keeps fewer heads and its per-head bias, and equals the masked one."""

from __future__ import annotations

import pytest
import torch
from test_ops_gating import assert_compact_equals_masked, prune_neurons
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

from helpers import heads_of, predicted_equals_counted
from lightning_prune import build_dependency_graph, compact
from lightning_prune.ops.registry import prepare_modules


def torchvision_swin(v2: bool):
    """torchvision's Swin (V1 or V2) class: 2 stages of 2 blocks, 2 and 4 heads of 8 features, 4x4 windows."""
    v2_parts = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10, **v2_parts)  # fmt: skip


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_torchvision_swin_attention_computes_as_before_once_its_heads_are_visible(v2: bool) -> None:
    torch.manual_seed(0)
    cls = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
    for shift in ([0, 0], [2, 1]):  # a 10x10 map in 4x4 windows: padded, shifted or not
        attention = cls(16, [4, 4], shift, num_heads=2).double()
        with torch.no_grad():
            attention.qkv.bias.normal_()  # Swin V2 ignores its key bias: so must the rewritten forward
        x = torch.randn(2, 10, 10, 16, dtype=torch.float64, requires_grad=True)
        expected = attention(x)
        (grad,) = torch.autograd.grad(expected.square().sum(), x)
        prepare_modules(attention)
        assert type(attention).__name__ == ("HeadsWindowAttentionV2" if v2 else "HeadsWindowAttention")
        assert isinstance(attention, cls) and attention.head_dim == 8
        out = attention(x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0], grad)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_torchvision_swin_loses_whole_heads_and_its_per_head_bias(v2: bool) -> None:
    torch.manual_seed(0)
    model = torchvision_swin(v2).double().eval()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)  # 10x10 tokens: padded to whole windows
    original = model.get_submodule("features.3.1.attn")
    table = (original.cpb_mlp[2].weight if v2 else original.relative_position_bias_table).detach().clone()
    graph = build_dependency_graph(model, x)
    heads = heads_of(graph, "features.3.1.attn")  # a shifted window block
    assert len(heads) == 4 and graph.prunable[heads].all()
    masks = prune_neurons(model, graph, [heads[0], heads[2], heads_of(graph, "features.1.0.attn")[1]])
    compacted = compact(model, masks)
    attn = compacted.get_submodule("features.3.1.attn")
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 8, 48, 16)
    assert compacted.get_submodule("features.1.0.attn").num_heads == 1
    if v2:
        assert torch.equal(attn.cpb_mlp[2].weight, table[[1, 3]]) and attn.logit_scale.shape == (2, 1, 1)
    else:
        assert torch.equal(attn.relative_position_bias_table, table[:, [1, 3]])
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted_equals_counted(model, compacted, graph, masks, x)


def test_a_subclass_of_torchvision_swin_attention_with_its_own_forward_keeps_its_heads() -> None:
    class MyWindowAttention(ShiftedWindowAttention):
        def forward(self, x):
            return super().forward(x) * 2

    model = torchvision_swin(v2=False)
    block = model.get_submodule("features.1.0")
    block.attn = MyWindowAttention(16, [4, 4], [0, 0], num_heads=2)
    graph = build_dependency_graph(model.eval(), torch.randn(1, 3, 32, 32))
    assert type(block.attn) is MyWindowAttention and "features.1.0.attn.qkv" not in graph.gates
    assert "features.1.1.attn.qkv" in graph.gates
    assert any("MyWindowAttention has its own forward" in reason for reason in graph.causes)


def test_a_compact_swin_saved_loads_into_a_fresh_torchvision_model_and_exports(tmp_path) -> None:
    from lightning_prune.compaction.export import export_program
    from lightning_prune.compaction.serialization import load_compact, save_compact

    torch.manual_seed(0)
    model, x = torchvision_swin(v2=True).eval(), torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x)
    compacted = compact(model, prune_neurons(model, graph, heads_of(graph, "features.3.1.attn")[:3]))
    save_compact(compacted, tmp_path / "swin.pt")
    loaded = load_compact(torchvision_swin(v2=True).eval(), tmp_path / "swin.pt")  # prepared, same fingerprint
    assert loaded.get_submodule("features.3.1.attn").num_heads == 1
    torch.testing.assert_close(loaded(x), compacted(x))
    torch.testing.assert_close(export_program(compacted, x).module()(x), compacted(x))


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_the_first_stages_embedding_goes_through_patch_merging(v2: bool) -> None:
    """Patch merging puts each 2x2 patch's four pixels side by side: a stream channel is four channels of the
    next stage's input, cut out of its norm and reduction layer together."""
    torch.manual_seed(0)
    model = torchvision_swin(v2).double().eval()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    stream = graph.writers["features.0.0"]
    assert graph.prunable[stream].all() and torch.equal(graph.readers["features.2.reduction"], stream.repeat(4))
    masks = prune_neurons(model, graph, stream[[1, 5, 9]].tolist())
    compacted = compact(model, masks)
    assert compacted.get_submodule("features.2.reduction").in_features == 4 * 13
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted_equals_counted(model, compacted, graph, masks, x)

