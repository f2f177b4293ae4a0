"""Models, data and caching shared by the studies."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_prune.data import cifar10_jpeg_archive, default_cache_dir, load_cifar10_jpeg_subset, shared_data_dir
from lightning_prune.models import LeNet3, cifar_resnet20, cifar_resnet32, cifar_resnet44, cifar_resnet56

_RESNETS = {20: cifar_resnet20, 32: cifar_resnet32, 44: cifar_resnet44, 56: cifar_resnet56}


class TinyNet(nn.Module):
    """A tiny conv-bn-relu network for synthetic-data tests of the studies."""

    def __init__(self, num_classes: int = 4, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build_model(name: str, seed: int = 0, lenet_epochs: int = 15) -> nn.Module:
    """``resnet20``/``resnet32``/``resnet44``/``resnet56`` (shared pretrained weights), ``lenet3`` (trained
    on CIFAR-10 JPEG and cached), ``tiny`` (random weights, for tests)."""
    if name.startswith("resnet"):
        depth = int(name[len("resnet"):])
        matches = sorted((shared_data_dir() / "pretrained").glob(f"resnet{depth}-*.th"))
        if not matches:
            raise FileNotFoundError(f"no pretrained ResNet-{depth} under {shared_data_dir() / 'pretrained'}")
        return _RESNETS[depth](matches[0]).eval()
    if name == "lenet3":
        from lightning_prune.study.train_lenet3 import trained_lenet3

        return trained_lenet3(seed=seed, epochs=lenet_epochs)[0]
    if name == "lenet3_untrained":
        torch.manual_seed(seed)
        return LeNet3().eval()
    if name == "tiny":
        torch.manual_seed(seed)
        return TinyNet().eval()
    raise ValueError(f"unknown model {name!r}")


def load_split(dataset: str, split: str, size: int, seed: int = 0, synthetic_classes: int = 4) -> TensorDataset:
    """``size`` examples of ``split``: CIFAR-10 JPEG (a seeded random subset of the split) or synthetic."""
    if dataset == "synthetic":
        gen = torch.Generator().manual_seed(seed + (0 if split == "train" else 1000))
        x = torch.randn(size, 3, 8, 8, generator=gen)
        y = torch.randint(0, synthetic_classes, (size,), generator=gen)
        return TensorDataset(x, y)
    if dataset != "cifar10":
        raise ValueError(f"unknown dataset {dataset!r}")
    full = load_cifar10_jpeg_subset(cifar10_jpeg_archive(), split=split, per_class=None)
    x, y = full.tensors
    if size >= len(x):
        return full
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return TensorDataset(x[idx], y[idx])


def batches_of(ds: TensorDataset, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = ds.tensors
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def cache_path(kind: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.environ.get("LIGHTNING_PRUNE_STUDY_CACHE", default_cache_dir() / "study")) / f"{kind}-{digest}.pt"


def cached(kind: str, key: dict[str, Any], compute, enabled: bool = True) -> Any:
    """``compute()``, cached on disk under ``key`` (when ``enabled``)."""
    path = cache_path(kind, key)
    if enabled and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    value = compute()
    if enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, path)
    return value
