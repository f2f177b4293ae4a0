"""Inference-ready copies of a network: BatchNorm folded into the layer before it, channels-last memory.

Pruning makes layers narrower but leaves the memory-bound work around them (BatchNorm, activations,
additions) on every channel that is kept. Folding each eval-mode BatchNorm into the Conv/Linear that
feeds it removes one full read and write of every such tensor, and channels-last lets oneDNN (CPU) and
cuDNN (GPU) skip layout conversions. Both apply to any traceable network, the original or a compact
one, so compare them under the same preparation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from lightning_prune.dependency.trace import trace_graph
from lightning_prune.errors import UnsupportedModelError


def optimize_for_inference(
    model: nn.Module,
    *,
    fold_batchnorm: bool = True,
    channels_last: bool = True,
    leaf_modules: Iterable[str] = (),
) -> nn.Module:
    """An eval-mode copy of ``model`` (left untouched) for inference.

    Args:
        model: any network; compact models from :func:`lightning_prune.compact` included.
        fold_batchnorm: fold every BatchNorm whose input comes only from a Conv or Linear layer into that
            layer's weight and bias (``torch.fx.experimental.optimization.fuse``); needs an
            fx-traceable network (``leaf_modules`` as given to the callback).
        channels_last: store 4-D weights channels-last; convolutions then return channels-last outputs
            whatever the input's layout.

    The copy computes what ``model.eval()`` computes, up to float rounding; it cannot be trained
    (folded BatchNorms no longer update their statistics).
    """
    model = copy.deepcopy(model).eval()
    if fold_batchnorm:
        if not isinstance(model, fx.GraphModule):
            try:
                model = fx.GraphModule(model, trace_graph(model, leaf_modules))
            except Exception as err:  # fx raises many types for untraceable code
                raise UnsupportedModelError(
                    f"cannot fold BatchNorm: torch.fx could not trace {type(model).__name__} ({err}); "
                    "name its untraceable submodules in leaf_modules, or pass fold_batchnorm=False"
                ) from err
        model = fuse(model, inplace=True, no_trace=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
