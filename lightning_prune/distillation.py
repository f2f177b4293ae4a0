"""Distillation from the unpruned network, without touching the user's loss.

The network's output is passed through an identity whose backward adds the gradient of
``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (averaged over samples and positions)
to the gradient arriving from the user's loss: training then follows ``loss + weight * KD`` exactly, under
any strategy, precision and accumulation, while ``training_step`` stays as the user wrote it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class _AddDistillationGradient(torch.autograd.Function):
    """Identity forward; backward adds ``factor * d KD / d student``."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, factor: float) -> torch.Tensor:
        ctx.save_for_backward(student.detach(), teacher)
        ctx.temperature, ctx.factor = temperature, factor
        return student.view_as(student)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        return grad + ctx.factor * distillation_gradient(student, teacher, ctx.temperature), None, None, None


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over dimension 1, averaged over the
    other positions (samples, and pixels of dense outputs)."""
    t = temperature
    log_p = torch.log_softmax(_wide(student) / t, dim=1)
    log_q = torch.log_softmax(_wide(teacher) / t, dim=1)
    positions = student.numel() // student.shape[1]
    return t * t * (log_q.exp() * (log_q - log_p)).sum() / positions


def distillation_gradient(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The gradient of :func:`distillation_loss` with respect to ``student``: ``T (p - q) / positions``."""
    t = temperature
    p = torch.softmax(_wide(student) / t, dim=1)
    q = torch.softmax(_wide(teacher) / t, dim=1)
    positions = student.numel() // student.shape[1]
    return (t * (p - q) / positions).to(student.dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision logits lose the softmax's small differences)."""
    return x if x.dtype == torch.float64 else x.float()


class Distiller:
    """A frozen copy of a network (the teacher) and a hook on the network being trained (the student) that
    adds the distillation gradient to its output in training mode.

    ``gradient_scale()`` is what the user's loss gradient is multiplied by at the output (AMP loss scale
    divided by the gradient accumulation), so the added gradient is on the same footing.
    """

    def __init__(self, network: nn.Module, weight: float, temperature: float) -> None:
        self.teacher = copy.deepcopy(network).eval().requires_grad_(False)
        self.weight, self.temperature = weight, temperature
        self._handle: RemovableHandle | None = None

    def attach(self, student: nn.Module, gradient_scale: Callable[[], float]) -> None:
        self.detach()

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not module.training or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or output.ndim < 2:
                raise TypeError(
                    f"distillation needs a network that returns logits (a tensor with classes on dimension 1); "
                    f"{type(module).__name__} returned {type(output).__name__}"
                )
            with torch.no_grad():
                teacher = self.teacher(*args, **kwargs)
            factor = self.weight * gradient_scale()
            return _AddDistillationGradient.apply(output, teacher.to(output.dtype), self.temperature, factor)

        self._handle = student.register_forward_hook(hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
