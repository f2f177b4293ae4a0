"""Channels-last blocks and transformers: the channels are tracked through ``permute``/``transpose``/reshapes,
Linear layers act on the last dimension, the MLP hidden neurons are prunable and compact exactly, and the
channels flowing into a LayerNorm or an attention are kept, with their cause."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import relative_error
from test_compaction import _flops
from test_ops_gating import assert_compact_equals_masked, prune_neurons
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from lightning_prune import build_dependency_graph, compact
from lightning_prune.importance.estimate import prune_once
from lightning_prune.importance.gate_gradients import GateGradients
from lightning_prune.pruner import NeuronSelector
from lightning_prune.pruner.cost import CostModel


class ChannelsLastBlock(nn.Module):
    """Conv, then ``x + mlp(norm(x))`` with the channels on the last dimension, moved there by ``layout``:
    ``permute`` (ConvNeXt), ``flatten(2).transpose(1, 2)`` (a ViT patch embedding) or a reshape to tokens."""

    def __init__(self, layout: str, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.layout = layout
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        if self.layout == "permute":  # (B, H, W, C), back to (B, C, H, W) after the block
            y = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, -1, 1, 2)
            return self.head((x + y).mean((2, 3)))
        if self.layout == "flatten_transpose":  # (B, HW, C), back to (B, C, H, W) after the block
            t = x.flatten(2).transpose(1, 2)
            t = t + self.mlp(self.norm(t))
            return self.head(t.transpose(-1, -2).reshape(b, c, h, w).mean((2, 3)))
        if self.layout == "window_pad":  # (B, H, W, C) padded to whole 4x4 windows by traced amounts (Swin)
            t = x.permute(0, 2, 3, 1)
            t = F.pad(t, (0, 0, 0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4))
            t = t + self.mlp(self.norm(t))
            return self.head(t[:, :h, :w].mean((1, 2)))
        t = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # tokens, averaged
        t = t + self.mlp(self.norm(t))
        return self.head(t[:, 1:].mean(1))


@pytest.mark.parametrize("layout", ["permute", "flatten_transpose", "reshape", "window_pad"])
def test_channels_last_mlp_neurons_are_prunable_and_compact_exactly(layout: str) -> None:
    torch.manual_seed(0)
    model = ChannelsLastBlock(layout).double().eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    streamed = layout != "window_pad"  # there, slicing with traced bounds keeps the stream's channels
    assert set(graph.gates) == {"mlp.0"} | ({"stem", "mlp.3"} if streamed else set())
    assert graph.num_prunable == 16 + 8 * streamed and graph.gates["mlp.0"].kind == "linear"
    stream = graph.writers["stem"]
    assert torch.equal(graph.writers["mlp.3"], stream)  # the residual addition ties the block's output
    assert torch.equal(graph.writers["norm"], stream)  # the LayerNorm's channels too
    assert bool(graph.prunable[stream].all()) == streamed and "LayerNorm" not in graph.describe()
    removed = graph.gates["mlp.0"].neurons[[0, 3, 4, 9, 15]].tolist() + stream[[2, 5]].tolist() * streamed
    compacted = compact(model, prune_neurons(model, graph, removed))
    assert compacted.get_submodule("mlp.0").out_features == 11 and compacted.get_submodule("mlp.3").in_features == 11
    width = 8 - 2 * streamed
    assert compacted.get_submodule("norm").normalized_shape == (width,)
    assert compacted.get_submodule("stem").out_channels == width
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))


class _NormNet(nn.Module):
    """A GroupNorm over the channels, and a LayerNorm over the last (spatial) dimension of NCHW features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.ln = nn.Conv2d(8, 6, 3, padding=1), nn.LayerNorm(5)
        self.conv3, self.head = nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv3(self.ln(self.conv2(F.relu(self.gn(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def test_group_norm_and_layer_norm_over_other_dimensions_keep_their_channels() -> None:
    torch.manual_seed(0)
    model = _NormNet().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    assert set(graph.gates) == {"conv3"}
    assert all(graph.blocked[n] == "flow into GroupNorm gn" for n in graph.writers["conv1"].tolist())
    assert all("LayerNorm (ln)" in graph.blocked[n] for n in graph.writers["conv2"].tolist())  # an unsupported op
    compacted = compact(model, prune_neurons(model, graph, graph.gates["conv3"].neurons[[1]].tolist()))
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))


def test_a_gate_on_a_channels_last_linear_multiplies_its_last_dimension() -> None:
    """``dE/dz`` from the Linear's parameters equals that of an explicit gate on the last dimension."""
    torch.manual_seed(0)
    model = ChannelsLastBlock("permute").double().train()
    x, y = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    gate = build_dependency_graph(model, x).gates["mlp.0"]
    fc1 = model.get_submodule("mlp.0")
    z = torch.ones(16, dtype=torch.float64, requires_grad=True)
    handle = fc1.register_forward_hook(lambda module, args, out: out * z)
    F.cross_entropy(model(x), y).backward()
    handle.remove()
    expected = z.grad.clone()
    for force_hooks in (False, True):
        model.zero_grad()
        gradients = GateGradients([gate], force_hooks=force_hooks)
        gradients.attach()
        F.cross_entropy(model(x), y).backward()
        gradients.collect()
        gradients.finish()
        gradients.detach()
        assert relative_error(gradients.total["mlp.0"], expected) <= 1e-9, force_hooks


def _prune_to_flops(model: nn.Module, x: torch.Tensor, graph, ratio: float):
    """Masks removing the fewest random-score neurons that take the FLOPs (``CostModel``) to ``ratio``,
    and the CostModel's count for them."""
    scores = torch.rand(graph.num_neurons, generator=torch.Generator().manual_seed(0))
    cost, selector = CostModel(model, x, graph), NeuronSelector(graph)
    full = cost.flops(torch.ones(graph.num_neurons, dtype=torch.bool))
    for count in range(graph.num_prunable // 20, graph.num_prunable, graph.num_prunable // 20):
        alive = torch.ones(graph.num_neurons, dtype=torch.bool)
        alive[selector.select(scores, alive, count)] = False
        if cost.flops(alive) <= ratio * full:
            break
    return prune_once(model, scores, num=count, graph=graph), cost.flops(alive)


def test_torchvision_convnext_mlp_and_stream_neurons_take_flops_to_055_exactly() -> None:
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None, num_classes=10).eval()
    with torch.no_grad():  # layer scale far from its 1e-6 start, so that the pruned MLPs show in the output
        for block in model.modules():
            if isinstance(block, torchvision.models.convnext.CNBlock):
                block.layer_scale.copy_(torch.rand_like(block.layer_scale) + 0.5)
    x = torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x[:1])
    hidden = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 4 * m.in_features]
    assert set(hidden) <= set(graph.gates) and len(hidden) == 18
    stream = graph.writers["features.0.0"]  # the stem's channels, through LayerNorm2d and every block
    assert "features.0.0" in graph.gates and torch.equal(graph.writers["features.0.1"], stream)
    assert "LayerNorm" not in graph.describe(causes=100)
    masks, estimate = _prune_to_flops(model, x[:1], graph, 0.55)
    compacted = compact(model, masks)
    assert compacted.get_submodule("features.1.0.block.3").out_features == int(masks["features.1.0.block.3"].sum())
    flops = _flops(compacted, x[:1])
    assert flops <= 0.55 * _flops(model, x[:1]) and abs(flops - estimate) <= 1e-3 * flops
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float32,))


