"""Helpers for pruning under data parallelism (DDP); see docs/distributed.md.

* :func:`mean_over_ranks` and :func:`broadcast_decision`: the callback's only collectives of its own
  at a pruning step (the smoothed loss, rank zero's decision), each one small tensor;
  :func:`all_reduce_tensors` for criteria that gather their own statistics.
* :class:`CPUSyncBatchNorm` / :class:`CPUSyncBatchNormPlugin`: ``torch.nn.SyncBatchNorm`` refuses CPU
  tensors, so ``Trainer(sync_batchnorm=True)`` fails with the gloo backend; this computes the same
  global batch statistics with two plain ``all_reduce`` calls per layer (forward and, through
  autograd, backward), on any device and backend::

      Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[CPUSyncBatchNormPlugin()])

  It is meant for CPU clusters and tests; on GPUs use ``sync_batchnorm=True``.
* :class:`CollectiveCounter`: counts the collectives (and bytes) the pruning code issues.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from torch import nn
from typing_extensions import override

__all__ = [
    "CPUSyncBatchNorm",
    "CPUSyncBatchNormPlugin",
    "CollectiveCounter",
    "all_reduce_tensors",
    "broadcast_decision",
    "is_distributed",
    "mean_over_ranks",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_tensors(tensors: dict[str, torch.Tensor], mean: bool = False) -> dict[str, torch.Tensor]:
    """Sum (or average) a dict of tensors over ranks with one ``all_reduce`` of one flat tensor.

    For criteria that gather their own statistics (activations, their gradients) on each rank: call it
    on the step's statistics before any non-linear step (squares of sums, normalisation). Every rank
    must pass the same keys with the same shapes. A no-op outside a process group of several ranks.
    """
    if not tensors or not is_distributed():
        return dict(tensors)
    keys = sorted(tensors)
    dtype = torch.promote_types(*(tensors[k].dtype for k in keys)) if len(keys) > 1 else tensors[keys[0]].dtype
    parts = [tensors[k].detach().reshape(-1).to(dtype) for k in keys]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    if mean:
        flat /= dist.get_world_size()
    chunks = flat.split([p.numel() for p in parts])
    return {k: c.reshape(tensors[k].shape).to(tensors[k].dtype) for k, c in zip(keys, chunks)}


def _torch_collectives(trainer: pl.Trainer) -> bool:
    """Whether the trainer's ranks talk through ``torch.distributed`` (DDP, ddp_spawn, multi-node DDP)."""
    return trainer.world_size > 1 and is_distributed()


def mean_over_ranks(trainer: pl.Trainer, value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks: one ``all_reduce`` of the tensor itself (no barrier, no copy of
    anything else); the strategy's own ``reduce`` where ranks don't use ``torch.distributed``."""
    if trainer.world_size == 1:
        return value
    if not _torch_collectives(trainer):
        return trainer.strategy.reduce(value.clone(), reduce_op="mean")
    dtype = value.dtype if value.is_floating_point() else torch.float64
    flat = value.detach().to(trainer.strategy.root_device, dtype, copy=True).reshape(-1)
    dist.all_reduce(flat)
    return (flat / trainer.world_size).reshape(value.shape).to(value.device, value.dtype)


def broadcast_decision(
    trainer: pl.Trainer, chosen: torch.Tensor, stop: bool, capacity: int
) -> tuple[torch.Tensor, bool]:
    """Rank zero's pruning decision on every rank: one int64 tensor ``[stop, n, id_1..id_n, -1...]`` of
    ``capacity + 2`` entries, ``capacity`` (the most neurons one step may remove) being the same on
    every rank. Falls back to the strategy's ``broadcast`` where ranks don't use ``torch.distributed``."""
    if trainer.world_size == 1:
        return chosen, stop
    if not _torch_collectives(trainer):
        return trainer.strategy.broadcast((chosen, stop))
    chosen = chosen.flatten().long().cpu()
    if chosen.numel() > capacity:
        raise ValueError(f"{chosen.numel()} neurons chosen but room for {capacity}")
    message = torch.full((capacity + 2,), -1, dtype=torch.long)
    message[0], message[1] = int(stop), chosen.numel()
    message[2 : 2 + chosen.numel()] = chosen
    message = message.to(trainer.strategy.root_device)
    dist.broadcast(message, src=0)
    message = message.cpu()
    return message[2 : 2 + int(message[1])].clone(), bool(message[0])


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` with its adjoint (again a sum over ranks) as the backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A synchronised BatchNorm whose statistics are reduced with differentiable ``all_reduce`` calls.

    Training-mode outputs equal those of one ``BatchNorm`` over the concatenated batches of all ranks
    (the global mean first, then the global centred sum of squares: numerically like the two-pass
    single-process statistic), and so do the gradients and the running statistics.
    (Not a subclass of ``nn.SyncBatchNorm``, which DDP refuses on CPU modules.)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        # torch.fx keeps modules of the ``torch.nn`` namespace as graph leaves: so should this one,
        # like the BatchNorm it replaces (the class itself, and pickling, are unaffected).
        self.__module__ = nn.BatchNorm2d.__module__

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        sync = self.training and dist.is_available() and dist.is_initialized()
        group = (self.process_group or dist.group.WORLD) if sync else None
        sync = sync and dist.get_world_size(group) > 1
        if not sync:
            return super().forward(input)  # plain BatchNorm: nothing to synchronise
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        count = torch.tensor([input.numel() // input.size(1)], dtype=x.dtype, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = totals[-1].detach()
        mean = totals[:-1] / n
        centred = x - mean.reshape(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims), group) / n
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.weight is not None:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                momentum = 0.0 if self.momentum is None else self.momentum
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                    if self.momentum is None:  # cumulative moving average
                        momentum = 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / max(float(n) - 1, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        return out.to(input.dtype)

    @classmethod
    def convert(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm (and SyncBatchNorm) in ``module`` by a :class:`CPUSyncBatchNorm`."""
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)  # fmt: skip
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert(child, process_group))
        return converted


