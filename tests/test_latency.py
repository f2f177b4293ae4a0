"""The latency table (measuring, caching, the latency model) and the knapsack selection under a latency budget."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import platform
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_prune.latency.table as table_module
from helpers import SmallCNN, synthetic_time
from lightning_prune import LatencySelector, LatencyTable, build_dependency_graph, compact
from lightning_prune.compaction import masks_from_alive
from lightning_prune.latency.selection import _knapsack
from lightning_prune.models import cifar_resnet20
from lightning_prune.pruner.selection import NeuronSelector


def seconds(table: LatencyTable) -> dict[str, tuple[list[float], list[float]]]:
    return {name: (layer.in_seconds, layer.out_seconds) for name, layer in table.layers.items()}


def test_cache_key_and_reuse(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    table = LatencyTable.build(SmallCNN(), x, batch_size=4, progress=False)
    (path,) = (tmp_path / "latency").glob("*.json")
    data = json.loads(path.read_text())
    assert data["env"] == table.env and table.env["batch"] == 4 and table.env["dtype"] == "torch.float32"
    assert set(table.env) == {"device", "torch", "threads", "batch", "dtype", "memory_format", "allocator"}
    # + the network at full and at half width, timed in turn 3 times
    assert table.measurements == len(counted) - 4 == sum(map(len, data["layers"].values())) + 2
    assert [type(m) is SmallCNN for m in counted[-6:]] == [True, False] * 3
    # again: everything from the cache
    counted.clear()
    again = LatencyTable.build(SmallCNN(), x, batch_size=4, progress=False)
    assert again.measurements == 0 and not counted and seconds(again) == seconds(table)
    # another network sharing the layer shapes but the last: only that layer (at its 3 input widths) and
    # the network are measured
    other = LatencyTable.build(SmallCNN(num_classes=7), x, batch_size=4, progress=False)
    assert [type(m) for m in counted[:4]] == [nn.Linear] * 3 + [SmallCNN] and len(counted) == 3 + 6
    assert seconds(other)["conv2"] == seconds(table)["conv2"]
    # another batch size: another file
    LatencyTable.build(SmallCNN(), x, batch_size=2, progress=False)
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2
    # another allocator: another file
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    kept = LatencyTable.build(SmallCNN(), x, batch_size=2, progress=False)
    assert kept.env["allocator"] == "MALLOC_MMAP_MAX_=0" and kept.measurements
    assert len(list((tmp_path / "latency").glob("*.json"))) == 3


def test_the_cpu_allocator_is_recorded_and_glibcs_default_warned_about(tmp_path, monkeypatch, counted):
    for name in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD", "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"glibc's default malloc.*MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_="):
        table = LatencyTable.build(SmallCNN(), x, cache_dir=tmp_path, progress=False)
    assert table.env["allocator"] == "default"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatencyTable.build(SmallCNN(), x, cache_dir=tmp_path, progress=False)  # all from the cache: nothing timed
        monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
        monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1:glibc.rtld.nns=2")
        assert LatencyTable.build(SmallCNN(), x, cache_dir=tmp_path, progress=False).env["allocator"] == (
            "libjemalloc.so.2 glibc.malloc.trim_threshold=1"
        )


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
    unit = table_module._Unit(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
    assert conv2.seconds(8, 12) == synthetic_time(unit, (torch.empty(2, 8, 8, 8),), {}, 0, 0)
    assert conv2.seconds(8, 11) == conv2.seconds(8, 12) and conv2.seconds(8, 1) == conv2.seconds(8, 4)
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    total = sum(layer.full for layer in table.layers.values())
    assert table.rest == pytest.approx(1e-3 - total) and table.predict(alive) == pytest.approx(1e-3)
    assert pickle.loads(pickle.dumps(table)).predict(alive) == table.predict(alive)  # broadcast under DDP


class Stream(nn.Module):
    """A residual stream of 1x1 conv-BN blocks, each added to the stream and followed by a ReLU, then pooled:
    the additions, the ReLUs and the pooling write as many elements per channel as the blocks."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.convs = nn.ModuleList([nn.Conv2d(width, width, 1) for _ in range(3)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(width) for _ in range(3)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(x + bn(conv(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("alone", [1.0, 1.5])
