"""The latency table (measuring, caching, the latency model) and the knapsack selection under a latency budget."""

from __future__ import annotations

import itertools
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_prune.latency.table as table_module
from helpers import SmallCNN
from lightning_prune import LatencySelector, LatencyTable, build_dependency_graph
from lightning_prune.latency.selection import _knapsack
from lightning_prune.models import cifar_resnet20
from lightning_prune.pruner.selection import NeuronSelector


def synthetic_time(module, args, kwargs, warmup, repeats):
    """Seconds a device computing channels in blocks of 8 would take; the whole network: 1 ms."""
    if isinstance(module, nn.Conv2d):
        positions = args[0].shape[0] * args[0].shape[-1] * args[0].shape[-2] / module.stride[0] ** 2
        blocks = math.ceil(module.out_channels / 8) * math.ceil(module.in_channels / 8)
        return 1e-6 + 1e-9 * blocks * 64 * positions * module.kernel_size[0] ** 2 / module.groups
    if isinstance(module, nn.Linear):
        return 1e-6 + 1e-9 * module.in_features * module.out_features
    return 1e-3


def seconds(table: LatencyTable) -> dict[str, tuple[list[float], list[float]]]:
    return {name: (layer.in_seconds, layer.out_seconds) for name, layer in table.layers.items()}


@pytest.fixture
def counted(monkeypatch):
    """Replace the timer by ``synthetic_time``; the list of timed modules."""
    calls = []

    def timer(module, *rest):
        calls.append(module)
        return synthetic_time(module, *rest)

    monkeypatch.setattr(table_module, "_time", timer)
    return calls


def test_cache_key_and_reuse(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    table = LatencyTable.build(SmallCNN(), x, batch_size=4, progress=False)
    (path,) = (tmp_path / "latency").glob("*.json")
    data = json.loads(path.read_text())
    assert data["env"] == table.env and table.env["batch"] == 4 and table.env["dtype"] == "torch.float32"
    assert set(table.env) == {"device", "torch", "threads", "batch", "dtype", "memory_format"}
    assert table.measurements == len(counted) == sum(map(len, data["layers"].values())) + 1  # + the network
    # again: everything from the cache
    counted.clear()
    again = LatencyTable.build(SmallCNN(), x, batch_size=4, progress=False)
    assert again.measurements == 0 and not counted and seconds(again) == seconds(table)
    # another network sharing the layer shapes but the last: only that layer (at its 3 input widths) and
    # the network are measured
    other = LatencyTable.build(SmallCNN(num_classes=7), x, batch_size=4, progress=False)
    assert [type(m) for m in counted] == [nn.Linear] * 3 + [SmallCNN]
    assert seconds(other)["conv2"] == seconds(table)["conv2"]
    # another batch size: another file
    LatencyTable.build(SmallCNN(), x, batch_size=2, progress=False)
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2


def test_model_is_exact_at_measured_points(tmp_path, counted):
    model, x = SmallCNN(), torch.randn(2, 3, 16, 16)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, width_step=4, progress=False)
    conv2 = table.layers["conv2"]
    assert conv2.in_widths == [4, 8] and conv2.out_widths == [4, 8, 12, 16]
    assert table.layers["fc1"].in_widths == [64, 128, 192, 256]  # 4 channels of 4x4 positions
    assert table.layers["conv1"].in_widths == [3]  # the network input is not pruned
    for layer in table.layers.values():
        fin, fout = layer.in_widths[-1], layer.out_widths[-1]
        assert [layer.seconds(i, fout) for i in layer.in_widths] == pytest.approx(layer.in_seconds, rel=1e-12)
        assert [layer.seconds(fin, o) for o in layer.out_widths] == pytest.approx(layer.out_seconds, rel=1e-12)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    assert conv2.seconds(8, 12) == synthetic_time(conv, (torch.empty(2, 8, 8, 8),), {}, 0, 0)
    assert conv2.seconds(8, 11) == conv2.seconds(8, 12) and conv2.seconds(8, 1) == conv2.seconds(8, 4)
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    total = sum(layer.full for layer in table.layers.values())
    assert table.rest == pytest.approx(1e-3 - total) and table.predict(alive) == pytest.approx(1e-3)
    assert pickle.loads(pickle.dumps(table)).predict(alive) == table.predict(alive)  # broadcast under DDP


