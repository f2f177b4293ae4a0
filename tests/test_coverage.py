"""Architecture coverage, a representative subset of ``benchmarks/coverage.py`` (the full sweep): each model
in a LightningModule without ``forward``, pruned by the callback towards 0.5x FLOPs, then compacted.
Every model compacts exactly and reaches 0.55x."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torchvision
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.coverage import EXACT_AT, MET_AT, NUM_CLASSES, Spec, prune_and_measure  # noqa: E402

SIZE, BATCH = 32, 4  # batch 2 leaves BatchNorm two values at 1x1 (regnet_x_400mf's loss turns NaN)
TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny",
               "shufflenet_v2_x0_5", "squeezenet1_0", "densenet121", "vit_tiny", "swin_tiny",
               "swin_v2_tiny")  # fmt: skip
TIMM = ("resnet18d", "efficientnet_b0", "convnext_atto", "ghostnet_100", "vit_tiny_patch16_224")
def _build(family: str, name: str):
    if family == "timm":
        pytest.importorskip("timm")
        return Spec("timm", name, SIZE, BATCH, {"img_size": SIZE} if name.startswith("vit_") else {}).build()
    if name == "vit_tiny":  # torchvision's ViT class, a configuration small enough for CI
        return VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                 mlp_dim=128, num_classes=NUM_CLASSES)  # fmt: skip
    if name.startswith("swin"):  # torchvision's Swin (V1, V2) classes, small enough for CI
        v2 = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if "v2" in name else {}
        return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                               num_classes=NUM_CLASSES, **v2)  # fmt: skip
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)


@functools.cache
def _measured(family: str, name: str) -> dict[str, Any]:
    """One pruning run per model, shared by both tests."""
    return prune_and_measure(_build(family, name), SIZE, BATCH, steps=4)


CASES = [(f, n) for f, names in (("torchvision", TORCHVISION), ("timm", TIMM)) for n in names]


@pytest.mark.parametrize(("family", "name"), CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_compact_model_equals_the_masked_one_and_costs_fewer_flops(family: str, name: str) -> None:
    result = _measured(family, name)
    assert result["output_scale"] > 1e-3, "the masked output is ~0: the comparison would be vacuous"
    assert result["rel_error"] <= EXACT_AT, result
    assert result["prunable_share"] > 0 and result["flops_ratio"] < 0.99, result


@pytest.mark.parametrize(("family", "name"), CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_callback_reaches_the_flops_target(family: str, name: str) -> None:
    assert _measured(family, name)["flops_ratio"] <= MET_AT
