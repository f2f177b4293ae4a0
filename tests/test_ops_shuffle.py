"""Channel split (``chunk``, ``split``, ``tensor_split``) and channel shuffle (ShuffleNet): the channels flow
through both, so the blocks around them are prunable, and the compact model computes exactly what the masked
one does."""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_ops_gating import assert_compact_equals_masked, prune_neurons, randomize_batchnorm
from torch import nn

from lightning_prune import build_dependency_graph, compact
from lightning_prune.pruner.cost import CostModel

SPLITS = {
    "chunk": lambda x: x.chunk(2, dim=1),
    "split": lambda x: torch.split(x, 4, dim=1),
    "tensor_split": lambda x: x.tensor_split([4], dim=1),
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


def reshape_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The same permutation with ``reshape``, the ``transpose`` method and no ``contiguous()``."""
    b, _, h, w = x.shape
    return x.reshape(b, groups, -1, h, w).transpose(1, 2).reshape(b, -1, h, w)


class Unit(nn.Module):
    """One ShuffleNet V2 unit on 8 channels: half passes, half goes through a branch; then a shuffle."""

    def __init__(self, split: str, shuffle=channel_shuffle) -> None:
        super().__init__()
        self.split, self.shuffle = split, shuffle
        self.branch = nn.Sequential(
            nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        x1, x2 = SPLITS[self.split](x)
        return self.shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class TinyShuffleNet(nn.Module):
    def __init__(self, split: str = "chunk") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.unit1, self.unit2 = Unit(split), Unit(split, reshape_shuffle)
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.head(self.unit2(self.unit1(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("split", SPLITS)
def test_split_and_shuffle_pass_the_channels_and_compact_exactly(split: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(TinyShuffleNet(split)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    s, b1, b2 = (graph.writers[name] for name in ("stem.1", "unit1.branch.6", "unit2.branch.6"))
    # unit 1 shuffles [s0..s3, b1_0..b1_3] to [s0, b1_0, s1, b1_1, ...]; unit 2 splits that in the middle
    assert torch.equal(graph.readers["unit1.branch.0"], s[4:])
    assert torch.equal(graph.readers["unit2.branch.0"], torch.stack([s[2], b1[2], s[3], b1[3]]))
    expected = torch.stack([s[0], b2[0], b1[0], b2[1], s[1], b2[2], b1[1], b2[3]])
    assert torch.equal(graph.readers["head.0"], expected)
    assert graph.prunable[torch.cat([s, b1, b2])].all()
    removed = [s[1], s[5], b1[2], b2[0]]  # s1 goes through both units in the first part of each split
    masks = prune_neurons(model, graph, [int(n) for n in removed])
    compacted = compact(model, masks)
    in_channels = {name: compacted.get_submodule(name).in_channels for name in ("unit1.branch.0", "unit2.branch.0")}
    assert in_channels == {"unit1.branch.0": 3, "unit2.branch.0": 3}
    assert compacted.get_submodule("head.0").in_channels == 6
    assert "gather_channels" not in compacted.code  # x.size() in the shuffle reads a view, nothing rebuilt
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float64,))
    predicted = CostModel(model, x, graph).flops(graph.alive_from_masks(masks))
    assert predicted == CostModel(compacted, x, build_dependency_graph(compacted, x)).total_flops


class MixedGroups(nn.Module):
    """A view splitting the channels, then a transpose mixing them with the rows: not a channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(2, 3).contiguous().view(b, c, h, w)
        return self.head(x).mean((2, 3))


def test_a_view_and_transpose_that_is_no_channel_shuffle_keeps_the_channels() -> None:
    model = MixedGroups().eval()
    graph = build_dependency_graph(model, torch.randn(2, 3, 4, 4))
    assert graph.prunable[graph.writers["conv.1"]].all()
    assert not graph.prunable[graph.writers["conv.4"]].any()
    assert {graph.blocked[int(n)] for n in graph.writers["conv.4"]} == {
        "flow into unsupported op .view() across the channel or batch dimension (the top-level forward)"
    }


def test_torchvision_shufflenet_prunes_its_split_and_shuffled_channels_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    graph = build_dependency_graph(model, x)
    assert graph.num_prunable / graph.num_neurons > 0.99
    split_inputs = [name for name in graph.readers if name.endswith(".branch2.0") and ".0." not in name]
    shuffled = [name for name in graph.writers if name.endswith((".branch1.3", ".branch2.6"))]
    assert len(split_inputs) == 13 and len(shuffled) == 19
    assert all(graph.prunable[graph.readers[name]].all() for name in split_inputs)
    assert all(graph.prunable[graph.writers[name]].all() for name in shuffled)
    candidates = torch.nonzero(graph.prunable).flatten()
    removed = candidates[torch.randperm(candidates.numel())[: candidates.numel() // 3]].tolist()
    compacted = compact(model, prune_neurons(model, graph, removed))
    assert compacted.get_submodule("stage3.1.branch2.0").in_channels < 48
    assert_compact_equals_masked(model, compacted, x, dtypes=(torch.float32,))
