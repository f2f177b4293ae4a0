"""Exporting a compact model: ``torch.export`` always, ONNX when the ``onnx`` extra is installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_prune.dependency.trace import as_call_args


def export_program(model: nn.Module, example_input: Any, path: str | os.PathLike | None = None):
    """``torch.export.export`` of ``model`` (in eval mode) on ``example_input``; saved with
    ``torch.export.save`` when ``path`` is given. Returns the ``ExportedProgram``."""
    args, kwargs = as_call_args(example_input)
    training = model.training
    model.eval()
    try:
        program = torch.export.export(model, tuple(args), dict(kwargs))
    finally:
        model.train(training)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, path)
    return program


def onnx_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def export_onnx(model: nn.Module, example_input: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``model`` (in eval mode) as ONNX to ``path`` with ``torch.onnx.export``.

    Needs the optional extra: ``pip install "lightning-prune[onnx]"``. ``kwargs`` go to ``torch.onnx.export``.
    """
    if not onnx_available():
        raise ImportError('ONNX export needs the onnx and onnxscript packages: pip install "lightning-prune[onnx]"')
    args, call_kwargs = as_call_args(example_input)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training = model.training
    model.eval()
    try:
        torch.onnx.export(model, tuple(args), str(path), kwargs=dict(call_kwargs) or None, **kwargs)
    finally:
        model.train(training)
    return path
