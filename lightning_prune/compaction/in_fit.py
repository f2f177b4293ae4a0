"""Compaction inside a running fit: the network of a LightningModule replaced by its compact version,
with the optimizer's parameters and state, and the DDP wrapper, following it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

_BASE = 256  # flat indices travel digit by digit: every float dtype (bfloat16 included) holds 0..255 exactly


def parameter_sources(network: nn.Module, compact_fn: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """For each parameter of the compact network ``compact_fn()`` builds from ``network``: the flat index
    in the same-named parameter of ``network`` of each of its elements.

    Found by compacting ``network`` with every parameter holding a base-256 digit of its own flat indices
    (restored after), so any op rule's slicing is followed without knowing it."""
    params = dict(network.named_parameters())
    saved = {name: p.detach().clone() for name, p in params.items()}
    largest = max((p.numel() for p in params.values()), default=1)
    total: dict[str, torch.Tensor] = {}
    try:
        for digit in range(max(1, math.ceil(math.log(max(largest, 2), _BASE)))):
            with torch.no_grad():
                for p in params.values():
                    index = torch.arange(p.numel(), device=p.device)
                    p.copy_((torch.div(index, _BASE**digit, rounding_mode="floor") % _BASE).view_as(p).to(p.dtype))
            for name, q in compact_fn().named_parameters():
                value = q.detach().double().round().long().flatten().cpu() * _BASE**digit
                total[name] = total[name] + value if name in total else value
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
    return total


def replace_network(
    trainer: pl.Trainer, pl_module: pl.LightningModule, path: str, small: nn.Module, sources: dict[str, torch.Tensor]
) -> None:
    """Put ``small`` in place of ``pl_module``'s submodule ``path``; move each optimizer's parameters (and
    their state, sliced by ``sources``) to the compact ones; wrap the module in DDP again under DDP."""
    old = pl_module.get_submodule(path)
    names = {p: name for name, p in old.named_parameters()}
    new = dict(small.named_parameters())
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["params"] = list(_moved(optimizer, group["params"], names, new, sources))
    put_network(pl_module, path, small)
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and trainer.world_size > 1:
        strategy.model = pl_module  # DDP holds the old parameters: wrap the module again, on every rank
        strategy.configure_ddp()


def put_network(pl_module: nn.Module, path: str, network: nn.Module) -> None:
    """Set ``pl_module``'s submodule at the dotted ``path`` to ``network``."""
    parent, _, attr = path.rpartition(".")
    setattr(pl_module.get_submodule(parent) if parent else pl_module, attr, network)


def _moved(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    names: dict[torch.Tensor, str],
    new: dict[str, nn.Parameter],
    sources: dict[str, torch.Tensor],
):
    """The group's parameters with the network's replaced by their compact versions (state sliced)."""
    for p in params:
        name = names.get(p)
        if name is None:  # a parameter outside the network
            yield p
            continue
        state = optimizer.state.pop(p, None)
        q = new.get(name)
        if q is None:  # not in the compact network
            continue
        if state:
            optimizer.state[q] = {k: _slice_like(v, p, q, sources[name]) for k, v in state.items()}
        yield q


def _slice_like(value, old: torch.Tensor, new: torch.Tensor, source: torch.Tensor):
    """A state tensor shaped like its parameter, cut as the parameter was; anything else (steps) as it is."""
    if isinstance(value, torch.Tensor) and value.shape == old.shape:
        return value.flatten()[source.to(value.device)].view_as(new).clone()
    return value
