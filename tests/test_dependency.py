"""Dependency analysis: gates, tied neurons, blocked channels, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import SmallCNN, SmallResNet
from torch import nn

from lightning_prune import OpRule, UnsupportedModelError, build_dependency_graph, register_op_rule
from lightning_prune.models import cifar_resnet20, preact_resnet18


def _same_neurons(graph, a: str, b: str) -> bool:
    return torch.equal(graph.gates[a].neurons, graph.gates[b].neurons)


def test_small_cnn_gates_bn_and_unnormalised_linear_not_output():
    graph = build_dependency_graph(SmallCNN(), torch.randn(2, 3, 16, 16))
    assert set(graph.gates) == {"bn1", "bn2", "fc1"}
    assert graph.gates["fc1"].kind == "linear"
    assert graph.num_prunable == 8 + 16 + 24
    # fc1 reads the 16 channels of bn2, each repeated over the 4x4 positions after flatten
    readers = graph.readers["fc1"]
    assert readers.numel() == 256 and torch.equal(readers.view(16, 16)[:, 0], graph.gates["bn2"].neurons)
    assert graph.gates["bn2"].sources[3] == ("conv2", 3)


def test_residual_additions_tie_channels():
    graph = build_dependency_graph(SmallResNet(), torch.randn(2, 3, 16, 16))
    assert _same_neurons(graph, "stem.1", "block1.bn2") and _same_neurons(graph, "stem.1", "block2.bn2")
    assert _same_neurons(graph, "block3.bn2", "block3.proj.1")
    assert not _same_neurons(graph, "block1.bn1", "block1.bn2")
    assert graph.residual[graph.gates["stem.1"].neurons].all()
    assert not graph.residual[graph.gates["block1.bn1"].neurons].any()


def test_torchvision_resnet_downsample_joins_the_stage_group():
    graph = build_dependency_graph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    stage2 = graph.gates["layer2.0.bn2"].neurons
    assert torch.equal(graph.gates["layer2.0.downsample.1"].neurons, stage2)
    assert torch.equal(graph.gates["layer2.1.bn2"].neurons, stage2)
    assert not set(stage2.tolist()) & set(graph.gates["layer1.0.bn2"].neurons.tolist())
    assert "fc" not in graph.gates  # the output layer is never pruned


def test_cifar_resnet_zero_padding_shortcut_ties_shifted_channels():
    graph = build_dependency_graph(cifar_resnet20(), torch.randn(1, 3, 32, 32))
    s1, s2, s3 = (graph.gates[f"layer{i}.0.bn2"].neurons for i in (1, 2, 3))
    # option A pads planes // 4 zeros on each side: stage-1 channel c flows into stage-2 channel c + 8
    assert torch.equal(s2[8:24], s1) and torch.equal(s3[16:48], s2)
    assert torch.equal(graph.gates["bn1"].neurons, s1)
    assert len(set(s3[:16].tolist()) & set(s2.tolist())) == 0
    assert graph.num_prunable == 400


def test_preact_resnet_bn_on_the_stream_belongs_to_its_group():
    graph = build_dependency_graph(preact_resnet18(), torch.randn(1, 3, 32, 32))
    stream = graph.gates["layer1.0.bn1"].neurons
    # the stem conv and every block's last conv feed the stream without a BatchNorm of their own; the
    # next block's BatchNorm reads them through the addition, so they are not gated twice
    assert all(gate.kind == "batchnorm" for gate in graph.gates.values())
    assert torch.equal(graph.writers["conv1"], stream) and torch.equal(graph.writers["layer1.0.conv2"], stream)
    assert torch.equal(graph.gates["layer1.1.bn1"].neurons, stream)


def test_before_bn_gates_convolutions():
    graph = build_dependency_graph(SmallCNN(), torch.randn(2, 3, 16, 16), placement="before_bn")
    assert set(graph.gates) == {"conv1", "conv2", "fc1"}


def test_no_skip_and_ignored_modules_restrict_pruning():
    model, x = SmallResNet(), torch.randn(2, 3, 16, 16)
    no_skip = build_dependency_graph(model, x, prune_residual=False)
    assert "block1.bn2" not in no_skip.gates and "block1.bn1" in no_skip.gates
    ignored = build_dependency_graph(model, x, ignored_modules=["block2"])
    assert "block2.bn1" not in ignored.gates
    assert "block2.bn2" not in ignored.gates and "block1.bn2" not in ignored.gates  # tied with ignored


class _Gated(nn.Module):
    """A channel multiplied by a sigmoid of itself: the sigmoid maps a removed channel to 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = torch.sigmoid(x)
        x = self.bn2(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def test_unknown_ops_block_their_channels_but_not_others():
    graph = build_dependency_graph(_Gated(), torch.randn(2, 3, 8, 8))
    assert "bn" not in graph.gates and "bn2" in graph.gates
    assert any("sigmoid" in r for r in graph.blocked.values())


def test_no_prunable_layer_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="no prunable layer"):
        build_dependency_graph(nn.Linear(4, 2), torch.randn(1, 4))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="could not trace"):
        build_dependency_graph(_Untraceable(), torch.randn(1, 4))