def test_the_rest_of_the_network_shrinks_with_the_activations_it_writes(tmp_path, layered, monkeypatch, alone):
    """Residual additions, the ReLUs after them and the pooling write fewer elements when the stream loses
    channels. Fitted through the network at full and at half width, the table predicts that; a constant
    rest of the network would not. With ``alone`` 1.5 a layer timed alone takes 1.5 times what it takes
    inside the network: the fit scales the layers back."""
    layered.per_element = 1e-9  # every op but a Conv/Linear costs 1 ns per element it writes
    inside = table_module._time
    monkeypatch.setattr(table_module, "_time", lambda module, *args: inside(module, *args) * (
        alone if isinstance(module, (table_module._Unit, nn.Conv2d, nn.Linear)) else 1.0))
    model, x = Stream(), torch.randn(2, 3, 16, 16)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, width_step=4, progress=False)
    stream = graph.gates["stem.1"].neurons
    assert table.volume[stream].sum() > 0.99 and table.rest_scaled > 10 * table.rest
    unit = table_module._Unit(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))  # what it costs inside the network
    assert table.layers["convs.0"].full == pytest.approx(synthetic_time(unit, (torch.empty(2, 16, 16, 16),), {}, 0, 0),
                                                         rel=0.02)  # fmt: skip
    for keep in (12, 8, 4):
        alive = torch.ones(graph.num_neurons, dtype=torch.bool)
        alive[stream[keep:]] = False
        compacted = compact(model, masks_from_alive(graph, alive), graph=graph)
        (measured,) = table.measure([compacted], x, rounds=1)
        predicted = table.predict(alive)
        constant = predicted - table.rest_seconds(alive) + table.rest + table.rest_scaled
        assert predicted == pytest.approx(measured, rel=0.03), keep  # (the layers' separable model errs too)
        assert constant - measured > 5 * abs(predicted - measured), keep


@pytest.fixture
def one_thread():
    """One intra-op thread: on a CPU shared with other jobs, a thread waiting for a busy core makes every
    op last a scheduler time slice, whatever its width."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measured_latency_grows_with_width(tmp_path, one_thread):
    """Real timings: on average over layers, the narrowest widths are faster than the full ones."""
    layers = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    layers += [m for _ in range(3) for m in (nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Conv2d(32, 4, 1))
    x = torch.randn(8, 3, 32, 32)  # big enough that the widths, not the noise of a busy machine, decide
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, warmup=2, repeats=7, progress=False)
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


class Followers(nn.Module):
    """Conv/Linear layers followed by BatchNorms and activations in every form the table recognises, and
    ones it must not time with them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)  # + F.relu
        self.c2, self.b2, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.c3, self.a3 = nn.Conv2d(8, 8, 1), nn.GELU(approximate="tanh")  # no BatchNorm
        self.c4, self.b4 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)  # + .relu()
        self.c5, self.b5 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)  # BN, then an addition
        self.c6 = nn.Conv2d(8, 8, 1)  # its output read twice: nothing
        self.fc, self.bfc = nn.Linear(8, 6), nn.BatchNorm1d(6)  # + F.silu
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.c2(x)))
        x = self.a3(self.c3(x))
        x = self.b4(self.c4(x)).relu()
        x = F.relu(self.b5(self.c5(x)) + x)
        y = self.c6(x)
        x = y * torch.sigmoid(y)
        return self.head(F.silu(self.bfc(self.fc(x.mean((2, 3))))))


