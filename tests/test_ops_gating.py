"""Channel-wise gating (squeeze-and-excitation), layer scale and stochastic depth: their channels are
prunable, and the compact model computes exactly what the masked one does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import NetOnly, relative_error, synthetic_loader, trainer
from test_compaction import _flops, calibrate_batchnorm
from torch import nn

from lightning_prune import TaylorPruningCallback, build_dependency_graph, compact
from lightning_prune.importance.estimate import prune_once
from lightning_prune.pruner import NeuronSelector
from lightning_prune.pruner.cost import CostModel

TV = torchvision.models


class SqueezeExcite(nn.Module):
    """``x * gate(fc2(relu(fc1(pool(x)))))``, pooled by a module or, as timm does, by ``x.mean``."""

    def __init__(self, channels: int, squeeze: int, gate: type[nn.Module], mean: bool = False) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.gate, self.mean = gate(), mean

    def forward(self, x):
        pooled = x.mean((2, 3), keepdim=True) if self.mean else self.pool(x)
        return x * self.gate(self.fc2(torch.relu(self.fc1(pooled))))


class LinearSqueezeExcite(nn.Module):
    """The classic SE block: Linear layers on the pooled vector, ``.view(b, c, 1, 1)`` and ``expand_as``."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, squeeze), nn.ReLU(inplace=True), nn.Linear(squeeze, channels), nn.Sigmoid()
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = F.adaptive_avg_pool2d(x, 1).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class GatedNet(nn.Module):
    """conv-bn-relu, an SE block, conv-bn-relu, a linear head."""

    def __init__(self, se: nn.Module, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.se = se
        self.conv2, self.bn2 = nn.Conv2d(width, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.se(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class SigmoidMethod(nn.Module):
    """timm's ``Sigmoid`` layer: ``x.sigmoid()``, traced through."""

    def forward(self, x):
        return x.sigmoid()


class HardSigmoidFormula(nn.Module):
    """timm's ``hard_sigmoid``: ``relu6(x + 3) / 6``."""

    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


SE_BLOCKS = {
    "sigmoid": lambda: SqueezeExcite(8, 4, nn.Sigmoid),
    "hardsigmoid": lambda: SqueezeExcite(8, 4, nn.Hardsigmoid),
    "mean_and_sigmoid_method": lambda: SqueezeExcite(8, 4, SigmoidMethod, mean=True),
    "relu6_formula": lambda: SqueezeExcite(8, 4, HardSigmoidFormula),
    "linear_view_expand_as": lambda: LinearSqueezeExcite(8, 4),
}
SE_LAYERS = {  # (squeeze layer, excitation layer) of each block
    "linear_view_expand_as": ("se.fc.0", "se.fc.2"),
}


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters far from the identity, so removed channels would show."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def prune_neurons(model: nn.Module, graph, neurons: list[int]):
    """``prune_once`` removing exactly ``neurons`` (lowest scores), returning its masks."""
    scores = torch.ones(graph.num_neurons)
    scores[neurons] = 0.0
    return prune_once(model, scores, num=len(neurons), graph=graph)


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def assert_compact_equals_masked(
    model: nn.Module, compacted: nn.Module, x: torch.Tensor, seed: int | None = None, dtypes=tuple(TOLERANCE)
) -> None:
    """Relative error <= 1e-9 in float64 and <= 1e-4 in float32 (``dtypes``; float64 convolutions are slow
    on CPU). ``seed``: reseed before each forward (random ops in training mode draw the same numbers)."""
    for dtype in dtypes:
        tolerance = TOLERANCE[dtype]
        masked, small = copy.deepcopy(model).to(dtype), copy.deepcopy(compacted).to(dtype)
        outputs = []
        for net in (masked, small):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                outputs.append(net(x.to(dtype)))
        expected, got = outputs
        assert expected.abs().max() > 1e-3, "the masked output is ~0: the comparison would be vacuous"
        assert relative_error(got, expected) <= tolerance, (dtype, relative_error(got, expected))


@pytest.mark.parametrize("kind", SE_BLOCKS)
def test_squeeze_excitation_channels_and_bottleneck_are_prunable_and_compact_exactly(kind: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(GatedNet(SE_BLOCKS[kind]())).double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    squeeze, excite = SE_LAYERS.get(kind, ("se.fc1", "se.fc2"))
    # the features, the SE bottleneck and bn2 are gated; the excitation only scales bn1's channels: tied
    assert set(graph.gates) == {"bn1", squeeze, "bn2"} and graph.prunable[graph.gates["bn1"].neurons].all()
    assert torch.equal(graph.writers[excite], graph.gates["bn1"].neurons)
    assert graph.num_prunable == 8 + 4 + 6
    removed = graph.gates["bn1"].neurons[[0, 3, 5]].tolist() + graph.gates[squeeze].neurons[[1]].tolist()
    masks = prune_neurons(model, graph, removed)
    assert masks["bn1"].sum() == 5 and masks[squeeze].sum() == 3
    compacted = compact(model, masks)
    get = compacted.get_submodule
    if kind == "linear_view_expand_as":
        assert get(squeeze).in_features == 5 and get(squeeze).out_features == 3 and get(excite).out_features == 5
    else:
        assert get(squeeze).in_channels == 5 and get(squeeze).out_channels == 3 and get(excite).out_channels == 5
    assert get("conv2").in_channels == 5
    assert_compact_equals_masked(model, compacted, x)


class _AddedGate(nn.Module):
    """A sigmoid of a branch *added* to the features (not multiplied): removed channels would be 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 1)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.sigmoid(self.branch(x))
        y = torch.relu(self.bn2(self.conv2(x)))
        y = self.bn3(self.conv3(torch.sigmoid(y)))  # a sigmoid read by a convolution
        return self.fc(y.mean((2, 3)))


def test_a_sigmoid_not_multiplied_by_its_features_keeps_them_with_the_reason() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(_AddedGate()).double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    assert set(graph.gates) == {"bn3"} and graph.num_prunable == 5
    for layer, reader in (("bn1", "read by add"), ("branch", "read by add"), ("bn2", "read by Conv2d (conv3)")):
        reasons = {graph.blocked.get(n) for n in graph.writers[layer].tolist()}
        assert len(reasons) == 1, (layer, reasons)
        reason = reasons.pop()
        assert "output of sigmoid" in reason and reader in reason, (layer, reason)
    assert "sigmoid" in graph.describe() and "Conv2d (conv3)" in graph.describe()
    masks = prune_neurons(model, graph, graph.gates["bn3"].neurons[[1, 2]].tolist())
    compacted = compact(model, masks)
    assert compacted.get_submodule("conv3").out_channels == 3
    assert_compact_equals_masked(model, compacted, x)


class LayerScaleNet(nn.Module):
    """Residual blocks ``x + gamma * f(x)`` (``gamma`` of shape ``(C, 1, 1)``, also written ``f(x) * gamma``)
    and a hidden Linear layer scaled by a ``(C,)`` parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.f1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.f2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.gamma1 = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.gamma2 = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.hidden, self.gamma3, self.head = nn.Linear(8, 12), nn.Parameter(torch.rand(12) + 0.5), nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma1 * self.f1(x)
        x = torch.relu(x + self.f2(x) * self.gamma2)
        return self.head(torch.relu(self.hidden(x.mean((2, 3)))) * self.gamma3)


def test_layer_scale_keeps_channels_and_the_compact_model_slices_gamma() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(LayerScaleNet()).double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    assert set(graph.gates) == {"stem.1", "f1.1", "f2.1", "hidden"} and graph.num_prunable == 8 + 12
    stream = graph.gates["stem.1"].neurons
    assert torch.equal(graph.gates["f1.1"].neurons, stream) and torch.equal(graph.gates["f2.1"].neurons, stream)
    removed = stream[[2, 7]].tolist() + graph.gates["hidden"].neurons[[0, 4, 5]].tolist()
    compacted = compact(model, prune_neurons(model, graph, removed))
    for name, size in (("gamma1", (6, 1, 1)), ("gamma2", (6, 1, 1)), ("gamma3", (9,))):
        assert compacted.get_parameter(name).shape == size, name  # a smaller parameter, not an index
    assert not [n for n in compacted.graph.nodes if n.target == "index_select"]
    assert compacted.get_submodule("head").in_features == 9
    assert_compact_equals_masked(model, compacted, x)


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """timm's ``drop_path``, as timm writes it."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class DropPath(_DropPath):
    """timm's ``DropPath`` (timm is not a dependency): the library knows it by its import path."""


DropPath.__module__ = "timm.layers.drop"


class TracedDropPath(_DropPath):
    """A DropPath no rule names: traced through (``new_empty``, ``bernoulli_``, a product per sample)."""


class StochasticDepthNet(nn.Module):
    """Residual blocks dropped by torchvision's StochasticDepth, timm's DropPath and a traced DropPath."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8)
            )
            for _ in range(3)
        )
        self.drops = nn.ModuleList([torchvision.ops.StochasticDepth(p, "row"), DropPath(p), TracedDropPath(p)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        for block, drop in zip(self.blocks, self.drops):
            x = x + drop(block(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("train", [False, True])
def test_stochastic_depth_passes_channels_through(train: bool) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(StochasticDepthNet(p=0.5)).double().train(train)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    one_op = {str(n.target) for n in graph.traced.graph.nodes if n.op == "call_module"}
    assert {"drops.0", "drops.1"} <= one_op and "drops.2" not in one_op  # by class, by import path; traced
    assert graph.num_prunable == 8 + 3 * 6 and graph.prunable[graph.gates["stem.1"].neurons].all()
    assert graph.residual[graph.gates["blocks.2.4"].neurons].all()
    removed = graph.gates["stem.1"].neurons[[1, 6]].tolist() + graph.gates["blocks.0.1"].neurons[[0]].tolist()
    masks = prune_neurons(model, graph, removed)
    compacted = compact(model, masks)
    assert compacted.training == train and compacted.get_submodule("blocks.2.3").out_channels == 6
    assert_compact_equals_masked(model, compacted, x, seed=7 if train else None)
    if train:  # another seed drops other paths: the comparison saw stochastic depth at work
        outputs = []
        for seed in (7, 8):
            torch.manual_seed(seed)
            with torch.no_grad():
                outputs.append(compacted(x))
        assert relative_error(*outputs) > 1e-3


class FunctionalDropoutNet(nn.Module):
    """A classifier head with ``F.dropout(training=self.training)`` (timm's GhostNet, many user models)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())  # no BatchNorm: modes differ by dropout
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x).mean((2, 3))
        return self.fc(F.dropout(x, p=0.5, training=self.training))


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_functional_dropout_follows_the_compact_networks_mode(traced_in: str) -> None:
    """Tracing freezes ``training=self.training``: the compact network must drop in train mode only,
    whichever mode the graph was traced in."""
    torch.manual_seed(0)
    model = FunctionalDropoutNet().double().train(traced_in == "train")
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    compacted = compact(model, prune_neurons(model, graph, graph.gates["stem.0"].neurons[[2, 5]].tolist()))
    assert compacted.get_submodule("stem.0").out_channels == 6
    assert_compact_equals_masked(model.eval(), compacted.eval(), x, dtypes=(torch.float64,))
    with torch.no_grad():  # in train mode it drops (element-wise draws differ between widths: no comparison)
        assert relative_error(compacted.train()(x), compacted.eval()(x)) > 1e-3


# torchvision networks with SE blocks (and stochastic depth): model -> layers that must be gates
TORCHVISION = {
    "mobilenet_v3_small": ("features.1.block.1.fc1", "features.4.block.2.fc1"),
    "efficientnet_b0": ("features.1.0.block.1.fc1", "features.2.0.block.2.fc1"),
    "regnet_y_400mf": ("trunk_output.block1.block1-0.f.se.fc1",),
}


NETWORK_IO = ("reach the network output", "are the network input x")


def assert_only_kept_for(graph, causes: tuple[str, ...]) -> None:
    """Every unprunable neuron is kept for one of ``causes`` (reason prefixes)."""
    unexpected = {reason for reason in graph.blocked.values() if not reason.startswith(causes)}
    assert not unexpected, unexpected


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnet_y_400mf"])
def test_torchvision_se_networks_prune_40_percent_of_flops_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(TV, name)(weights=None, num_classes=10)
    calibrate_batchnorm(model, 32)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x[:1])
    assert all(layer in graph.gates for layer in TORCHVISION[name])
    assert_only_kept_for(graph, NETWORK_IO)  # regnet_y: its grouped convolutions are prunable too
    # the fewest random-score neurons that take the FLOPs to 60%
    scores = torch.rand(graph.num_neurons, generator=torch.Generator().manual_seed(0))
    cost, selector = CostModel(model, x[:1], graph), NeuronSelector(graph)
    full, alive = cost.flops(torch.ones(graph.num_neurons, dtype=torch.bool)), None
    for count in range(graph.num_prunable // 20, graph.num_prunable, graph.num_prunable // 20):
        alive = torch.ones(graph.num_neurons, dtype=torch.bool)
        alive[selector.select(scores, alive, count)] = False
        if cost.flops(alive) <= 0.6 * full:
            break
    masks = prune_once(model, scores, num=count, graph=graph)
    compacted = compact(model, masks)
    assert _flops(compacted, x[:1]) <= 0.62 * _flops(model, x[:1])
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float32,))


def test_callback_halves_mobilenet_v3_flops_in_a_module_without_forward() -> None:
    torch.manual_seed(0)
    net = TV.mobilenet_v3_small(weights=None, num_classes=10)
    calibrate_batchnorm(net, 32)
    callback = TaylorPruningCallback(
        prune_every_n_batches=1, neurons_per_step=0.3, target_flops_ratio=0.5,
        criterion="random", criterion_kwargs={"seed": 0},
    )  # fmt: skip
    trainer(max_steps=4, callbacks=[callback]).fit(NetOnly(net), synthetic_loader(n=16, batch_size=4, size=32))
    assert callback.done and "FLOPs target" in callback.stop_reason
    graph = callback.graph
    assert all(prefixed in graph.gates for prefixed in ("net." + n for n in TORCHVISION["mobilenet_v3_small"]))
    assert_only_kept_for(graph, NETWORK_IO)
    compacted = compact(net, callback.masks)
    x = torch.randn(2, 3, 32, 32)
    assert _flops(compacted.eval(), x[:1]) <= 0.55 * _flops(net.eval(), x[:1])
    assert_compact_equals_masked(net, compacted, x, dtypes=(torch.float32,))
