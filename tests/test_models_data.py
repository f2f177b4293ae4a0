"""Models (shapes, fx tracing, pretrained weights) and the offline CIFAR-10 JPEG loader."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import pytest
import torch
import torch.fx
from helpers import fake_cifar_archive
from torch import nn

from lightning_prune.data import (
    CIFAR10_CLASSES,
    cifar10_jpeg_archive,
    extract_cifar10_jpeg,
    load_cifar10_jpeg_subset,
    shared_data_dir,
)
from lightning_prune.models import (
    CifarResNet,
    LeNet3,
    PadShortcut,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    load_cifar_resnet_weights,
    preact_resnet18,
)

FACTORIES = {
    "resnet20": cifar_resnet20,
    "resnet32": cifar_resnet32,
    "resnet44": cifar_resnet44,
    "resnet56": cifar_resnet56,
    "lenet3": LeNet3,
    "preact_resnet18": preact_resnet18,
}


def _pretrained(data_dir: Path, depth: int) -> Path:
    matches = sorted((data_dir / "pretrained").glob(f"resnet{depth}-*.th"))
    assert matches, f"no pretrained ResNet-{depth} under {data_dir / 'pretrained'}"
    return matches[0]


@pytest.mark.parametrize("name", FACTORIES)
def test_output_shape(name: str) -> None:
    model = FACTORIES[name]().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", FACTORIES)
def test_fx_traceable(name: str) -> None:
    model = FACTORIES[name]().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_cifar_resnet_structure() -> None:
    model = cifar_resnet20(num_classes=100)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [3, 3, 3]
    assert isinstance(model.layer2[0].shortcut, PadShortcut)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert model.linear.out_features == 100
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_pad_shortcut_pickles_and_pads() -> None:
    model = pickle.loads(pickle.dumps(cifar_resnet20()))
    x = torch.randn(1, 16, 32, 32)
    out = model.layer2[0].shortcut(x)
    assert out.shape == (1, 32, 16, 16)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_lenet3_param_count() -> None:
    assert sum(p.numel() for p in LeNet3().parameters()) == 121_182


def test_preact_resnet18_structure() -> None:
    model = preact_resnet18()
    # 11,171,146 of the common CIFAR variant plus the final BatchNorm(512) of the paper's design.
    assert sum(p.numel() for p in model.parameters()) == 11_172_170
    assert model.layer1[0].shortcut is None
    assert isinstance(model.layer2[0].shortcut, nn.Conv2d)
    assert model.layer2[0].shortcut.kernel_size == (1, 1)


def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope.th"
    with pytest.raises(FileNotFoundError, match="nope.th"):
        cifar_resnet20(missing)


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_pretrained_loads_strictly(data_dir: Path, depth: int) -> None:
    model = CifarResNet(depth)
    load_cifar_resnet_weights(model, _pretrained(data_dir, depth))
    assert len(model.layer3) == (depth - 2) // 6


@pytest.mark.parametrize("depth, factory", [(20, cifar_resnet20), (56, cifar_resnet56)])
def test_pretrained_accuracy(data_dir: Path, cifar_test_subset, depth: int, factory) -> None:
    model = factory(_pretrained(data_dir, depth)).eval()
    images, labels = cifar_test_subset.tensors
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.70, f"ResNet-{depth} accuracy {accuracy:.3f} on the JPEG test subset"


def test_cifar_test_subset(cifar_test_subset) -> None:
    images, labels = cifar_test_subset.tensors
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.bincount(minlength=10).tolist() == [20] * 10
    assert images.mean().abs() < 0.5 and 0.7 < images.std() < 1.5


def test_shared_data_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_PRUNE_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path.resolve()
    assert cifar10_jpeg_archive() == tmp_path.resolve() / "cifar10-jpeg.tar.gz"


def test_missing_archive(tmp_path: Path) -> None:
    missing = tmp_path / "cifar10-jpeg.tar.gz"
    with pytest.raises(FileNotFoundError, match="LIGHTNING_PRUNE_DATA") as info:
        load_cifar10_jpeg_subset(missing, cache_dir=tmp_path)
    assert str(missing) in str(info.value) and "torchvision" in str(info.value)
    with pytest.raises(FileNotFoundError, match="LIGHTNING_PRUNE_DATA"):
        extract_cifar10_jpeg(missing, tmp_path)




def test_subset_loader_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = fake_cifar_archive(tmp_path / "fake.tar.gz", per_class=3)
    cache = tmp_path / "cache"
    subset = load_cifar10_jpeg_subset(
        archive, "train", per_class=2, mean=(0, 0, 0), std=(1, 1, 1), cache_dir=cache
    )
    images, labels = subset.tensors
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    torch.testing.assert_close(images[:, 0, 0, 0], labels.float() * 20 / 255)
    torch.testing.assert_close(images[:, 1, 0, 0], torch.tensor([0.0, 20 / 255] * 10))
    with pytest.raises(ValueError, match="fewer than 5"):
        load_cifar10_jpeg_subset(archive, "test", per_class=5, cache_dir=cache)

    with monkeypatch.context() as patch:
        patch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("cache missed"))
        cached = load_cifar10_jpeg_subset(
            archive, "train", per_class=2, transform=lambda im: torch.ones(1, 4, 4), cache_dir=cache
        )
    assert cached.tensors[0].shape == (20, 1, 4, 4)

    fake_cifar_archive(archive, per_class=4)  # a changed archive must not reuse the old entry
    assert len(load_cifar10_jpeg_subset(archive, "test", per_class=4, cache_dir=cache)) == 40
    assert len(load_cifar10_jpeg_subset(archive, "train", per_class=2, cache_dir=cache)) == 20
    assert len(list(cache.glob("*.pt"))) == 3


def test_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = fake_cifar_archive(tmp_path / "fake.tar.gz", per_class=1)
    root = extract_cifar10_jpeg(archive, tmp_path / "cache")
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
    assert sorted(p.name for p in (root / "test").iterdir()) == list(CIFAR10_CLASSES)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []

    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("archive re-extracted"))
    assert extract_cifar10_jpeg(archive, tmp_path / "cache") == root