def test_layers_are_timed_with_their_batchnorm_and_activation(tmp_path, counted):
    model, x = Followers(), torch.randn(2, 3, 8, 8)
    graph = build_dependency_graph(model, x)
    specs = table_module._layer_specs(model, (x,), {}, graph)
    after = {name: {k: spec[k] for k in ("bn", "act") if k in spec} for name, spec in specs.items()}
    assert after == {
        "c1": {"bn": "BatchNorm2d", "act": "ReLU"},
        "c2": {"bn": "BatchNorm2d", "act": "ReLU(inplace)"},
        "c3": {"act": "GELU(tanh)"},
        "c4": {"bn": "BatchNorm2d", "act": "ReLU"},
        "c5": {"bn": "BatchNorm2d"},
        "c6": {},
        "fc": {"bn": "BatchNorm1d", "act": "SiLU"},
        "head": {},
    }
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, width_step=4, progress=False)
    units = {tuple(type(m).__name__ for m in unit) for unit in counted if isinstance(unit, table_module._Unit)}
    assert ("Conv2d", "BatchNorm2d", "ReLU") in units and ("Linear", "BatchNorm1d", "SiLU") in units
    normed = [u for u in counted if isinstance(u, table_module._Unit) and isinstance(u[1], nn.BatchNorm2d)]
    assert normed and all(unit[1].num_features == unit[0].out_channels for unit in normed)
    # the cache keys say what was timed with each layer
    (path,) = tmp_path.glob("*.json")
    keys = [json.loads(key) for key in json.loads(path.read_text())["layers"]]
    inplace = next(k for k in keys if "inplace" in k.get("act", ""))
    assert inplace["bn"] == "BatchNorm2d" and inplace["act"] == "ReLU(inplace)"
    assert table.measurements > 0


