"""Lightning data modules: CIFAR-10 (torchvision files or the shared JPEG archive), ImageFolder trees
(ImageNet with the paper's preprocessing) and synthetic data of any shape.

``batch_size`` is the *total* batch over all devices; the app sets :attr:`per_device_batch_size` from the
trainer's world size (``devices * num_nodes``) before any loader is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision import transforms as T

from lightning_prune.data import (
    ARCHIVE_NAME,
    cifar10_jpeg_archive,
    default_cache_dir,
    extract_cifar10_jpeg,
    load_cifar10_jpeg_subset,
)
from lightning_prune.models import CIFAR10_MEAN, CIFAR10_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataNotFoundError(FileNotFoundError):
    """A data set is not where the configuration says; the message says where and how to get it."""


class ClassificationDataModule(pl.LightningDataModule):
    """Shared loader logic. Subclasses set ``self.train_set`` / ``self.val_set`` in :meth:`setup`."""

    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_per_class: int | None = None,
        val_per_class: int | None = None,
        train_subset: int | None = None,
        val_subset: int | None = None,
        subset_seed: int = 0,
        pin_memory: bool = False,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None:
            self.num_classes = int(num_classes)
        if input_shape is not None:
            self.input_shape = tuple(int(d) for d in input_shape)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.per_device_batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.train_per_class = train_per_class
        self.val_per_class = val_per_class
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.subset_seed = subset_seed
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def check(self) -> None:
        """Raise :class:`DataNotFoundError` (saying where the data is expected and how to get it) if the
        data is missing. Cheap: called before anything else is built."""

    def set_world_size(self, world_size: int) -> int:
        """Split the total batch over ``world_size`` processes; returns the per-device batch."""
        if self.batch_size % world_size:
            raise ValueError(
                f"the total batch {self.batch_size} is not divisible by the {world_size} processes "
                "(trainer.devices * trainer.num_nodes); change data.batch_size"
            )
        self.per_device_batch_size = self.batch_size // world_size
        return self.per_device_batch_size

    def _subset(self, dataset: Dataset, size: int | None, per_class: int | None = None) -> Dataset:
        """The first ``per_class`` examples of each class (if given), then ``size`` of them at random."""
        if per_class is not None:
            dataset = first_per_class(dataset, per_class)
        if size is None or size >= len(dataset):
            return dataset
        generator = torch.Generator().manual_seed(self.subset_seed)
        return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:size].tolist())

    def _subsets(self, train: Dataset, val: Dataset) -> None:
        self.train_set = self._subset(train, self.train_subset, self.train_per_class)
        self.val_set = self._subset(val, self.val_subset, self.val_per_class)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            self.setup("fit" if train else "validate")
            dataset = self.train_set if train else self.val_set
        batch = self.per_device_batch_size if train else (self.eval_batch_size or self.per_device_batch_size)
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=train,
            drop_last=train and len(dataset) >= batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class _TransformTensors(Dataset):
    """A ``TensorDataset`` whose images go through ``transform`` (tensor to tensor) when read."""

    def __init__(self, dataset: TensorDataset, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return (self.transform(image) if self.transform else image), label


def cifar_train_transform(mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def cifar_eval_transform(mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


class CIFAR10DataModule(ClassificationDataModule):
    """The official CIFAR-10 files through ``torchvision.datasets.CIFAR10`` (downloaded only if
    ``download=True``). Train: random crop 32 (padding 4) and flip; both normalised with ``mean``/``std``."""

    def __init__(
        self,
        root: str | os.PathLike = "data/cifar10",
        download: bool = False,
        augment: bool = True,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root, self.download, self.augment = Path(root), download, augment
        self.mean, self.std = tuple(mean), tuple(std)

    def check(self) -> None:
        if not (self.root / "cifar-10-batches-py").is_dir() and not self.download:
            raise DataNotFoundError(
                f"CIFAR-10 not found: expected {self.root / 'cifar-10-batches-py'} (the official python files). "
                "Allow the download with data.download=true, point data.root at the folder holding "
                "cifar-10-batches-py, or use the shared JPEG archive with data=cifar10_jpeg."
            )

    def prepare_data(self) -> None:
        if self.download:
            datasets.CIFAR10(self.root, train=True, download=True)
            datasets.CIFAR10(self.root, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        self.check()
        train_tf = cifar_train_transform(self.mean, self.std) if self.augment else cifar_eval_transform(self.mean, self.std)
        train = datasets.CIFAR10(self.root, train=True, transform=train_tf, download=self.download)
        val = datasets.CIFAR10(self.root, train=False, transform=cifar_eval_transform(self.mean, self.std),
                               download=self.download)  # fmt: skip
        self._subsets(train, val)


class CIFAR10JPEGDataModule(ClassificationDataModule):
    """CIFAR-10 from the shared JPEG archive (``cifar10-jpeg.tar.gz``; ``test/`` is the validation split).

    ``mode="memory"``: the first ``train_per_class`` / ``val_per_class`` images of each class (all if
    ``None``) decoded once into a cached tensor file, augmented on the fly: fast for subsets.
    ``mode="folder"``: the archive is unpacked once under ``cache_dir`` and read as an ImageFolder tree.
    """

    def __init__(
        self,
        archive: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        mode: str = "memory",
        augment: bool = True,
        cache_dir: str | os.PathLike | None = None,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in ("memory", "folder"):
            raise ValueError(f"mode must be 'memory' or 'folder', got {mode!r}")
        self.archive = Path(archive) if archive is not None else cifar10_jpeg_archive(data_dir)
        self.mode, self.augment = mode, augment
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.mean, self.std = tuple(mean), tuple(std)

    def check(self) -> None:
        if not self.archive.is_file():
            raise DataNotFoundError(
                f"CIFAR-10 JPEG archive not found: {self.archive}. Set LIGHTNING_PRUNE_DATA (or "
                f"paths.data_dir=...) to the folder holding {ARCHIVE_NAME}, give data.archive=/path/to/it, "
                "or use the official files with data=cifar10 data.download=true."
            )

    def prepare_data(self) -> None:
        self.check()
        if self.mode == "folder":
            extract_cifar10_jpeg(self.archive, self.cache_dir)
        else:
            for split, per_class in (("train", self.train_per_class), ("test", self.val_per_class)):
                load_cifar10_jpeg_subset(self.archive, split, per_class, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        self.check()
        if self.mode == "folder":
            root = extract_cifar10_jpeg(self.archive, self.cache_dir)
            train_tf = cifar_train_transform(self.mean, self.std) if self.augment else cifar_eval_transform(self.mean, self.std)
            train = datasets.ImageFolder(root / "train", transform=train_tf)
            val = datasets.ImageFolder(root / "test", transform=cifar_eval_transform(self.mean, self.std))
        else:
            load = lambda split, n: load_cifar10_jpeg_subset(  # noqa: E731
                self.archive, split, n, mean=self.mean, std=self.std, cache_dir=self.cache_dir
            )
            augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]) if self.augment else None
            train = _TransformTensors(load("train", self.train_per_class), augment)
            val = load("test", self.val_per_class)
        self._subsets(train, val)


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every example, read without loading images where the data set allows it."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if isinstance(dataset, _TransformTensors):
        return dataset_labels(dataset.dataset)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    return [int(dataset[i][1]) for i in range(len(dataset))]


def first_per_class(dataset: Dataset, per_class: int) -> Dataset:
    """The first ``per_class`` examples of each class, in data set order."""
    counts: dict[int, int] = {}
    keep = []
    for i, label in enumerate(dataset_labels(dataset)):
        if counts.get(label, 0) < per_class:
            keep.append(i)
            counts[label] = counts.get(label, 0) + 1
    return dataset if len(keep) == len(dataset) else Subset(dataset, keep)


class ImageFolderDataModule(ClassificationDataModule):
    """Any ``root/<train_dir>/<class>/*`` and ``root/<val_dir>/<class>/*`` tree, with given transforms."""

    def __init__(
        self,
        root: str | os.PathLike,
        train_dir: str = "train",
        val_dir: str = "val",
        train_transform: Callable | None = None,
        val_transform: Callable | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("input_shape", (3, 224, 224))
        super().__init__(**kwargs)
        self.root, self.train_dir, self.val_dir = Path(root), train_dir, val_dir
        self.train_transform = train_transform or T.ToTensor()
        self.val_transform = val_transform or T.ToTensor()

    def _missing_message(self, folder: Path) -> str:
        return (
            f"image folder not found: {folder}. Expected {self.root}/{self.train_dir}/<class>/<image> and "
            f"{self.root}/{self.val_dir}/<class>/<image>; set data.root=... to the folder holding them."
        )

    def check(self) -> None:
        for folder in (self.root / self.train_dir, self.root / self.val_dir):
            if not folder.is_dir():
                raise DataNotFoundError(self._missing_message(folder))

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        self.check()
        train = datasets.ImageFolder(self.root / self.train_dir, transform=self.train_transform)
        val = datasets.ImageFolder(self.root / self.val_dir, transform=self.val_transform)
        self.num_classes = len(train.classes)
        self._subsets(train, val)


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet (ILSVRC-2012) as ImageFolder ``train/`` and ``val/`` trees with the paper's preprocessing:
    train: random resized crop ``image_size`` and horizontal flip; val: resize ``resize``, center crop
    ``image_size``; both normalised with the data set's ``mean``/``std``."""

    num_classes = 1000

    def __init__(
        self,
        root: str | os.PathLike = "data/imagenet",
        image_size: int = 224,
        resize: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ) -> None:
        normalize = T.Normalize(tuple(mean), tuple(std))
        train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        val_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])
        kwargs.setdefault("num_classes", 1000)
        kwargs["input_shape"] = (3, image_size, image_size)
        super().__init__(root, train_transform=train_tf, val_transform=val_tf, **kwargs)

    def _missing_message(self, folder: Path) -> str:
        return (
            f"ImageNet not found: {folder} does not exist. Expected the ILSVRC-2012 images as ImageFolder trees "
            f"{self.root}/{self.train_dir}/<wnid>/*.JPEG and {self.root}/{self.val_dir}/<wnid>/*.JPEG (the "
            "validation images sorted into class folders, e.g. with the PyTorch ImageNet example's valprep.sh). "
            "Get them from https://image-net.org (a login is needed) and set data.root=/path/to/imagenet."
        )


class _SyntheticImages(Dataset):
    """Deterministic random images whose mean depends on the class, so a network can learn something."""

    def __init__(self, size: int, shape: Sequence[int], num_classes: int, seed: int, signal: float) -> None:
        self.size, self.shape, self.num_classes, self.seed = size, tuple(shape), num_classes, seed
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)
        self.prototypes = signal * torch.randn(num_classes, shape[0], 1, 1, generator=generator)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(self.labels[index])
        return torch.randn(self.shape, generator=generator) + self.prototypes[label], label


class SyntheticDataModule(ClassificationDataModule):
    """Random images of shape ``(channels, image_size, image_size)`` for smoke runs (no files needed)."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        train_size: int = 512,
        val_size: int = 128,
        signal: float = 1.0,
        seed: int = 0,
        **kwargs,
    ) -> None:
        kwargs.pop("input_shape", None)
        super().__init__(num_classes=num_classes, input_shape=(channels, image_size, image_size), **kwargs)
        self.train_size, self.val_size, self.signal, self.seed = train_size, val_size, signal, seed

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        self.train_set = _SyntheticImages(self.train_size, self.input_shape, self.num_classes, self.seed, self.signal)
        self.val_set = _SyntheticImages(self.val_size, self.input_shape, self.num_classes, self.seed + 1, self.signal)
        self.val_set.prototypes = self.train_set.prototypes  # same classes in both splits
