"""A generic image classification LightningModule: any network, any loss, optimizer and scheduler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ClassificationModule(pl.LightningModule):
    """Trains ``model`` with ``loss`` (default cross-entropy); logs ``train/loss``, ``train/top1``,
    ``val/loss``, ``val/top1`` (and ``val/top5`` with 5 classes or more).

    Args:
        model: the network (kept as ``self.model``; the pruning callback is pointed at it).
        optimizer: ``params -> Optimizer`` (a ``functools.partial``, e.g. from Hydra ``_partial_: true``).
        scheduler: ``optimizer -> LRScheduler`` or ``None``; stepped every ``scheduler_interval``.
        loss: the training criterion, a module or callable ``(logits, target) -> loss``.
        num_classes: classes of the task, for the accuracy metrics.
        input_shape: ``(C, H, W)`` of one example; sets ``example_input_array`` (2 examples) for tracing.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.loss_fn = loss if loss is not None else nn.CrossEntropyLoss()
        self.num_classes = num_classes
        self.example_input_array = torch.zeros(2, *input_shape)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes >= 5 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        self.train_top1(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: Any, prefix: str) -> None:
        x, y = batch
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        self.val_top1(logits, y)
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True, batch_size=y.shape[0])
        self.log(f"{prefix}/top1", self.val_top1, prog_bar=True, batch_size=y.shape[0])
        if self.val_top5 is not None:
            self.val_top5(logits, y)
            self.log(f"{prefix}/top5", self.val_top5, batch_size=y.shape[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
