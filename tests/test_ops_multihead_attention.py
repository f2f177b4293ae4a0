"""``nn.MultiheadAttention``: made visible without changing what it computes or its state dict, its heads are
neurons when it attends over one tensor, the compact module keeps fewer heads and equals the masked one."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_ops_gating import assert_compact_equals_masked, prune_neurons
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from helpers import fit_to_half_flops, heads_of, predicted_equals_counted
from lightning_prune import build_dependency_graph, compact
from lightning_prune.ops.multihead_attention import HeadsMultiheadAttention
from lightning_prune.ops.registry import prepare_modules

VIT = "encoder.layers.encoder_layer_0.self_attention"


def tiny_vit() -> VisionTransformer:
    """torchvision's ViT class: 2 layers of 4 heads of 8 features on 32x32 images (16 patches)."""
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)  # fmt: skip
    nn.init.normal_(model.heads.head.weight)  # zeros at initialisation: the output would not depend on the input
    return model


class Tokens(nn.Module):
    """8x8 patches as 16 tokens of 32 channels, ``blocks`` pre-norm blocks (``nn.MultiheadAttention`` of 4
    heads, batch first, its weights unused; an MLP), mean pooling and a classifier."""

    def __init__(self, blocks: int = 2, attention=None) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 32, 8, stride=8)
        self.norms = nn.ModuleList(nn.LayerNorm(32) for _ in range(2 * blocks))
        self.attentions = nn.ModuleList(
            attention() if attention else nn.MultiheadAttention(32, 4, batch_first=True) for _ in range(blocks)
        )
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(blocks))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patches(x).flatten(2).transpose(1, 2)
        for i, (attention, mlp) in enumerate(zip(self.attentions, self.mlps)):
            y = self.norms[2 * i](x)
            x = x + attention(y, y, y)[0]
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(x.mean(dim=1))


def _call(attention: nn.Module, form: str, batch_first: bool, masks: str, need_weights: bool, average: bool):
    """Output, attention weights and input gradients of ``attention`` called in ``form``, seeded."""
    tokens, sources, batch = 5, (7 if form == "cross" else 5), 3
    gen = torch.Generator().manual_seed(0)
    def shape(n: int) -> tuple[int, ...]:
        return (n, 16) if form == "unbatched" else (batch, n, 16) if batch_first else (n, batch, 16)

    query = torch.randn(shape(tokens), generator=gen, dtype=torch.float64, requires_grad=True)
    key = value = query
    if form == "cross":
        key, value = (torch.randn(shape(sources), generator=gen, dtype=torch.float64, requires_grad=True)
                      for _ in range(2))  # fmt: skip
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    if masks in ("bool", "both"):
        kwargs["attn_mask"] = torch.rand(tokens, sources, generator=gen) < 0.3
        kwargs["attn_mask"][:, 0] = False  # every token attends to some
    if masks == "per_head":
        masks_per_head = (1 if form == "unbatched" else batch) * 4
        kwargs["attn_mask"] = torch.randn(masks_per_head, tokens, sources, generator=gen, dtype=torch.float64)
    if masks == "causal":
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(tokens, dtype=torch.float64),
                      is_causal=True)  # fmt: skip
    if masks in ("padding", "both"):
        padding = torch.zeros(batch, sources, dtype=torch.bool)
        padding[1:, -2:] = True
        kwargs["key_padding_mask"] = padding[1] if form == "unbatched" else padding
    torch.manual_seed(1)  # the same dropout
    out, weights = attention(query, key, value, **kwargs)
    inputs = list(dict.fromkeys([query, key, value]))
    return out, weights, torch.autograd.grad(out.square().sum(), inputs)


CALLS = [(form, masks) for form in ("self", "unbatched", "cross")
         for masks in ("none", "bool", "padding", "both", "per_head", "causal") if (form, masks) != ("cross", "causal")]


@pytest.mark.parametrize("form, masks", CALLS)
def test_the_prepared_module_computes_as_nn_multihead_attention(form: str, masks: str) -> None:
    for batch_first, training, need_weights, average in itertools.product([False, True], repeat=4):
        torch.manual_seed(0)
        original = nn.MultiheadAttention(16, 4, dropout=0.25, batch_first=batch_first).double().train(training)
        with torch.no_grad():
            original.in_proj_bias.normal_()
            original.out_proj.bias.normal_()
        prepared = copy.deepcopy(original)
        prepare_modules(prepared)
        assert type(prepared) is HeadsMultiheadAttention and prepared.in_proj.weight is prepared.in_proj_weight
        expected = _call(original, form, batch_first, masks, need_weights, average)
        out, weights, grads = _call(prepared, form, batch_first, masks, need_weights, average)
        torch.testing.assert_close(out, expected[0])
        assert (weights is None) == (not need_weights)
        torch.testing.assert_close(weights, expected[1])
        torch.testing.assert_close(grads, expected[2])


def test_the_prepared_module_keeps_its_state_dict_and_parameters() -> None:
    torch.manual_seed(0)
    original = nn.MultiheadAttention(16, 4)
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1)  # made before: it must still train the module
    names = [name for name, _ in original.named_parameters()]
    prepared = copy.deepcopy(original)
    prepare_modules(prepared)
    assert [name for name, _ in prepared.named_parameters()] == names
    assert len(list(prepared.named_parameters(remove_duplicate=False))) == len(names) + 2  # in_proj: the same two
    assert list(prepared.state_dict()) == list(original.state_dict())
    fresh = nn.MultiheadAttention(16, 4)
    prepared.load_state_dict(fresh.state_dict())  # strict: a plain state dict loads, into in_proj too
    assert torch.equal(prepared.in_proj.weight, fresh.in_proj_weight) and prepared.in_proj.bias is prepared.in_proj_bias
    original.load_state_dict(prepared.state_dict())

    prepare_modules(original)
    x = torch.randn(5, 2, 16)
    original(x, x, x)[0].sum().backward()
    before = original.in_proj.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(original.in_proj.weight, before)
    assert original.double().in_proj.weight is original.in_proj_weight  # a conversion keeps them one


