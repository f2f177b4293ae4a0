"""BatchNorm recalibration after pruning: exact statistics, modes and momentum kept, and accuracy on real data."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import SmallResNet, synthetic_loader
from torch import nn

from lightning_prune import PruningConfigurationError, estimate_importance, prune_once, recalibrate_batchnorm
from lightning_prune.data import cifar10_jpeg_archive, load_cifar10_jpeg_subset
from lightning_prune.models import cifar_resnet20


def _pruned_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = SmallResNet().eval()
    data = list(synthetic_loader(32, 16))
    prune_once(model, estimate_importance(model, data, "taylor_fo_bn"), fraction=0.3)
    return model


def _bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every BatchNorm in a train-mode forward of a copy of ``model`` (statistics of the batch)."""
    model = copy.deepcopy(model).train()
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_running_statistics_are_those_of_the_pruned_network_on_the_batches():
    model = _pruned_resnet()
    batches = list(synthetic_loader(48, 16, seed=1))  # 3 equal batches
    stale = {n: m.running_var.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    per_batch = [_bn_inputs(model, x) for x, _ in batches]
    recalibrate_batchnorm(model, batches)
    for name, m in model.named_modules():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        inputs = [b[name].transpose(0, 1).flatten(1) for b in per_batch]  # [C, N*H*W] per batch
        mean = torch.cat(inputs, 1).mean(1)
        var = torch.stack([i.var(1, unbiased=True) for i in inputs]).mean(0)
        assert torch.allclose(m.running_mean, mean, atol=1e-5), name
        assert torch.allclose(m.running_var, var, rtol=1e-4, atol=1e-6), name
        assert not torch.allclose(m.running_var, stale[name]), name  # pruning left them stale
        assert int(m.num_batches_tracked) == 3


def test_modes_momentum_and_the_number_of_batches_are_respected():
    model = _pruned_resnet()
    model.train()
    model.block2.eval()  # a mixed mode, which update_bn alone would not restore
    model.stem[1].momentum = None
    model.block1.bn1.momentum = 0.3
    modes = {n: m.training for n, m in model.named_modules()}
    batches = list(synthetic_loader(48, 16, seed=1))
    first = recalibrate_batchnorm(copy.deepcopy(model), batches[:1])
    recalibrate_batchnorm(model, iter(batches), num_batches=1)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.stem[1].momentum is None and model.block1.bn1.momentum == 0.3 and model.block2.bn1.momentum == 0.1
    for (name, a), b in zip(model.state_dict().items(), first.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(PruningConfigurationError, match="at least one batch"):
        recalibrate_batchnorm(model, [])


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_recalibration_recovers_accuracy_of_a_pruned_pretrained_network(data_dir):
    model = cifar_resnet20(next((data_dir / "pretrained").glob("resnet20-*.th"))).eval()
    data = load_cifar10_jpeg_subset(cifar10_jpeg_archive(data_dir), "test", per_class=40)
    x, y = data.tensors
    calibrate, evaluate = slice(0, None, 2), slice(1, None, 2)  # 200 images each, disjoint
    batches = list(zip(x[calibrate].split(50), y[calibrate].split(50)))
    prune_once(model, estimate_importance(model, batches, "weight_norm"), fraction=0.3)
    stale = _top1(model, x[evaluate], y[evaluate])
    recalibrate_batchnorm(model, batches)
    recalibrated = _top1(model, x[evaluate], y[evaluate])
    assert recalibrated > stale + 0.05, (stale, recalibrated)