class _Clipped(nn.Module):
    """Data-dependent control flow in a submodule: torch.fx cannot trace it."""

    def forward(self, x):
        return x.clamp(max=1.0) if x.amax() > 1.0 else x


class _WithUntraceableBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.clip = _Clipped()
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.clip(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(x))))))
        return self.fc(x.mean((2, 3)))


def test_an_untraceable_submodule_is_traced_as_one_op_with_a_warning_and_the_rest_is_pruned(tmp_path):
    from helpers import NetOnly, synthetic_loader, trainer
    from test_ops_gating import assert_compact_equals_masked

    from lightning_prune import TaylorPruningCallback
    from lightning_prune.compaction.inference import optimize_for_inference

    torch.manual_seed(0)
    net = _WithUntraceableBlock()
    with pytest.warns(UserWarning, match=r"could not trace 1 submodule\(s\): clip \(_Clipped\).*control flow"):
        graph = build_dependency_graph(net, torch.randn(2, 3, 8, 8))
    assert set(graph.gates) == {"bn2", "bn3"}
    assert any("unsupported op _Clipped (clip)" in reason for reason in graph.causes)
    callback = TaylorPruningCallback(target_flops_ratio=0.7, prune_every_n_batches=1, pruning_steps=2)
    with pytest.warns(UserWarning, match="could not trace"):  # a user module without forward
        trainer(max_steps=3, callbacks=[callback], default_root_dir=tmp_path).fit(NetOnly(net), synthetic_loader(size=8))
    assert callback.num_pruned > 0
    x = torch.randn(4, 3, 8, 8) * 3
    assert_compact_equals_masked(net.eval(), callback.compact().eval(), x, dtypes=(torch.float32,))
    with pytest.warns(UserWarning, match="could not trace"):
        folded = optimize_for_inference(net)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factory", [torchvision.models.mobilenet_v2, torchvision.models.densenet121])
def test_depthwise_and_concatenation(factory):
    graph = build_dependency_graph(factory(), torch.randn(1, 3, 64, 64))
    assert graph.num_prunable > 1000
    if factory is torchvision.models.mobilenet_v2:
        # the depthwise conv ties its input and output channels: expansion BN and depthwise BN share neurons
        assert torch.equal(graph.gates["features.2.conv.0.1"].neurons, graph.gates["features.2.conv.1.1"].neurons)
    else:
        # a dense layer's output channels reappear, concatenated, in every later BatchNorm of the block
        new = graph.readers["features.denseblock1.denselayer1.conv2"]
        assert new.numel() == 128
        later = graph.gates["features.denseblock1.denselayer2.norm1"].neurons
        assert torch.equal(later[64:96], graph.writers["features.denseblock1.denselayer1.conv2"])