def test_a_vit_head_is_one_neuron_and_the_compact_attention_keeps_fewer_heads() -> None:
    torch.manual_seed(0)
    model = tiny_vit().double().eval()
    keys = list(model.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    assert list(model.state_dict()) == keys
    heads = heads_of(graph, VIT, "in_proj")
    assert len(heads) == 4 and graph.prunable[heads].all()
    per_channel = graph.gates[f"{VIT}.in_proj"].neurons.reshape(3, 4, 8)  # query, key, value rows of each head
    assert (per_channel == per_channel[:, :, :1]).all() and (per_channel == per_channel[:1]).all()
    assert graph.readers[f"{VIT}.out_proj"].reshape(4, 8).unique(dim=1).flatten().tolist() == heads
    other = "encoder.layers.encoder_layer_1.self_attention"
    masks = prune_neurons(model, graph, [heads[1], heads[3], heads_of(graph, other, "in_proj")[0]])
    compacted = compact(model, masks)
    attn = compacted.get_submodule(VIT)
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, 8, 32)
    assert attn.in_proj_weight is attn.in_proj.weight and attn.in_proj_bias is attn.in_proj.bias
    assert (attn.in_proj.out_features, attn.out_proj.in_features, attn.out_proj.out_features) == (48, 16, 32)
    kept = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    assert torch.equal(attn.in_proj_weight[:16], model.get_submodule(VIT).in_proj_weight[kept])  # heads 0, 2
    assert compacted.get_submodule(other).num_heads == 3
    assert list(compacted.state_dict()) == keys
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted_equals_counted(model, compacted, graph, masks, x)


def test_callback_removes_heads_of_a_users_attention_in_a_module_without_forward(tmp_path) -> None:
    torch.manual_seed(0)
    module, compacted = fit_to_half_flops(Tokens(), tmp_path, ignored_modules=["patches"])  # the embedding kept
    heads = [compacted.get_submodule(f"attentions.{i}").num_heads for i in range(2)]
    assert sum(heads) < 8, f"no head removed: {heads}"
    x = torch.randn(4, 3, 32, 32)
    assert_compact_equals_masked(module.net.eval(), compacted, x, dtypes=(torch.float32,))


class MyAttention(nn.MultiheadAttention):
    def forward(self, query, key, value):
        out, weights = super().forward(query, key, value)
        return 2 * out, weights


class CrossAttention(nn.Module):
    """Attends from the tokens to the tokens scaled by two."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, query, key, value):
        return self.attention(query, 2 * key, 2 * value)


class KeysOfTheirOwn(CrossAttention):
    """Keys and values of 16 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True, kdim=16, vdim=16)
        self.keys = nn.Linear(32, 16)

    def forward(self, query, key, value):
        key = self.keys(key)
        return self.attention(query, key, key)


class WeightsUsed(CrossAttention):
    def forward(self, query, key, value):
        out, weights = self.attention(query, key, value)
        return out + weights.mean(), None


@pytest.mark.parametrize("attention, reason", [
    (lambda: MyAttention(32, 4, batch_first=True), "MyAttention has its own forward"),
    (KeysOfTheirOwn, "own widths (kdim, vdim)"),
    (lambda: nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True), "add_bias_kv, add_zero_attn"),
    (CrossAttention, "its query, key and value are not one tensor"),
    (WeightsUsed, "its attention weights are used"),
], ids=["subclass", "kdim", "bias_kv", "cross", "weights"])  # fmt: skip
def test_attention_that_keeps_its_heads_says_why(attention, reason: str) -> None:
    model = Tokens(blocks=1, attention=attention)
    leaf = ["attentions.0"] if reason.startswith("MyAttention") else []  # torch.fx traces into a subclass
    graph = build_dependency_graph(model.eval(), torch.randn(2, 3, 32, 32), leaf_modules=leaf)
    assert not any(".in_proj" in gate for gate in graph.gates) and "mlps.0.0" in graph.gates
    assert any("attention attentions.0" in cause and reason in cause for cause in graph.causes), list(graph.causes)


def test_a_compact_vit_exports() -> None:
    from lightning_prune.compaction.export import export_program

    torch.manual_seed(0)
    model, x = tiny_vit().eval(), torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x)
    compacted = compact(model, prune_neurons(model, graph, heads_of(graph, VIT, "in_proj")[:3]))
    torch.testing.assert_close(export_program(compacted, x).module()(x), compacted(x))


def test_a_compact_vit_saved_loads_into_a_fresh_torchvision_model(tmp_path) -> None:
    from lightning_prune.compaction.serialization import load_compact, save_compact

    torch.manual_seed(0)
    model, x = tiny_vit().eval(), torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x)
    compacted = compact(model, prune_neurons(model, graph, heads_of(graph, VIT, "in_proj")[:3]))
    save_compact(compacted, tmp_path / "vit.pt")
    loaded = load_compact(tiny_vit().eval(), tmp_path / "vit.pt")
    assert loaded.get_submodule(VIT).num_heads == 1
    torch.testing.assert_close(loaded(x), compacted(x))
