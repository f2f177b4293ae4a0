"""Small models, a LightningModule wrapper and an autograd reference for gate gradients."""

from __future__ import annotations

import io
import math
import sys
import tarfile
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import build_dependency_graph
from lightning_prune.data import CIFAR10_CLASSES
from lightning_prune.latency.table import _Unit
from lightning_prune.pruner.cost import CostModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.coverage import NetOnly  # noqa: E402, F401  (what a user writes: no forward, the network in self.net)


class SmallCNN(nn.Module):
    """conv-bn-relu x2, a hidden Linear without BatchNorm, and the output Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class SmallResNet(nn.Module):
    """Stem and two identity residual blocks (tied channels), then a strided block with a 1x1 projection."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = _Block(width, width)
        self.block2 = _Block(width, width)
        self.block3 = _Block(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.proj is None else self.proj(x)
        return F.relu(out + shortcut)


class Classifier(pl.LightningModule):
    """Cross-entropy classifier around ``model``; SGD with momentum unless ``optimizer`` says otherwise."""

    def __init__(self, model: nn.Module, lr: float = 0.05, optimizer: str = "sgd", example: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.lr = lr
        self.optimizer_name = optimizer
        self.example_input_array = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def synthetic_loader(n: int = 64, batch_size: int = 16, size: int = 16, dtype=torch.float32, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tempfile.mkdtemp(prefix="lightning-prune-test-"),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def gate_gradients(model: nn.Module, names: list[str], batches, per_sample: bool = False, autocast=None):
    """dE/dz of explicit gates ``z = 1`` after the named modules, by autograd, for each batch.

    Returns a list (one entry per batch) of {name: tensor}: the gradient summed over the batch
    (``[C]``) or per sample (``[N, C]``). ``batches`` are (x, y, loss_weight) triples; the loss is the
    mean cross-entropy times ``loss_weight``.
    """
    modules = dict(model.named_modules())
    results = []
    for x, y, weight in batches:
        gates, handles = {}, []

        def make_hook(name):
            def hook(module, args, out):
                shape = [1] * out.ndim
                shape[1] = out.shape[1]
                if per_sample:
                    shape[0] = out.shape[0]
                z = torch.ones(shape, dtype=out.dtype, requires_grad=True)
                gates[name] = z
                return out * z

            return hook

        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        try:
            with torch.autocast("cpu", dtype=autocast) if autocast is not None else torch.enable_grad():
                loss = F.cross_entropy(model(x), y) * weight
            grads = torch.autograd.grad(loss, [gates[n] for n in names])
        finally:
            for h in handles:
                h.remove()
        results.append({n: g.reshape(g.shape[0], -1) if per_sample else g.flatten() for n, g in zip(names, grads)})
    return results


def fake_cifar_archive(path: Path, per_class: int, image_format: str = "PNG") -> Path:
    """A tiny archive with the CIFAR-10 JPEG archive's layout; pixel values encode (class, index)."""
    suffix = "jpg" if image_format == "JPEG" else image_format.lower()
    with tarfile.open(path, "w:gz") as tar:
        for split in ("test", "train"):
            for label, name in enumerate(CIFAR10_CLASSES):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), (label * 20, i * 20, 0)).save(buf, format=image_format)
                    info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{name}/{i:04d}.{suffix}")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def synthetic_time(module, args, kwargs, warmup, repeats):
    """Seconds a device computing channels in blocks of 8 would take (a BatchNorm or activation timed with
    a layer: 1 ns per output value); the whole network: 1 ms."""
    if isinstance(module, _Unit):
        layer, *after = module
        out = layer(args[0])
        return synthetic_time(layer, args, kwargs, warmup, repeats) + 1e-9 * len(after) * out.numel()
    if isinstance(module, nn.Conv2d):
        positions = args[0].shape[0] * args[0].shape[-1] * args[0].shape[-2] / module.stride[0] ** 2
        blocks = math.ceil(module.out_channels / 8) * math.ceil(module.in_channels / 8)
        return 1e-6 + 1e-9 * blocks * 64 * positions * module.kernel_size[0] ** 2 / module.groups
    if isinstance(module, nn.Linear):
        return 1e-6 + 1e-9 * module.in_features * module.out_features
    return 1e-3


def heads_of(graph, name: str, qkv: str = "qkv") -> list[int]:
    """The neurons of the heads of attention ``name`` (its query/key/value layer ``qkv``), in head order."""
    return list(dict.fromkeys(graph.gates[f"{name}.{qkv}"].neurons.tolist()))


def predicted_equals_counted(model, compacted, graph, masks, x) -> None:
    """The FLOPs the cost model predicts for ``masks`` are those counted on the compact network."""
    predicted = CostModel(model, x, graph).flops(graph.alive_from_masks(masks))
    counted = CostModel(compacted, x, build_dependency_graph(compacted, x)).total_flops
    assert predicted == pytest.approx(counted)


def fit_to_half_flops(net: nn.Module, tmp_path, size: int = 32, **options):
    """``net`` in a module without ``forward``, pruned by the callback (more ``options``) to 0.5x its FLOPs
    over the first 3 steps of a 4-step fit on synthetic images, compacted when the fit ends: (the module, the
    compact network in eval mode)."""
    from lightning_prune import TaylorPruningCallback

    module = NetOnly(net)
    callback = TaylorPruningCallback(target_flops_ratio=0.5, prune_every_n_batches=1, pruning_steps=3,
                                     compact_on_fit_end=True, **options)  # fmt: skip
    trainer(max_steps=4, callbacks=[callback], default_root_dir=tmp_path).fit(
        module, synthetic_loader(n=64, batch_size=16, size=size))
    return module, callback.compact_model.eval()
