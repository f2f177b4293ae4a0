"""Run-time helpers called by compact models (kept as leaves if a compact model is traced again)."""

from __future__ import annotations

import torch
import torch.fx


def gather_channels(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Channels ``index`` of ``x`` along ``dim``; an index equal to ``x.shape[dim]`` gives a zero channel."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x, x.new_zeros(shape)], dim).index_select(dim, index)


torch.fx.wrap("gather_channels")
