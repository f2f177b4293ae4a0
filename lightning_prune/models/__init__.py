"""Model definitions used in experiments and tests."""

from lightning_prune.models.cifar_resnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BasicBlock,
    CifarResNet,
    PadShortcut,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    load_cifar_resnet_weights,
)
from lightning_prune.models.lenet3 import LeNet3
from lightning_prune.models.preact_resnet import PreActBlock, PreActResNet, preact_resnet18

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BasicBlock",
    "CifarResNet",
    "LeNet3",
    "PadShortcut",
    "PreActBlock",
    "PreActResNet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "load_cifar_resnet_weights",
    "preact_resnet18",
]
