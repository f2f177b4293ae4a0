"""Offline CIFAR-10 from the shared JPEG archive: a fast cached subset loader and a one-time extractor."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.transforms.functional import pil_to_tensor

from lightning_prune.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MARKER = "cifar10-jpeg.complete"


def shared_data_dir() -> Path:
    """Folder holding the shared data: ``$LIGHTNING_PRUNE_DATA``, else ``../shared/data`` from the cwd."""
    return Path(os.environ.get("LIGHTNING_PRUNE_DATA", "../shared/data")).resolve()


def default_cache_dir() -> Path:
    """Cache folder: ``$LIGHTNING_PRUNE_CACHE``, else ``~/.cache/lightning_prune``."""
    return Path(os.environ.get("LIGHTNING_PRUNE_CACHE", Path.home() / ".cache" / "lightning_prune"))


def cifar10_jpeg_archive(data_dir: str | os.PathLike | None = None) -> Path:
    """Path of the JPEG archive inside ``data_dir`` (default: :func:`shared_data_dir`)."""
    return Path(data_dir if data_dir is not None else shared_data_dir()) / ARCHIVE_NAME


def _require_archive(archive: str | os.PathLike) -> Path:
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 JPEG archive not found: {archive}. Point the environment variable "
            f"LIGHTNING_PRUNE_DATA at the folder holding {ARCHIVE_NAME} (default: ../shared/data "
            "relative to the working directory), or use the original CIFAR-10 instead via "
            "torchvision.datasets.CIFAR10(root, download=True)."
        )
    return archive


def _subset_cache_path(archive: Path, split: str, per_class: int | None, cache_dir: Path) -> Path:
    stat = archive.stat()
    key = f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{split}|{per_class}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    count = "all" if per_class is None else f"{per_class}pc"
    return cache_dir / f"cifar10-jpeg-{split}-{count}-{digest}.pt"


def _read_subset(archive: Path, split: str, per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream the archive, decoding the first ``per_class`` images of each class in archive order."""
    class_index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    counts = [0] * len(CIFAR10_CLASSES)
    images, labels = [], []
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] != split:
                continue
            if not parts[-1].lower().endswith(_IMAGE_SUFFIXES) or parts[-1].startswith("."):
                continue
            if parts[-2] not in class_index:
                raise ValueError(f"unexpected class folder {parts[-2]!r} in {archive} ({member.name})")
            label = class_index[parts[-2]]
            if per_class is not None and counts[label] >= per_class:
                continue
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                images.append(pil_to_tensor(image.convert("RGB")))
            labels.append(label)
            counts[label] += 1
            if per_class is not None and min(counts) >= per_class:
                break
    if per_class is not None and min(counts) < per_class:
        found = dict(zip(CIFAR10_CLASSES, counts))
        raise ValueError(f"{archive} has fewer than {per_class} '{split}' images for some class: {found}")
    if not images:
        raise ValueError(f"no '{split}' images found in {archive}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def load_cifar10_jpeg_subset(
    archive: str | os.PathLike,
    split: str = "test",
    per_class: int | None = 20,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    cache_dir: str | os.PathLike | None = None,
) -> TensorDataset:
    """Load ``per_class`` images per class (``None``: all) of ``split`` as ``TensorDataset(images, labels)``.

    Images are float ``[N, 3, 32, 32]`` normalised with ``mean``/``std`` (default: the pretrained
    ResNets' normalisation); if ``transform`` is given it replaces that normalisation and maps each
    PIL image to a tensor. Labels are int64 in the official (alphabetical) class order. The decoded
    uint8 subset is cached under ``cache_dir`` (default: :func:`default_cache_dir`).
    """
    archive = _require_archive(archive)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = _subset_cache_path(archive, split, per_class, cache_dir)
    if cache_file.is_file():
        cached = torch.load(cache_file, map_location="cpu", weights_only=True)
        images, labels = cached["images"], cached["labels"]
    else:
        images, labels = _read_subset(archive, split, per_class)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=cache_dir)
        os.close(fd)
        torch.save({"images": images, "labels": labels}, tmp)
        os.replace(tmp, cache_file)
    if transform is not None:
        data = torch.stack([transform(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
    else:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        data = (images.float() / 255.0 - mean_t) / std_t
    return TensorDataset(data, labels)


def extract_cifar10_jpeg(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack the whole archive once under ``cache_dir``; return the root holding ``train/`` and ``test/``."""
    archive = _require_archive(archive)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / "cifar10-jpeg"
    marker = cache_dir / _MARKER
    if marker.is_file() and root.is_dir():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-jpeg-", dir=cache_dir))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)
        found = [p for p in (tmp, *tmp.iterdir()) if (p / "train").is_dir() and (p / "test").is_dir()]
        if not found:
            raise ValueError(f"{archive} does not contain train/ and test/ folders")
        if root.exists():
            shutil.rmtree(root)
        os.replace(found[0], root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker.write_text(f"{archive.resolve()} {archive.stat().st_size}\n")
    return root
