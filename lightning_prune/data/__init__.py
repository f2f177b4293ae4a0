"""Offline data loading."""

from lightning_prune.data.cifar10_jpeg import (
    ARCHIVE_NAME,
    CIFAR10_CLASSES,
    cifar10_jpeg_archive,
    default_cache_dir,
    extract_cifar10_jpeg,
    load_cifar10_jpeg_subset,
    shared_data_dir,
)

__all__ = [
    "ARCHIVE_NAME",
    "CIFAR10_CLASSES",
    "cifar10_jpeg_archive",
    "default_cache_dir",
    "extract_cifar10_jpeg",
    "load_cifar10_jpeg_subset",
    "shared_data_dir",
]
