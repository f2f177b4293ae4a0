"""LightningCLI (the ``[cli]`` extra): the README's YAML config, as written, prunes a small network."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import TaylorPruningCallback

pytest.importorskip("jsonargparse", reason="LightningCLI needs the [cli] extra")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


class TinyNet(pl.LightningModule):
    """Two conv-BN-ReLU blocks and a linear classifier, 8x8 inputs."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class RandomImages(pl.LightningDataModule):
    """``size`` random 3x8x8 images with 4 random labels."""

    def __init__(self, size: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.dataset = TensorDataset(torch.randn(size, 3, 8, 8, generator=generator),
                                     torch.randint(0, 4, (size,), generator=generator))  # fmt: skip
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)


def readme_yaml() -> str:
    """The YAML block of the README's LightningCLI section."""
    section = README.read_text().split("### LightningCLI", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_lightning_cli_with_the_readme_config(tmp_path: Path) -> None:
    config = tmp_path / "prune.yaml"
    config.write_text(readme_yaml())
    cli = LightningCLI(TinyNet, RandomImages, run=True, args=[
        "fit", "--config", str(config), "--trainer.max_steps=20", "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ])  # fmt: skip
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, TaylorPruningCallback)]
    assert cli.trainer.global_step == 20
    assert callback.num_pruned > 0 and len(callback.history) == 2  # a pruning step every 10 batches
    assert sum(int((~m).sum()) for m in callback.masks.values()) == callback.num_pruned
