"""Grouped convolutions (ResNeXt, RegNet): channel i of every group is one neuron on both sides of the
convolution, so the compact one keeps its groups with fewer channels in each, and equals the masked one."""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_ops_gating import assert_compact_equals_masked, prune_neurons, randomize_batchnorm
from torch import nn

from lightning_prune import build_dependency_graph, compact
from lightning_prune.pruner.cost import CostModel


class GroupedBottleneck(nn.Module):
    """1x1 conv, 3x3 grouped conv (4 groups of 4), 1x1 conv, residual; with a channel-multiplier conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU())
        self.conv3 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.multiplier = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # one input channel per group
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.conv3(self.conv2(self.conv1(x))))
        return self.fc(self.multiplier(x).mean((2, 3)))


def test_grouped_convolution_keeps_the_same_channels_in_every_group() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(GroupedBottleneck()).double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    for name in ("conv1.1", "conv2.1"):  # 16 channels, 4 neurons: channel i of each group
        neurons = graph.gates[name].neurons.reshape(4, 4)
        assert (neurons == neurons[0]).all() and neurons[0].unique().numel() == 4
        assert graph.prunable[neurons].all()
    assert "stem.1" not in graph.gates  # its channels flow into the channel multiplier: not prunable
    removed = graph.gates["conv1.1"].neurons[[1]].tolist() + graph.gates["conv2.1"].neurons[[0, 3]].tolist()
    masks = prune_neurons(model, graph, removed)
    compacted = compact(model, masks)
    conv = compacted.get_submodule("conv2.0")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (4, 12, 8)
    assert conv.weight.shape == (8, 3, 3, 3)
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted = CostModel(model, x, graph).flops(graph.alive_from_masks(masks))
    assert predicted == pytest.approx(CostModel(compacted, x, build_dependency_graph(compacted, x)).total_flops)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_y_400mf"])
def test_torchvision_grouped_networks_prune_inside_their_groups(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name, weights=None, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x)
    assert graph.num_prunable / graph.num_neurons > 0.5
    torch.manual_seed(1)
    candidates = torch.nonzero(graph.prunable).flatten()
    removed = candidates[torch.randperm(candidates.numel())[: candidates.numel() // 3]].tolist()
    compacted = compact(model, prune_neurons(model, graph, removed))
    grouped = [m for m in compacted.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    original = [m for m in model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert grouped and sum(m.weight.numel() for m in grouped) < sum(m.weight.numel() for m in original)
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float32,))
