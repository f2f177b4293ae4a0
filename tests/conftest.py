"""Shared fixtures: the offline data folder and a cached CIFAR-10 test subset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch.utils.data import TensorDataset

from lightning_prune.data import cifar10_jpeg_archive, load_cifar10_jpeg_subset, shared_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder; fails under ``CI=true`` and skips elsewhere when it is missing."""
    path = shared_data_dir()
    if not path.is_dir():
        reason = (
            f"shared data folder not found at {path}; set LIGHTNING_PRUNE_DATA to the folder "
            "holding cifar10-jpeg.tar.gz and pretrained/"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def cifar_test_subset(data_dir: Path) -> TensorDataset:
    """20 images per class of the JPEG test split, normalised for the pretrained ResNets."""
    return load_cifar10_jpeg_subset(cifar10_jpeg_archive(data_dir), split="test", per_class=20)
