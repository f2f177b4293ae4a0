"""BatchNorm recalibration: re-estimate running statistics that pruning left stale."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.statistics import split_batch


def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Any], num_batches: int | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them on ``num_batches`` batches (all if ``None``).

    Batches are ``(inputs, targets)``, dicts with ``"x"``/``"input"`` or bare inputs; no gradients are
    computed. After it, each ``running_mean`` is the mean of the channel over the batches seen and each
    ``running_var`` the average of the batches' unbiased variances (equal batches weigh alike: momentum
    ``None``, a cumulative average). Built on :func:`torch.optim.swa_utils.update_bn`, which resets and
    re-estimates the statistics and restores each BatchNorm's momentum; around it, the train/eval mode of
    every submodule is restored as it was (``update_bn`` only restores the top-level mode) and the
    forward passes run without autograd. Returns ``model``.
    """
    inputs = [split_batch(batch)[0] for batch in islice(batches, num_batches)]
    if not inputs:
        raise PruningConfigurationError("recalibrate_batchnorm needs at least one batch")
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            update_bn(inputs, model, device=device)
    finally:
        for m, training in modes.items():
            m.training = training
    return model
