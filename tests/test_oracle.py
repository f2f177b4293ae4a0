"""The oracle against brute force: removing neurons by zeroing their parameters and re-running the network."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallCNN, SmallResNet, synthetic_loader

from lightning_prune.importance.estimate import apply_alive, graph_for
from lightning_prune.oracle import combinatorial_oracle, greedy_oracle_pruning, oracle_importance, subset_losses


def _brute_loss(model, graph_model_fn, data, removed):
    pruned = copy.deepcopy(model)
    graph = graph_for(pruned, data[0])
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    alive[list(removed)] = False
    apply_alive(graph, alive)
    with torch.no_grad():
        total = sum(float(F.cross_entropy(pruned(x), y, reduction="sum")) for x, y in data)
    return total / sum(len(y) for _, y in data)


@pytest.mark.parametrize("net", [SmallCNN, SmallResNet])
def test_greedy_oracle_equals_brute_force_with_and_without_activation_reuse(net):
    torch.manual_seed(0)
    model = net().eval()
    data = list(synthetic_loader(8, 8))
    graph = graph_for(model, data[0])
    fast = oracle_importance(model, data, graph=graph)
    prunable = graph.prunable
    some = torch.nonzero(prunable).flatten()[::4].tolist()
    slow = oracle_importance(model, data, graph=graph, neurons=some, reuse_activations=False)
    assert torch.isnan(fast.signed[~prunable]).all()
    assert torch.allclose(fast.signed[some], slow.signed[some], atol=1e-6)
    assert torch.allclose(fast.squared[prunable], fast.signed[prunable].square())
    base = _brute_loss(model, None, data, [])
    assert fast.base_loss == pytest.approx(base, rel=1e-6)
    # brute force on a few neurons, including neurons tied across layers by residual additions
    picks = torch.nonzero(prunable).flatten().tolist()[:2] + torch.nonzero(prunable & graph.residual).flatten().tolist()[:2]
    for n in picks:
        assert float(fast.signed[n]) == pytest.approx(_brute_loss(model, None, data, [n]) - base, abs=1e-5)


def test_oracle_given_removed_neurons_and_subsets():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    data = list(synthetic_loader(16, 16))
    graph = graph_for(model, data[0])
    neurons = torch.nonzero(graph.prunable).flatten().tolist()
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    alive[neurons[:2]] = False
    scores = oracle_importance(model, data, graph=graph, alive=alive, neurons=neurons[2:5])
    base = _brute_loss(model, None, data, neurons[:2])
    assert scores.base_loss == pytest.approx(base, rel=1e-6)
    for n in neurons[2:5]:
        assert float(scores.signed[n]) == pytest.approx(_brute_loss(model, None, data, neurons[:2] + [n]) - base, abs=1e-5)
    _, losses = subset_losses(model, data, [neurons[5:8]], graph=graph)
    assert float(losses[0]) == pytest.approx(_brute_loss(model, None, data, neurons[5:8]), rel=1e-6)


def test_combinatorial_oracle_finds_the_best_subsets():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = list(synthetic_loader(16, 16))
    graph = graph_for(model, data[0])
    result = combinatorial_oracle(model, data, "bn1", graph=graph, ks=[1, 2])
    assert result.subsets_evaluated == 8 + 28
    singles = oracle_importance(model, data, graph=graph, neurons=result.neurons)
    best1 = min(result.neurons, key=lambda n: float(singles.signed[n]))
    assert result.best_subset[1] == [best1]
    assert result.best_loss[1] == pytest.approx(singles.base_loss + float(singles.signed[best1]), abs=1e-6)
    pairs = {p: _brute_loss(model, None, data, p) for p in itertools.combinations(result.neurons, 2)}
    best_pair = min(pairs, key=pairs.get)
    assert result.best_subset[2] == list(best_pair)
    assert result.best_loss[2] == pytest.approx(pairs[best_pair], abs=1e-5)
    assert result.worst_loss[2] == pytest.approx(max(pairs.values()), abs=1e-5)
    with pytest.raises(ValueError, match="too many"):
        combinatorial_oracle(model, data, "bn2", graph=graph, max_subsets=10)


def test_greedy_oracle_pruning_removes_the_least_harmful_neuron_each_step():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = list(synthetic_loader(16, 16))
    graph = graph_for(model, data[0])
    layer = sorted({int(n) for n in graph.gates["bn1"].neurons})
    result = greedy_oracle_pruning(model, data, graph=graph, steps=3, neurons=layer)
    assert len(result.removed) == 3 and set(result.removed) <= set(layer)
    assert result.pruned == [0, 1, 2, 3]
    first = oracle_importance(model, data, graph=graph, neurons=layer)
    assert result.removed[0] == min(layer, key=lambda n: float(first.signed[n]))
    assert result.loss[-1] == pytest.approx(_brute_loss(model, None, data, result.removed), abs=1e-5)
