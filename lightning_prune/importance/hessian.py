"""Diagonal of the Hessian of a scalar loss: exact (one double backward per entry) or Hutchinson's estimate.

Hutchinson (1990): for Rademacher vectors ``v`` (entries +-1), ``E[v * (H v)] = diag(H)``; each sample
costs one Hessian-vector product (a double backward), whatever the number of parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

HessianMethod = Literal["auto", "exact", "hutchinson"]

#: ``method="auto"`` computes the exact diagonal up to this many entries, Hutchinson's estimate above.
EXACT_MAX_ENTRIES = 512


def hessian_diagonal(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    method: HessianMethod = "auto",
    samples: int = 16,
    generator: torch.Generator | None = None,
    exact_max_entries: int = EXACT_MAX_ENTRIES,
) -> list[torch.Tensor]:
    """``d^2 loss / d p_i^2`` for every entry of every tensor of ``params`` (each must require grad).

    ``loss`` must have been computed with a graph (not under ``no_grad``); the graph is consumed.
    """
    params = list(params)
    if method == "auto":
        method = "exact" if sum(p.numel() for p in params) <= exact_max_entries else "hutchinson"
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"Hessian method must be 'auto', 'exact' or 'hutchinson', got {method!r}")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    diag = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    if not live:
        return diag
    if method == "exact":
        for i in live:
            flat = grads[i].reshape(-1)
            out = diag[i].view(-1)
            for j in range(flat.numel()):
                (row,) = torch.autograd.grad(flat[j], params[i], retain_graph=True, allow_unused=True)
                if row is not None:
                    out[j] = row.reshape(-1)[j].float()
        return diag
    for s in range(samples):
        vs = [
            (torch.randint(0, 2, params[i].shape, generator=generator).to(params[i]) * 2 - 1) for i in live
        ]
        hvs = torch.autograd.grad(
            [grads[i] for i in live], [params[i] for i in live], grad_outputs=vs,
            retain_graph=s < samples - 1, allow_unused=True,
        )  # fmt: skip
        for i, v, hv in zip(live, vs, hvs):
            if hv is not None:
                diag[i] += (v * hv).float()
    return [d / samples if i in live else d for i, d in enumerate(diag)]
