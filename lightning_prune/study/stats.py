"""Rank correlations without SciPy: Pearson, Spearman (Pearson of average ranks), Kendall's tau-b."""

from __future__ import annotations

import math

import torch


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def average_ranks(a: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties sharing their average rank."""
    a = a.double()
    order = torch.argsort(a, stable=True)
    sorted_a = a[order]
    ranks = torch.empty_like(a)
    n = a.numel()
    i = 0
    values = sorted_a.tolist()
    idx = order.tolist()
    while i < n:
        j = i
        while j + 1 < n and values[j + 1] == values[i]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[idx[k]] = avg
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(average_ranks(a), average_ranks(b))


def kendall(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau-b (ties in either variable accounted for)."""
    a, b = a.double(), b.double()
    da = torch.sign(a[:, None] - a[None, :])
    db = torch.sign(b[:, None] - b[None, :])
    upper = torch.triu(torch.ones_like(da, dtype=torch.bool), diagonal=1)
    s = float((da * db)[upper].sum())
    na = float((da != 0)[upper].sum())
    nb = float((db != 0)[upper].sum())
    return s / math.sqrt(na * nb) if na > 0 and nb > 0 else math.nan


METRICS = {"pearson": pearson, "spearman": spearman, "kendall": kendall}