class _BroadcastBias(nn.Module):
    """Scores ``(B, 4, D, H, W)`` plus a bias ``(1, 4, H, W)``: broadcasting meets the bias' 4 channels with
    dimension 2 of the scores (MaxViT's relative-position bias), so their channels are not tied."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv3d(3, 6, 1), nn.BatchNorm3d(6)
        self.scores, self.bn3 = nn.Conv3d(6, 4, 1), nn.BatchNorm3d(4)
        self.bias, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x5: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        scores = self.bn3(self.scores(torch.relu(self.bn0(self.conv0(x5)))))
        y = torch.relu(scores + self.bn2(self.bias(x4)))
        return self.head(y.mean(dim=(2, 3, 4)))


def test_broadcast_operands_are_not_tied_by_position():
    from lightning_prune.compaction import alive_from_masks, compact
    from lightning_prune.pruner import NeuronMasks

    model = _BroadcastBias().eval()
    example = (torch.randn(2, 3, 4, 4, 4), torch.randn(1, 3, 4, 4))
    graph = build_dependency_graph(model, example)
    assert set(graph.gates) == {"bn0"}  # the scores and the bias meet no channel of each other: unprunable
    assert any("broadcast" in reason for reason in graph.blocked.values())
    masks = {"bn0": torch.arange(6) % 2 == 0}
    small = compact(model, masks, graph=graph)
    zero = NeuronMasks(graph)
    zero.update(~alive_from_masks(graph, masks))
    zero.zero_parameters()
    with torch.no_grad():
        assert torch.allclose(small(*example), model(*example), atol=1e-6)


class _GroupedAndReduced(nn.Module):
    """A grouped convolution with one input channel per group (a channel multiplier of 2) and a sum over the
    channels (an energy map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 6, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(6)
        self.conv4 = nn.Conv2d(6, 4, 1)
        self.bn4 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        energy = self.bn4(self.conv4(x)).sum(dim=1)  # a reduction over the channels
        return self.fc(x.mean((2, 3))) + energy.mean((1, 2)).unsqueeze(1)


def test_grouped_convolutions_and_channel_reductions_keep_their_channels_with_the_reason():
    """Removing a channel of a channel-multiplier convolution's input would empty a group, and a channel summed with
    the others has no output of its own to cut: both sides of the grouped convolution and the channels
    reduced over are unprunable, each neuron with its reason in ``graph.blocked``; the rest stays prunable
    (bn3: read by an ordinary convolution and by a mean over positions only)."""
    graph = build_dependency_graph(_GroupedAndReduced(), torch.randn(2, 3, 8, 8))
    assert set(graph.gates) == {"bn3"} and graph.num_prunable == 6
    assert graph.prunable[graph.gates["bn3"].neurons].all()
    reasons = {
        "conv1": "grouped convolution grouped (one input channel per group)",  # the grouped convolution's input
        "grouped": "grouped convolution grouped (one input channel per group)",  # and its output
        "conv4": "reduction sum over the channel",
    }
    for layer, reason in reasons.items():
        neurons = graph.writers[layer].tolist()
        assert not graph.prunable[neurons].any(), layer
        assert all(reason in graph.blocked[n] for n in neurons), (layer, [graph.blocked.get(n) for n in neurons])


class _ChannelScale(nn.Module):
    """A learned scale per channel, written with an op the library does not know (``x * weight`` alone would
    be known: a layer scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return torch.einsum("bchw,c->bchw", x, self.weight)


class Scale(_ChannelScale):
    """The same op, taught to the library by the rule below."""


@register_op_rule(Scale)
class _ScaleRule(OpRule):
    def propagate(self, walker, node):
        return walker.value(node.args[0])  # channel-wise: output channel c is input channel c, scaled

    def compact(self, builder, node):
        scale = builder.layer(node)  # the compact model's own copy, unless called twice
        if scale is None:
            return None  # run at full width
        scale.weight = nn.Parameter(scale.weight[builder.kept[node.args[0]]])
        return builder.copy(node)


class _Scaled(nn.Module):
    def __init__(self, scale: type[nn.Module] = Scale) -> None:
        super().__init__()
        self.conv1, self.bn1, self.scale = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), scale(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.scale(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_a_registered_rule_keeps_a_custom_modules_channels_prunable_and_compacts_it():
    from lightning_prune.compaction import alive_from_masks, compact
    from lightning_prune.pruner import NeuronMasks

    model, x = _Scaled().eval(), torch.randn(2, 3, 8, 8)
    graph = build_dependency_graph(model, x)
    assert [n.op for n in graph.traced.graph.nodes if n.name == "scale"] == ["call_module"]  # traced as one op
    assert set(graph.gates) == {"bn1", "bn2"} and graph.num_prunable == 8 + 6
    masks = {"bn1": torch.arange(8) % 3 != 0, "bn2": torch.arange(6) < 4}
    small = compact(model, masks, graph=graph)
    assert small.scale.weight.shape == (5,) and small.conv2.in_channels == 5
    zero = NeuronMasks(graph)
    zero.update(~alive_from_masks(graph, masks))
    zero.zero_parameters()
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-6)


def test_an_op_without_a_rule_blocks_its_channels_with_the_reason():
    graph = build_dependency_graph(_Scaled(_ChannelScale), torch.randn(2, 3, 8, 8), leaf_modules=["scale"])
    assert set(graph.gates) == {"bn2"}
    assert all("unsupported op _ChannelScale (scale)" in graph.blocked[n] for n in graph.writers["bn1"].tolist())


def test_a_second_rule_for_an_op_is_an_error_unless_it_overrides():
    class Blocking(OpRule):
        def propagate(self, walker, node):
            return walker.opaque(node, "a blocking rule")

    class Passing(OpRule):
        def propagate(self, walker, node):
            return walker.value(node.args[0])

    class Op(_ChannelScale):
        pass

    with pytest.raises(ValueError, match=r"method \.view\(\) already has the op rule Reshape"):
        register_op_rule(Op, "view")(Blocking)  # a built-in rule; nothing is registered, not even for Op
    assert set(build_dependency_graph(_Scaled(Op), torch.randn(2, 3, 8, 8)).gates) == {"bn2"}  # traced through
    register_op_rule(Op)(Blocking)
    with pytest.raises(ValueError, match="Op already has the op rule Blocking; pass override=True"):
        register_op_rule(Op)(Passing)
    graph = build_dependency_graph(_Scaled(Op), torch.randn(2, 3, 8, 8))
    assert set(graph.gates) == {"bn2"} and any("a blocking rule" in r for r in graph.blocked.values())
    register_op_rule(Op, override=True)(Passing)
    assert set(build_dependency_graph(_Scaled(Op), torch.randn(2, 3, 8, 8)).gates) == {"bn1", "bn2"}