def test_measured_latency_grows_with_width(tmp_path):
    """Real timings: on average over layers, the narrowest widths are faster than the full ones."""
    layers = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    layers += [m for _ in range(3) for m in (nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Conv2d(32, 4, 1))
    x = torch.randn(8, 3, 16, 16)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, warmup=1, repeats=3, progress=False)
    assert table.measurements > 0
    ratios = [layer.out_seconds[0] / layer.full for layer in table.layers.values() if len(layer.out_widths) > 1]
    assert np.mean(ratios) < 1
    narrow = torch.zeros(graph.num_neurons, dtype=torch.bool)
    narrow[~graph.prunable] = True
    for gate in graph.gates.values():
        narrow[gate.neurons[:8]] = True
    assert table.predict(narrow) < table.predict(torch.ones(graph.num_neurons, dtype=torch.bool))
    table.plot(tmp_path / "latency.png")
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_depthwise_convolution(tmp_path, counted):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )  # fmt: skip
    table = LatencyTable.build(model, torch.randn(2, 3, 8, 8), cache_dir=tmp_path, progress=False)
    depthwise = table.layers["3"]
    assert depthwise.in_widths == [16] and depthwise.out_widths == [8, 16]
    grouped = [(m.in_channels, m.out_channels, m.groups) for m in counted if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped == [(8, 8, 8), (16, 16, 16)]
    assert depthwise.seconds(8, 8) == depthwise.out_seconds[0]


def test_knapsack_dynamic_programme_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        groups = int(rng.integers(1, 5))
        values = [rng.random(int(rng.integers(1, 5))) for _ in range(groups)]
        costs = [rng.integers(0, 10, v.size) / 1000 for v in values]
        capacity = float(rng.integers(0, 30)) / 1000
        picks = _knapsack(values, costs, capacity, bins=3000)
        feasible = [
            sum(v[j] for v, j in zip(values, combo))
            for combo in itertools.product(*(range(v.size) for v in values))
            if sum(c[j] for c, j in zip(costs, combo)) <= capacity + 1e-12
        ]
        if feasible:
            assert sum(c[j] for c, j in zip(costs, picks)) <= capacity + 1e-12
            assert sum(v[j] for v, j in zip(values, picks)) == pytest.approx(max(feasible))
        else:
            assert picks == [int(c.argmin()) for c in costs]


class ThreeGroups(nn.Module):
    """Three conv-BN-ReLU layers of 4 channels: three groups of 4 prunable neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 5, padding=2)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(4) for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("width_step", [1, 2])
def test_selection_is_the_brute_force_optimum(tmp_path, monkeypatch, width_step):
    """Latency of a layer here depends on its output width only (as its kernel size says), so the three
    groups are independent and the knapsack is exact."""
    curves = {3: [1, 2, 4, 5], 1: [3, 3, 4, 9], 5: [2, 6, 7, 8]}  # ms at output widths 1..4
    monkeypatch.setattr(
        table_module,
        "_time",
        lambda m, *rest: curves[m.kernel_size[0]][m.out_channels - 1] * 1e-3 if isinstance(m, nn.Conv2d) else 0.0,
    )
    model, x = ThreeGroups(), torch.randn(2, 3, 6, 6)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, width_step=width_step, progress=False)
    neurons = torch.cat([graph.gates[f"bns.{i}"].neurons for i in range(3)])
    assert neurons.unique().numel() == 12 and graph.prunable[neurons].all()
    scores = torch.rand(graph.num_neurons, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    selector = LatencySelector(graph, table)
    masks = []
    for bits in itertools.product([False, True], repeat=12):
        mask = alive.clone()
        mask[neurons] = torch.tensor(bits)
        widths = mask[neurons].view(3, 4).sum(1)
        if (widths >= 1).all() and ((widths % width_step == 0) | (widths == 4)).all():
            masks.append((table.predict(mask), float(scores[mask].sum()), mask))
    for budget_ms in [3.5, 5.5, 8.5, 10.5, 12.5, 15.5, 18.5]:  # between sums of whole ms: no tie
        budget = budget_ms * 1e-3
        best = max((m for m in masks if m[0] <= budget), key=lambda m: m[1], default=None)
        chosen = selector.select(scores, alive, budget)
        if best is None:  # below the floors: the fastest choice
            assert table.predict(chosen) == min(m[0] for m in masks)
        else:
            assert table.predict(chosen) <= budget and torch.equal(chosen, best[2])


@pytest.mark.parametrize("ratio", [0.8, 0.5])
def test_selection_on_resnet20_beats_greedy_at_equal_latency(tmp_path, counted, ratio):
    model, x = cifar_resnet20(), torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, progress=False)
    scores = torch.rand(graph.num_neurons, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) ** 2
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    alive[graph.gates["layer3.0.bn1"].neurons[:5]] = False  # already removed: stay removed
    greedy, selector = alive.clone(), NeuronSelector(graph, min_channels=4)
    while table.predict(greedy) > ratio * table.predict(alive):
        removed = selector.select(scores, greedy, 4)
        assert removed.numel()
        greedy[removed] = False
    budget = table.predict(greedy)
    chosen = LatencySelector(graph, table, min_channels=4).select(scores, alive, budget)
    assert table.predict(chosen) <= budget
    assert scores[chosen].sum() >= scores[greedy].sum()
    assert not (chosen & ~alive).any() and chosen[~graph.prunable].all()
    assert min(int(chosen[gate.neurons].sum()) for gate in graph.gates.values()) >= 4