class CPUSyncBatchNormPlugin(TorchSyncBatchNorm):
    """Lightning layer-sync plugin: ``plugins=[CPUSyncBatchNormPlugin()]`` in place of ``sync_batchnorm=True``."""

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        return CPUSyncBatchNorm.convert(model)


assert issubclass(CPUSyncBatchNormPlugin, LayerSync)


@dataclass
class Collective:
    op: str  # the torch.distributed function the pruning code called
    bytes: int  # payload this rank put into it: tensor sizes (for object collectives: the pickles and sizes)
    caller: str  # the pruning-code function that called it


class CollectiveCounter:
    """Counts the collectives issued from given packages, and the bytes each rank puts into them.

    A context manager that wraps ``torch.distributed``'s Python collectives; a call counts when a frame
    of one of ``packages`` is on the stack (by default the pruning callback, importance and pruner code,
    so DDP's own gradient all-reduce, which runs in C++, and the model's layers are left out). Object
    collectives (``broadcast_object_list``) count the tensors they send underneath: the size header and
    the pickle. ``records`` lists every call on this rank::

        with CollectiveCounter() as counter:
            trainer.fit(model)
        counter.total_bytes
    """

    OPS = (
        "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
        "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
        "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
    )  # fmt: skip

    def __init__(self, packages: tuple[str, ...] = (
            "lightning_prune.callbacks", "lightning_prune.importance", "lightning_prune.pruner")) -> None:  # fmt: skip
        self.packages = packages
        self.records: list[Collective] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._open: Collective | None = None

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            for op in self.OPS:
                fn = getattr(module, op, None)
                if fn is not None:
                    self._saved.append((module, op, fn))
                    setattr(module, op, self._wrap(op, fn))
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, op, fn in reversed(self._saved):
            setattr(module, op, fn)
        self._saved.clear()

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name.startswith(self.packages):
                return f"{name}.{frame.f_code.co_name}"
            frame = frame.f_back
        return None

    def _wrap(self, op: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._open is not None:  # inside a counted object collective: add what it sends
                self._open.bytes += _payload(args, kwargs)
                return fn(*args, **kwargs)
            caller = self._caller()
            if caller is None:
                return fn(*args, **kwargs)
            record = Collective(op, 0 if op.endswith(("_object", "_object_list")) else _payload(args, kwargs), caller)
            self.records.append(record)
            self._open = record
            try:
                return fn(*args, **kwargs)
            finally:
                self._open = None

        return wrapper


def _payload(args: tuple, kwargs: dict) -> int:
    """Bytes of the tensors (or tensor lists) among a collective's arguments, the first one only."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return sum(v.numel() * v.element_size() for v in value)
    return 0
