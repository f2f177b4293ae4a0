"""Train LeNet3 on the CIFAR-10 JPEG training split (the network of the paper's Figure 3), with caching.

``python -m lightning_prune.study.train_lenet3 --epochs 30`` writes the weights to
``~/.cache/lightning_prune/lenet3-cifar10-seed<seed>.pt`` (``$LIGHTNING_PRUNE_CACHE``) and reports the test
accuracy; :func:`trained_lenet3` returns the cached network, training it first if needed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_prune.data import cifar10_jpeg_archive, default_cache_dir, load_cifar10_jpeg_subset
from lightning_prune.models import LeNet3


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random 32x32 crop of the 4-pixel zero-padded image."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,), generator=gen).tolist()  # one shift per batch: cheap
    return padded[:, :, dy : dy + 32, dx : dx + 32]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def train_lenet3(
    epochs: int = 30, lr: float = 0.05, batch_size: int = 128, seed: int = 0, log: bool = True
) -> tuple[LeNet3, dict]:
    archive = cifar10_jpeg_archive()
    train = load_cifar10_jpeg_subset(archive, split="train", per_class=None)
    test = load_cifar10_jpeg_subset(archive, split="test", per_class=None)
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LeNet3()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i : i + batch_size]
            x, y = _augment(xtr[idx], gen), ytr[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if log and (i // batch_size) % 50 == 0:
                print(f"  epoch {epoch + 1} batch {i // batch_size} loss {total / count:.4f} ({time.time() - start:.0f}s)",
                      flush=True)  # fmt: skip
        if log:
            acc = accuracy(model, xte, yte)
            print(f"epoch {epoch + 1}/{epochs} loss {total / count:.4f} test acc {acc:.4f} ({time.time() - start:.0f}s)",
                  flush=True)  # fmt: skip
    info = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "test_accuracy": accuracy(model, xte, yte), "seconds": time.time() - start}  # fmt: skip
    return model.eval(), info


def lenet3_cache_path(seed: int = 0) -> Path:
    return default_cache_dir() / f"lenet3-cifar10-seed{seed}.pt"


def trained_lenet3(seed: int = 0, epochs: int = 30) -> tuple[LeNet3, dict]:
    """The LeNet3 trained on CIFAR-10 JPEG (cached; trained first when missing)."""
    path = lenet3_cache_path(seed)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model = LeNet3()
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["info"]
    model, info = train_lenet3(epochs=epochs, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    return model, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not lenet3_cache_path(args.seed).is_file():
        model, info = train_lenet3(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
        lenet3_cache_path(args.seed).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "info": info}, lenet3_cache_path(args.seed))
    _, info = trained_lenet3(seed=args.seed, epochs=args.epochs)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
