"""Saving a compact model as (architecture fingerprint, masks, input shapes, compact state_dict), and
rebuilding it from the base model's class without any manual surgery."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from lightning_prune.compaction.compact import (
    CompactionError,
    architecture_fingerprint,
    class_name,
    compact,
    compact_info,
    example_from_spec,
)

FORMAT = "lightning-prune-compact"
FORMAT_VERSION = 2  # 2: the fingerprint hashes module names and class names, not the import path


class CompactModelMismatchError(CompactionError):
    """A compact file was loaded into a base model of another architecture."""


def save_compact(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a compact model made by :func:`compact` to ``path`` (``torch.save`` of plain tensors and
    strings, loadable with ``weights_only=True``). Returns the path."""
    info = compact_info(model)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "base_class": info["base_class"],
        "fingerprint": info["fingerprint"],
        "prefix": info["prefix"],
        "leaf_modules": list(info["leaf_modules"]),
        "masks": {name: mask.clone() for name, mask in info["masks"].items()},
        "inputs": info["inputs"],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def read_compact_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compact model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CompactionError(f"{path} is not a lightning-prune compact model file: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CompactionError(f"{path} is not a lightning-prune compact model file (no '{FORMAT}' header)")
    if payload.get("version") != FORMAT_VERSION:
        raise CompactionError(
            f"{path} has compact format version {payload.get('version')}, this lightning-prune reads {FORMAT_VERSION}"
        )
    return payload


def load_compact(base_model: nn.Module, path: str | os.PathLike, map_location: Any = None) -> fx.GraphModule:
    """Rebuild the compact model saved at ``path`` from a freshly constructed ``base_model`` (same class
    and configuration as the model it was compacted from; its weights do not matter).

    Raises :class:`CompactModelMismatchError` when ``base_model`` has another architecture.
    """
    payload = read_compact_file(path)
    fingerprint = architecture_fingerprint(base_model)
    if fingerprint != payload["fingerprint"]:
        raise CompactModelMismatchError(
            f"{path} holds a compact {payload['base_class']} (architecture fingerprint {payload['fingerprint']}), "
            f"but the base model given is a {class_name(base_model)} (fingerprint {fingerprint}) with other "
            "layers or layer sizes: build the base model exactly as the one that was pruned"
        )
    device = next((p.device for p in base_model.parameters()), torch.device("cpu"))
    model = compact(
        base_model,
        payload["masks"],
        example_from_spec(payload["inputs"], device),
        prefix=payload["prefix"],
        leaf_modules=payload["leaf_modules"],
        complete_ties=True,  # the masks of a compact model already built: checked (or completed) then
    )
    try:
        missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as err:  # a weight of another shape
        raise CompactModelMismatchError(f"{path}: the saved weights do not fit the rebuilt compact model: {err}") from err
    if missing or unexpected:
        raise CompactModelMismatchError(
            f"{path}: the rebuilt compact model does not match the saved weights "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if map_location is not None:
        model.to(map_location)
    return model
