"""The pretrained CIFAR ResNet-20 on real CIFAR-10 images: exact Taylor importance, and masking that is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Classifier, gate_gradients, relative_error, trainer
from torch.utils.data import DataLoader

from lightning_prune import TaylorPruningCallback
from lightning_prune.models import cifar_resnet20


@pytest.fixture(scope="module")
def resnet20(data_dir):
    return cifar_resnet20(pretrained=data_dir / "pretrained" / "resnet20-12fca82f.th")


def test_taylor_fo_bn_on_resnet20_equals_autograd_on_gates_after_bn(resnet20, cifar_test_subset):
    model = copy.deepcopy(resnet20)
    reference = copy.deepcopy(resnet20).train()
    loader = DataLoader(cifar_test_subset, batch_size=100, shuffle=False)  # 200 real images, 2 batches
    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=1, num_to_prune=1)
    trainer(callbacks=[cb], max_steps=2).fit(Classifier(model, lr=0.0, example=torch.zeros(1, 3, 32, 32)), loader)
    names = [n.removeprefix("model.") for n in cb.graph.gates]
    assert len(names) == 19 and all(cb.graph.gates["model." + n].kind == "batchnorm" for n in names)
    grads = gate_gradients(reference, names, [(x, y, 1.0) for x, y in loader])
    for name in names:
        expected = torch.stack([g[name].square() for g in grads]).mean(0)
        assert relative_error(cb.importance["model." + name], expected) < 1e-5, name


def test_pruned_resnet20_outputs_do_not_depend_on_removed_neurons(resnet20, cifar_test_subset):
    model = copy.deepcopy(resnet20)
    loader = DataLoader(cifar_test_subset, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=0.05, keep_ratio=0.6)
    trainer(callbacks=[cb], max_epochs=4).fit(Classifier(model, lr=0.01, example=torch.zeros(1, 3, 32, 32)), loader)
    assert cb.done and cb.num_pruned == 160
    # tied channels of each stage were removed together, the zero-padded shortcuts included
    assert torch.equal(cb.masks["model.layer1.0.bn2"], cb.masks["model.bn1"])
    assert torch.equal(cb.masks["model.layer2.2.bn2"][8:24], cb.masks["model.layer1.1.bn2"])
    model.eval()
    x = cifar_test_subset.tensors[0][:64]
    outputs = {}
    hooks = [
        cb.graph.modules[name].register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
        for name in cb.masks
    ]
    with torch.no_grad():
        before = model(x)
    for hook in hooks:
        hook.remove()
    for name, mask in cb.masks.items():  # a removed neuron's gated output is exactly zero
        assert outputs[name][:, ~mask].abs().max() == 0 if (~mask).any() else True
    dead = torch.cat([~cb.graph.alive_from_masks(cb.masks), torch.tensor([True])])
    stripped = copy.deepcopy(model)
    with torch.no_grad():
        for name, neurons in cb.graph.readers.items():  # delete every weight reading a removed channel
            layer = dict(stripped.named_modules())[name.removeprefix("model.")]
            layer.weight[:, dead[neurons]] = 0.0
        for name, neurons in cb.graph.writers.items():  # and every weight writing one (already zero)
            layer = dict(stripped.named_modules())[name.removeprefix("model.")]
            layer.weight[dead[neurons]] = 0.0
        assert torch.equal(stripped(x), before)
