"""Optimal Brain Damage at weight granularity, as the original procedure (LeCun et al., 1990).

Individual weights with the lowest saliency ``h_ii w_i^2 / 2`` are zeroed and frozen (unstructured
masks), the network trains on, and the next pruning step repeats. :class:`OBDWeightPruningCallback`
does it during training with the same schedule parameters as :class:`~lightning_prune.TaylorPruningCallback`
(``prune_every_n_batches``, a fraction per step, a target); its Hessian diagonal is the minibatch
Fisher ``N * (dE/dw)^2`` averaged over the steps between two pruning steps (no double backward is possible
in the training loop). :func:`obd_weight_masks` prunes once outside a Trainer with the exact diagonal
(small networks) or Hutchinson's estimate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.hessian import HessianMethod
from lightning_prune.importance.statistics import split_batch


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights OBD prunes: every Conv and Linear weight."""
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }


def _select(saliency: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Masks with ``count`` more weights removed: the alive ones of lowest saliency, globally."""
    names = list(saliency)
    flat = torch.cat([torch.where(masks[n], saliency[n], torch.full_like(saliency[n], float("inf"))).flatten()
                      for n in names])  # fmt: skip
    alive = int(torch.cat([masks[n].flatten() for n in names]).sum())
    count = min(count, alive - 1)
    if count <= 0:
        return masks
    chosen = torch.topk(flat, count, largest=False).indices
    keep = torch.cat([masks[n].flatten() for n in names]).clone()
    keep[chosen] = False
    out, offset = {}, 0
    for n in names:
        k = masks[n].numel()
        out[n] = keep[offset : offset + k].view_as(masks[n])
        offset += k
    return out


@torch.no_grad()
def apply_weight_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def obd_weight_masks(
    model: nn.Module,
    data: Iterable[Any],
    fraction: float,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    hessian: HessianMethod = "auto",
    hessian_samples: int = 16,
    num_batches: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One OBD step: zero ``fraction`` of the (Conv/Linear) weights with the lowest saliency ``h_ii w_i^2 / 2``.

    Returns bool masks (True: kept) by parameter name, and zeroes the removed weights in ``model``.
    """
    weights = prunable_weights(model)
    masks = masks or {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    try:
        for i, batch in enumerate(data):
            if num_batches is not None and i >= num_batches:
                break
            diag = _weight_hessian(model, weights, batch, hessian, hessian_samples, seed + i)
            for n, h in diag.items():
                sums[n] = sums[n] + h if n in sums else h
            batches += 1
    finally:
        for m, training in modes.items():
            m.training = training
    saliency = {n: 0.5 * (sums[n] / batches) * weights[n].detach().float().cpu().square() for n in weights}
    total = sum(w.numel() for w in weights.values())
    masks = _select(saliency, {n: m.cpu() for n, m in masks.items()}, round(fraction * total))
    apply_weight_masks(model, masks)
    return masks


def _weight_hessian(model, weights, batch, method, samples, seed) -> dict[str, torch.Tensor]:
    import torch.nn.functional as F

    from lightning_prune.importance.hessian import hessian_diagonal

    x, y = split_batch(batch)
    device = next(model.parameters()).device
    with torch.enable_grad():
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
    names = list(weights)
    diag = hessian_diagonal(loss, [weights[n] for n in names], method, samples, torch.Generator().manual_seed(seed))
    return {n: d.cpu() for n, d in zip(names, diag)}


class OBDWeightPruningCallback(Callback):
    """Unstructured OBD during training: every ``prune_every_n_batches`` optimizer steps, zero and freeze
    ``fraction_per_step`` of the Conv/Linear weights (those of lowest ``h_ii w_i^2 / 2``) until
    ``target_sparsity`` of them are gone. ``h_ii ~ N (dE/dw_i)^2`` (minibatch Fisher, averaged over the
    steps since the last pruning step)."""

    def __init__(self, prune_every_n_batches: int = 10, fraction_per_step: float = 0.05, target_sparsity: float = 0.5):
        if not (0 < fraction_per_step < 1 and 0 < target_sparsity < 1):
            raise PruningConfigurationError("fraction_per_step and target_sparsity must be in (0, 1)")
        if prune_every_n_batches < 1:
            raise PruningConfigurationError("prune_every_n_batches must be >= 1")
        self.prune_every_n_batches = prune_every_n_batches
        self.fraction_per_step = fraction_per_step
        self.target_sparsity = target_sparsity
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []
        self._fisher: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._samples = 0
        self._weights: dict[str, nn.Parameter] = {}

    @property
    def sparsity(self) -> float:
        if not self.masks:
            return 0.0
        total = sum(m.numel() for m in self.masks.values())
        return 1 - sum(int(m.sum()) for m in self.masks.values()) / total

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._weights = prunable_weights(pl_module)
        if not self.masks:
            self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self._weights.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, _ = split_batch(batch)
        self._samples = x.shape[0] if isinstance(x, torch.Tensor) else 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for n, w in self._weights.items():
            if w.grad is None:
                continue
            f = self._samples * w.grad.detach().float().square()
            self._fisher[n] = self._fisher[n] + f if n in self._fisher else f
            w.grad.mul_(self.masks[n].to(w.grad.device))  # removed weights are frozen
        self._steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        apply_weight_masks(pl_module, self.masks)
        if self._steps >= self.prune_every_n_batches and self.sparsity < self.target_sparsity - 1e-9:
            saliency = {n: 0.5 * (self._fisher[n] / self._steps).cpu() * w.detach().float().cpu().square()
                        for n, w in self._weights.items() if n in self._fisher}  # fmt: skip
            total = sum(m.numel() for m in self.masks.values())
            goal = min(self.target_sparsity, self.sparsity + self.fraction_per_step)
            count = round(goal * total) - round(self.sparsity * total)
            masks = {n: self.masks[n].cpu() for n in saliency}
            new = _select(saliency, masks, count)
            self.masks.update({n: m.to(self._weights[n].device) for n, m in new.items()})
            apply_weight_masks(pl_module, self.masks)
            self._fisher, self._steps = {}, 0
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.history.append({"step": trainer.global_step, "sparsity": self.sparsity,
                                 "loss": float(loss.detach()) if isinstance(loss, torch.Tensor) else float("nan")})  # fmt: skip
