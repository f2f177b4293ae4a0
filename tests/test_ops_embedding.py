"""The embedding (residual stream) of vision transformers is prunable: a LayerNorm over the channels leaves the
removed ones out of its statistics, and the class token and position embedding are sliced with the stream."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import predicted_equals_counted
from test_ops_gating import assert_compact_equals_masked, prune_neurons
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from lightning_prune import build_dependency_graph, compact
from lightning_prune.ops.layers import KeptLayerNorm
from lightning_prune.ops.registry import prepare_modules


def _prepared(width: int) -> nn.LayerNorm:
    ln = nn.LayerNorm(width).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    prepare_modules(ln)
    assert type(ln) is KeptLayerNorm
    return ln


def test_kept_layer_norm_is_layer_norm_without_kept_and_over_the_kept_channels_with_it() -> None:
    torch.manual_seed(0)
    ln = _prepared(6)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.equal(ln(x), F.layer_norm(x, (6,), ln.weight, ln.bias, ln.eps))

    kept = torch.tensor([True, False, True, True, False, True])
    ln.kept = kept
    out = ln(x)
    idx = torch.nonzero(kept).flatten()
    small = nn.LayerNorm(4).double()
    with torch.no_grad():
        small.weight.copy_(ln.weight[idx])
        small.bias.copy_(ln.bias[idx])
    x_small = x.detach()[..., idx].clone().requires_grad_()
    expected = small(x_small)
    assert torch.allclose(out[..., idx], expected, rtol=0, atol=1e-12)
    assert torch.equal(out[..., ~kept], ln.bias[~kept].expand(3, 4, 2))  # 0 * weight + bias

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad[..., idx])
    assert torch.allclose(x.grad[..., idx], x_small.grad, rtol=0, atol=1e-12)
    assert torch.equal(x.grad[..., ~kept], torch.zeros(3, 4, 2, dtype=torch.float64))  # no part in the statistics
    assert torch.allclose(ln.weight.grad[idx], small.weight.grad, rtol=0, atol=1e-12)
    assert "kept" not in ln.state_dict()


def test_layer_norm_subclasses_and_group_norm_stay_as_they_are() -> None:
    class Own(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Own(4), nn.GroupNorm(2, 4), nn.LayerNorm((4, 4)))
    prepare_modules(model)
    assert [type(m) for m in model] == [Own, nn.GroupNorm, nn.LayerNorm]


def timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=10
    )


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)  # fmt: skip
    nn.init.normal_(model.heads.head.weight)  # zero-initialised: the output would be constant
    return model


VITS = {  # model, (patch embedding, class token, position embedding, LayerNorms, qkv-like readers, head)
    "timm": (timm_vit, ("patch_embed.proj", "cls_token", "pos_embed", ["blocks.0.norm1", "blocks.1.norm2", "norm"],
                        "blocks.0.attn.qkv", "head")),
    "torchvision": (torchvision_vit, ("conv_proj", "class_token", "encoder.pos_embedding",
                                      ["encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_1.ln_2",
                                       "encoder.ln"], "encoder.layers.encoder_layer_0.mlp.0", "heads.head")),
}  # fmt: skip


@pytest.mark.parametrize("kind", VITS)
def test_vit_embedding_channels_are_neurons_and_compact_exactly(kind: str) -> None:
    make, (patch, token, position, norms, reader, head) = VITS[kind]
    model = make().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    stream = graph.writers[patch]
    width = stream.numel()
    assert stream.unique().numel() == width and graph.prunable[stream].all()  # one neuron per channel
    assert set(graph.parameters) == {token, position}
    for name in (token, position):
        dim, neurons = graph.parameters[name]
        assert dim == 2 and torch.equal(neurons, stream)
    for name in norms:
        assert torch.equal(graph.writers[name], stream)
    assert torch.equal(graph.readers[head], stream) and torch.equal(graph.readers[reader], stream)
    assert "LayerNorm" not in graph.describe() and "concatenation" not in graph.describe()

    removed = stream[[0, 5, 7]].tolist()
    masks = prune_neurons(model, graph, removed)
    assert all(graph.modules[n].kept is not None and int((~graph.modules[n].kept).sum()) == 3 for n in norms)
    compacted = compact(model, masks, graph=graph)
    small = width - 3
    modules = dict(compacted.named_modules())
    assert modules[patch].out_channels == small
    assert compacted.get_parameter(token).shape[-1] == small
    assert compacted.get_parameter(position).shape[-1] == small
    assert all(modules[n].normalized_shape == (small,) and modules[n].kept is None for n in norms)
    assert modules[head].in_features == small
    reader_in = modules[reader].in_features if hasattr(modules[reader], "in_features") else None
    assert reader_in in (small, None)
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted_equals_counted(model, compacted, graph, masks, x)


def test_torchvision_attention_reads_the_narrower_embedding() -> None:
    model = torchvision_vit().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    masks = prune_neurons(model, graph, graph.writers["conv_proj"][[1, 2]].tolist())
    compacted = compact(model, masks, graph=graph)
    attention = compacted.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert attention.in_proj_weight.shape[1] == 30 and attention.out_proj.out_features == 30


def test_callback_prunes_the_timm_vit_and_compacts_exactly(tmp_path) -> None:
    from helpers import fit_to_half_flops

    net = timm_vit()
    module, compacted = fit_to_half_flops(net, tmp_path)
    module.eval()
    x = torch.randn(2, 3, 32, 32)
    assert_compact_equals_masked(module.net, compacted, x, dtypes=(torch.float64,))
    width = compacted.get_submodule("patch_embed.proj").out_channels
    print(f"embedding width after the callback: {width} of 48")


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_convnext_stream_goes_through_layer_norm_2d_and_compacts_exactly(family: str) -> None:
    """ConvNeXt's ``LayerNorm2d`` (over dimension 1) leaves removed channels out too: stem, blocks, downsampling
    and head share the stream's neurons."""
    torch.manual_seed(0)
    if family == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("convnext_atto", num_classes=10)
    else:
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)
    model = model.double().eval()
    with torch.no_grad():  # layer scale and head away from their tiny initial values: the output shows the stream
        for name, param in model.named_parameters():
            if "layer_scale" in name or name.endswith("gamma"):
                param.fill_(1.0)
        list(model.modules())[-1].weight.normal_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    assert "LayerNorm" not in graph.describe(causes=100)
    stem = next(name for name in graph.gates if graph.modules[name].__class__ is nn.Conv2d)  # the stem conv
    removed = graph.writers[stem][[1, 6, 11]].tolist()
    masks = prune_neurons(model, graph, removed)
    compacted = compact(model, masks)
    norms = [m for m in compacted.modules() if type(m).__name__ == "KeptLayerNorm2d"]
    assert norms and norms[0].normalized_shape == (graph.writers[stem].numel() - 3,)
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted_equals_counted(model, compacted, graph, masks, x)

