"""Shared fixtures: the offline data folder and a cached CIFAR-10 test subset."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import synthetic_time
from torch.overrides import TorchFunctionMode
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


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Latency tables timed by ``synthetic_time`` (deterministic), cached under ``tmp_path`` by default; the
    list of timed modules."""
    import lightning_prune.latency.table as table_module

    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def timer(module, *rest):
        calls.append(module)
        return synthetic_time(module, *rest)

    monkeypatch.setattr(table_module, "_time", timer)
    return calls


@pytest.fixture
def layered(counted, monkeypatch):
    """``counted``, on a device where a whole network takes the sum of its Conv/Linear layers' synthetic times
    (not a fixed 1 ms), each at least ``floor`` seconds (0 unless a test sets it): with 0 measured and
    predicted latency agree; with more, narrow layers inside a network cost more than the table, timing them
    alone, predicts (as per-op overhead would make them). Every other op costs ``per_element`` seconds per
    element it writes (0 unless a test sets it; 1e-9, what ``synthetic_time`` charges a BatchNorm or
    activation timed with a layer, makes the residual additions and pooling cost what they would)."""
    import lightning_prune.latency.table as table_module

    device = types.SimpleNamespace(calls=counted, floor=0.0, per_element=0.0)
    layer_functions = {F.conv1d, F.conv2d, F.conv3d, F.linear}

    class Elements(TorchFunctionMode):
        """Counts the elements written by every op but a Conv/Linear layer's."""

        written = 0

        def __torch_function__(self, func, kinds, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and func not in layer_functions:
                self.written += out.numel()
            return out

    def timer(module, args, kwargs, warmup, repeats):
        if isinstance(module, table_module._Unit) or not any(True for _ in module.children()):
            return synthetic_time(module, args, kwargs, warmup, repeats)
        layers = []

        def hook(layer, layer_args, out):
            layers.append(max(device.floor, synthetic_time(layer, layer_args, {}, warmup, repeats)))

        handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                               torch.nn.Linear))]
        with torch.no_grad(), Elements() as elements:
            module(*args, **kwargs)
        for handle in handles:
            handle.remove()
        counted.append(module)
        return sum(layers) + device.per_element * elements.written

    monkeypatch.setattr(table_module, "_time", timer)
    return device
