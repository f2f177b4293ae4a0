"""CIFAR ResNets of He et al. (2016) with option-A shortcuts, matching the shared pretrained weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Normalisation the shared pretrained CIFAR ResNets were trained with (the ImageNet statistics,
# not CIFAR-10's own): feed them inputs normalised with exactly these values.
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Parameter-free option-A shortcut: halve the resolution and zero-pad channels to ``planes``."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32 inputs: three stages of 16/32/64 channels, (depth-2)/6 blocks each."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, blocks, stride=1)
        self.layer2 = self._make_layer(16, 32, blocks, stride=2)
        self.layer3 = self._make_layer(32, 64, blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(x)


def load_cifar_resnet_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a pretrained checkpoint (``module.``-prefixed ``state_dict``) into ``model`` strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained CIFAR ResNet checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = checkpoint.get("state_dict", checkpoint)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return model


def _build(depth: int, pretrained: str | os.PathLike | None, num_classes: int) -> CifarResNet:
    model = CifarResNet(depth, num_classes)
    if pretrained is not None:
        load_cifar_resnet_weights(model, pretrained)
    return model


def cifar_resnet20(pretrained: str | os.PathLike | None = None, num_classes: int = 10) -> CifarResNet:
    """ResNet-20, optionally loaded from the checkpoint at ``pretrained``."""
    return _build(20, pretrained, num_classes)


def cifar_resnet32(pretrained: str | os.PathLike | None = None, num_classes: int = 10) -> CifarResNet:
    """ResNet-32, optionally loaded from the checkpoint at ``pretrained``."""
    return _build(32, pretrained, num_classes)


def cifar_resnet44(pretrained: str | os.PathLike | None = None, num_classes: int = 10) -> CifarResNet:
    """ResNet-44, optionally loaded from the checkpoint at ``pretrained``."""
    return _build(44, pretrained, num_classes)


def cifar_resnet56(pretrained: str | os.PathLike | None = None, num_classes: int = 10) -> CifarResNet:
    """ResNet-56, optionally loaded from the checkpoint at ``pretrained``."""
    return _build(56, pretrained, num_classes)