def test_batchnorm_and_activation_time_follows_the_width(tmp_path, monkeypatch, counted):
    """A conv-BN-ReLU network at half width: timed with their layers, BatchNorm and ReLU shrink with them,
    so the prediction is lower than when they are left at full width in the rest of the network."""
    model, x = SmallCNN(), torch.randn(2, 3, 16, 16)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path / "with", width_step=4, progress=False)
    monkeypatch.setattr(table_module, "_followers", lambda graph: {})
    alone = LatencyTable.build(model, x, graph, cache_dir=tmp_path / "alone", width_step=4, progress=False)
    full = torch.ones(graph.num_neurons, dtype=torch.bool)
    half = full.clone()
    for gate in graph.gates.values():
        half[gate.neurons[gate.channels // 2 :]] = False
    assert table.predict(full) == pytest.approx(alone.predict(full)) == pytest.approx(1e-3)  # the network
    assert table.rest < alone.rest
    assert table.predict(half) < alone.predict(half)
    conv1 = table.layers["conv1"]
    values = 2 * 16 * 16  # output values per channel, timed twice (BatchNorm and ReLU)
    assert conv1.full - conv1.seconds(3, 4) == pytest.approx(
        alone.layers["conv1"].full - alone.layers["conv1"].seconds(3, 4) + 2 * 1e-9 * values * 4
    )


def test_calibration_through_two_measured_points(tmp_path, counted):
    model, x = SmallCNN(), torch.randn(2, 3, 16, 16)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, width_step=4, progress=False)
    full = torch.ones(graph.num_neurons, dtype=torch.bool)
    half = full.clone()
    for gate in graph.gates.values():
        half[gate.neurons[gate.channels // 2 :]] = False
    calibrated = table.calibrated(half, 0.4e-3, 1.5e-3)
    assert calibrated.predict(full) == pytest.approx(1.5e-3) and calibrated.predict(half) == pytest.approx(0.4e-3)
    slope = calibrated.env["calibration"]["slope"]
    quarter = half.clone()
    for gate in graph.gates.values():
        quarter[gate.neurons[gate.channels // 4 :]] = False
    assert calibrated.predict(full) - calibrated.predict(quarter) == pytest.approx(
        slope * (table.predict(full) - table.predict(quarter))
    )
    # the full network alone fixes no slope: the prediction is scaled
    scaled = table.calibrated(full, 2e-3, 2e-3)
    assert scaled.predict(half) == pytest.approx(2 * table.predict(half))
    assert pickle.loads(pickle.dumps(calibrated)).predict(half) == calibrated.predict(half)


def test_measure_pairs_each_round_with_the_first_model(tmp_path, counted, monkeypatch):
    """A load spike during some rounds: the ratio to the full network comes from rounds timed together."""
    model, x = SmallCNN(), torch.randn(2, 3, 16, 16)
    table = LatencyTable.build(model, x, build_dependency_graph(model, x), cache_dir=tmp_path, progress=False)
    timings = iter([1.0, 0.5, 1.0, 1.5, 3.0, 1.5])  # (full, small) per round: a spike, then a longer one
    monkeypatch.setattr(table_module, "_time_network", lambda *args: next(timings))
    full, small = table.measure([model, model], x, rounds=3)
    assert full == 1.0 and small == pytest.approx(0.5)  # the medians alone would say 1.0 and 1.5


def test_depthwise_convolution(tmp_path, counted):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )  # fmt: skip
    table = LatencyTable.build(model, torch.randn(2, 3, 8, 8), cache_dir=tmp_path, progress=False)
    depthwise = table.layers["3"]
    assert depthwise.in_widths == [16] and depthwise.out_widths == [8, 16]
    convs = [m[0] if isinstance(m, table_module._Unit) else m for m in counted]
    grouped = [(m.in_channels, m.out_channels, m.groups) for m in convs if isinstance(m, nn.Conv2d) and m.groups > 1]
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


@pytest.mark.parametrize("width_step, rest_ms", [(1, 0.0), (2, 0.0), (1, 1.0)])
def test_selection_is_the_brute_force_optimum(tmp_path, monkeypatch, width_step, rest_ms):
    """Latency of a layer here depends on its output width only (as its kernel size says), so the three
    groups are independent and the knapsack is exact; with ``rest_ms`` the mean over the last layer's
    output costs that much per channel, which the table fits and the knapsack counts."""
    curves = {3: [1, 2, 4, 5], 1: [3, 3, 4, 9], 5: [2, 6, 7, 8]}  # ms at output widths 1..4

    def timer(m, *args):
        if isinstance(m, table_module._Unit):
            return curves[m[0].kernel_size[0]][m[0].out_channels - 1] * 1e-3
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        if len(convs) < 3:  # the head alone
            return 0.0
        return sum(curves[c.kernel_size[0]][c.out_channels - 1] for c in convs) * 1e-3 + convs[-1].out_channels * rest_ms * 1e-3

    monkeypatch.setattr(table_module, "_time", timer)
    model, x = ThreeGroups(), torch.randn(2, 3, 6, 6)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, width_step=width_step, progress=False)
    assert table.rest_seconds(torch.ones(graph.num_neurons, dtype=torch.bool)) == pytest.approx(4 * rest_ms * 1e-3)
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


def test_neurons_scoring_zero_stay_while_the_budget_allows(tmp_path, counted):
    """Dead or untrained neurons score exactly 0: removing them costs no value, but a step must not remove
    more than its budget asks (it would overshoot the schedule and the target)."""
    model, x = cifar_resnet20(), torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x)
    table = LatencyTable.build(model, x, graph, cache_dir=tmp_path, progress=False)
    scores = torch.rand(graph.num_neurons, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scores[::3] = 0.0
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    selector = LatencySelector(graph, table)
    assert torch.equal(selector.select(scores, alive, table.predict(alive)), alive)
    chosen = selector.select(scores, alive, 0.9 * table.predict(alive))
    assert 0.8 * table.predict(alive) < table.predict(chosen) <= 0.9 * table.predict(alive)  # 8 channels of
    # a 16-channel stream are the smallest step here


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