def _mlp_layers(model: nn.Module) -> set[str]:
    """The first Linear of every torchvision ``MLP`` (MLPBlock, Swin's MLP)."""
    return {f"{n}.0" for n, m in model.named_modules() if isinstance(m, torchvision.ops.MLP)}


def _vit() -> VisionTransformer:
    model = VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight)  # zeros at initialisation: the output would not depend on the input
    return model


TRANSFORMERS = {
    "vit": _vit,
    "swin": lambda: SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10
    ),
}
CAUSES = {  # why channels are kept: no LayerNorm (heads are neurons: test_ops_multihead_attention, _torchvision_swin)
    "vit": (),
    "swin": (),
}
HEADS = {"vit": ("self_attention", "in_proj"), "swin": ("attn", "qkv")}  # attention modules, their q/k/v layer


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_mlp_neurons_are_prunable_and_compact_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = TRANSFORMERS[name]().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = build_dependency_graph(model, x[:1])
    mlp = _mlp_layers(model)
    attention, qkv = HEADS[name]
    heads = {f"{n}.{qkv}" for n, _ in model.named_modules() if n.endswith(f".{attention}")}
    assert mlp | heads <= set(graph.gates) and len(mlp) == {"vit": 2, "swin": 4}[name]
    assert graph.num_prunable == torch.cat([gate.neurons for gate in graph.gates.values()]).unique().numel()
    described = graph.describe(causes=100)
    assert "LayerNorm" not in described
    assert all(f"neurons flow into {cause}" in described or f"out of {cause}" in described for cause in CAUSES[name])
    removed = [n for layer in mlp for n in graph.gates[layer].neurons[::3].tolist()]
    compacted = compact(model, prune_neurons(model, graph, removed))
    for layer in mlp:
        gate = graph.gates[layer]
        fc1, fc2 = compacted.get_submodule(layer), compacted.get_submodule(layer[:-1] + "3")
        assert fc1.out_features == fc2.in_features == gate.channels - len(gate.neurons[::3])
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
