"""``nn.TransformerEncoder`` in a user's model: traced through once prepared, computing what torch computes
with the same state dict, its heads and feed-forward neurons pruned, the compact model equal to the masked one."""

from __future__ import annotations

import copy

import pytest
import torch
from test_ops_gating import assert_compact_equals_masked, prune_neurons
from torch import nn

from helpers import NetOnly, heads_of, trainer
from lightning_prune import TaylorPruningCallback, build_dependency_graph, compact
from lightning_prune.ops.registry import prepare_modules


class SequenceClassifier(nn.Module):
    """What a user writes for sequences of features: ``(batch, tokens, features)`` in, an embedding, torch's
    encoder (4 heads of 8, feed-forward 64), mean over the tokens, a classifier."""

    def __init__(self, norm_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, activation="gelu", batch_first=True,
                                           norm_first=norm_first)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32) if norm_first else None,
                                             enable_nested_tensor=False)  # fmt: skip
        self.classify = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.encoder(self.embed(x), mask=mask).mean(dim=1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_prepared_encoder_computes_what_torch_computes(norm_first: bool) -> None:
    torch.manual_seed(0)
    model = SequenceClassifier(norm_first).double()
    original = copy.deepcopy(model)
    x, causal = torch.randn(3, 7, 6, dtype=torch.float64), nn.Transformer.generate_square_subsequent_mask(7)
    keys = list(model.state_dict())
    prepare_modules(model)
    assert type(model.encoder).__name__ == "TracedTransformerEncoder" and list(model.state_dict()) == keys
    for training in (True, False):
        model.train(training), original.train(training)
        for mask in (None, causal.double()):
            torch.testing.assert_close(model(x, mask), original(x, mask))
        with torch.no_grad():  # torch's fused fast path in eval mode
            torch.testing.assert_close(model(x), original(x))


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_heads_and_feed_forward_neurons_are_pruned_exactly(norm_first: bool) -> None:
    torch.manual_seed(0)
    model = SequenceClassifier(norm_first).double().eval()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    layers = [f"encoder.layers.{i}" for i in range(2)]
    stream = ("embed", *(f"{n}.{g}" for n in layers for g in ("self_attn.out_proj", "linear2")))  # through LayerNorms
    assert set(graph.gates) == {f"{n}.{g}" for n in layers for g in ("self_attn.in_proj", "linear1")} | set(stream)
    assert all(torch.equal(graph.gates[name].neurons, graph.gates["embed"].neurons) for name in stream)
    assert len(heads_of(graph, "encoder.layers.0.self_attn", "in_proj")) == 4
    removed = heads_of(graph, "encoder.layers.1.self_attn", "in_proj")[1:3]
    removed += graph.gates["encoder.layers.0.linear1"].neurons[::2].tolist()
    removed += graph.gates["embed"].neurons[[0, 9, 31]].tolist()
    compacted = compact(model, prune_neurons(model, graph, removed))
    assert compacted.get_submodule("encoder.layers.1.self_attn").num_heads == 2
    assert compacted.get_submodule("encoder.layers.0.linear1").out_features == 32
    assert compacted.get_submodule("embed").out_features == compacted.get_submodule("classify").in_features == 29
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))


def test_callback_prunes_a_users_sequence_transformer_without_forward(tmp_path) -> None:
    torch.manual_seed(0)
    module = NetOnly(SequenceClassifier(dropout=0.1))
    data = torch.utils.data.TensorDataset(torch.randn(64, 7, 6), torch.randint(0, 3, (64,)))
    callback = TaylorPruningCallback(target_flops_ratio=0.5, prune_every_n_batches=1, pruning_steps=3,
                                     compact_on_fit_end=True)  # fmt: skip
    trainer(max_steps=4, callbacks=[callback], default_root_dir=tmp_path).fit(
        module, torch.utils.data.DataLoader(data, batch_size=16))
    assert callback.done and callback.history[-1].flops <= 0.5 * callback.initial_flops
    compacted = callback.compact_model.eval()
    assert_compact_equals_masked(module.net.eval(), compacted, torch.randn(4, 7, 6), dtypes=(torch.float32,))
