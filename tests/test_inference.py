"""Inference preparation: BatchNorm folded into the layer before it and channels-last weights, on
original and compact networks, without touching the model it is given."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_prune import UnsupportedModelError, build_dependency_graph, compact, optimize_for_inference
from lightning_prune.models import cifar_resnet20

TV = torchvision.models
MODELS = {
    "cifar_resnet20": cifar_resnet20,  # zero-padding shortcuts: gathers in the compact graph
    "resnet18": lambda: TV.resnet18(num_classes=10),
    "densenet121": lambda: TV.densenet121(num_classes=10),  # BatchNorm after concatenation: stays
    "mobilenet_v2": lambda: TV.mobilenet_v2(num_classes=10),  # depthwise convolutions
}


def _trained_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding them has something to get wrong."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.normal_(0, 0.1, generator=generator)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("compacted", [False, True], ids=["original", "compact"])
def test_folded_model_computes_the_same(name: str, compacted: bool) -> None:
    torch.manual_seed(0)
    model = _trained_statistics(MODELS[name]()).double()
    if compacted:
        graph = build_dependency_graph(model, torch.zeros(1, 3, 32, 32, dtype=torch.float64))
        masks = {n: torch.arange(g.channels) % 2 == 0 for n, g in graph.gates.items()}  # consistent with the ties
        model = compact(model, masks, graph=graph).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected, got = model(x), fast(x)
    assert expected.abs().max() > 1e-3
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9), float((got - expected).abs().max())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model changed"
    assert not fast.training
    # DenseNet-121: 58 dense layers' norm1, 3 transitions' norm and norm5 read a concatenation; the rest fold
    assert _batchnorms(fast) == (62 if name == "densenet121" else 0)
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_options_off_keep_the_layers() -> None:
    model = _trained_statistics(cifar_resnet20())
    same = optimize_for_inference(model, fold_batchnorm=False, channels_last=False)
    assert _batchnorms(same) == _batchnorms(model)
    assert all(p.is_contiguous() for p in same.parameters())


def test_float32_folding_error_is_rounding_only() -> None:
    model = _trained_statistics(cifar_resnet20())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert float((optimize_for_inference(model)(x) - model(x)).abs().max()) < 1e-4


def test_untraceable_model_fails_clearly() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y

    with pytest.raises(UnsupportedModelError, match="leaf_modules|fold_batchnorm=False"):
        optimize_for_inference(DataDependent())
    assert _batchnorms(optimize_for_inference(DataDependent(), fold_batchnorm=False)) == 1
